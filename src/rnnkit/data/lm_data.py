"""Text for language modelling: read, tokenize, split, and cache the ids next to the run.

The split is deterministic and contiguous: the first part of the text trains,
the next ``val_fraction`` validates and the last ``test_fraction`` tests, so
validation text never overlaps training text.

The text is never held whole, so a corpus may be larger than memory. Pass one
streams it to build the vocabulary; pass two streams it again and writes the
ids straight into ``ids.npy`` (the narrowest unsigned dtype), which every
split reads through a memory map. Word level writes provisional ids in pass
one (the words in order of first occurrence) and pass two only renumbers them.
The ids are built in a temporary folder beside the run's data cache
(``RUN/data/``), which :func:`save_lm_cache` renames into place once the run
starts. The cache is keyed by the files' paths, sizes and modification times
and the sha256 of their bytes, streamed; a run on the same files maps the
cached ids again without reading the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.config import DataConfig
from rnnkit.data import corpora
from rnnkit.data.progress import ByteProgress
from rnnkit.data.tokenizers import (
    BPETokenizer,
    CharSet,
    CharTokenizer,
    Tokenizer,
    Unknown,
    WordCounter,
    WordTokenizer,
    char_pieces,
    count_ids,
    cut_after_space,
    encode_pieces,
    ids_dtype,
    tokenizer_from_dict,
)
from rnnkit.errors import RnnkitError, UnknownTokens
from rnnkit.files import atomic_folder, fsync_dir

Log = Callable[[str], None]

CACHE_VERSION = 2
SPLITS = ("train", "val", "test")
IDS_FILE = "ids.npy"
# A file modified less than this before its hash was taken may change again within
# the file system's timestamp granularity without its mtime showing it: such a
# cache is checked against the bytes, not trusted on size and mtime ("racy git").
RACY_NS = 2_000_000_000
# Ids renumbered per block in word level's second pass.
_BLOCK = 1 << 22


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str  # what the text is, for logs and the checkpoint
    chars: int  # characters in the whole text
    cache_key: str = ""
    from_cache: bool = False
    # The built, not yet committed cache folder, and what its meta.json holds.
    _staging: Path | None = field(default=None, repr=False, compare=False)
    _meta: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def chars_per_token(self) -> float:
        total = len(self.train) + len(self.val) + len(self.test)
        return self.chars / max(total, 1)


def read_source(config: DataConfig, *, log: Log | None = None) -> tuple[str, str]:
    """Return (text, description) for ``--text`` or ``--corpus``: the whole text, for small uses."""
    files, source = text_files(config, log=log)
    return "".join(files.pieces()), source


def text_files(config: DataConfig, *, log: Log | None = None) -> tuple[corpora.TextFiles, str]:
    """The files behind ``--text`` or ``--corpus`` (fetched if needed), and a description."""
    if config.text and config.corpus:
        raise RnnkitError("give either --text or --corpus, not both")
    if config.text:
        return corpora.open_text(config.text, encoding=config.encoding), str(config.text)
    if config.corpus:
        return corpora.open_text(corpora.fetch(config.corpus, log=log)), f"corpus {config.corpus}"
    raise RnnkitError("no training text: pass --text FILE_OR_FOLDER or --corpus NAME (see `rnnkit corpora list`)")


def split_ids(ids: np.ndarray, *, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous split: train | validation | test, by tail fractions (views, never copies)."""
    n = len(ids)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    n_train = n - n_val - n_test
    return ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]


def _settings(config: DataConfig) -> list[Any]:
    # Everything that changes the ids: the tokenizer's settings and the split.
    settings = [config.level, config.lowercase, config.eos, config.min_freq, config.max_vocab, config.vocab_size,
                config.val_fraction, config.test_fraction, config.encoding]
    if config.level == "bpe":
        settings.append(config.bpe_sample_mb)
    return settings


def _key(settings: list[Any], stat: list[list[Any]], sha256: str) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, settings, stat, sha256]).encode()).hexdigest()


# ---------------------------------------------------------------- the ids file


class Behind:
    """Calls run in order in one worker thread while the caller goes on (at most ``depth`` waiting).

    For work that releases the GIL, hashing and writing files: on a second core it
    overlaps the decoding and encoding of the next piece. An exception in a call is
    raised at the next :meth:`call` or at :meth:`wait`.
    """

    def __init__(self, depth: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnkit-io")
        self._pending: deque[Future[Any]] = deque()
        self._depth = depth

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        """Return once every call made so far has run (raising the first error)."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pending.clear()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


class HashBehind:
    """A hashlib object updated in a worker thread (:class:`Behind`): ``update`` returns at once."""

    def __init__(self, digest: Any, behind: Behind) -> None:
        self._digest = digest
        self._behind = behind

    def update(self, data: bytes) -> None:
        self._behind.call(self._digest.update, data)

    def hexdigest(self) -> str:
        self._behind.wait()
        return str(self._digest.hexdigest())


class IdsWriter:
    """Write ids to an ``.npy`` file as they come, the length filled in at the end.

    The header is written with room for any length (128 bytes, as numpy
    aligns it) and rewritten when the file is closed, so the ids never have
    to be held: ``np.load(path, mmap_mode="r")`` then maps them.
    """

    HEADER = 128

    def __init__(self, path: Path, dtype: np.dtype, *, behind: Behind | None = None) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._behind = behind  # writes made in its thread, when given
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(b" " * self.HEADER)

    def write(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        if self._behind is not None:
            self._behind.call(self._file.write, memoryview(ids).cast("B"))
        else:
            self._file.write(memoryview(ids).cast("B"))
        self.count += len(ids)

    def close(self) -> None:
        if self._behind is not None:
            try:
                self._behind.wait()
            except BaseException:
                self._file.close()
                raise
        fields = f"{{'descr': {np.lib.format.dtype_to_descr(self.dtype)!r}, 'fortran_order': False, " \
                 f"'shape': ({self.count},), }}"
        header = fields.ljust(self.HEADER - 10 - 1) + "\n"
        self._file.seek(0)
        self._file.write(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin-1"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def _map_ids(path: Path) -> np.ndarray:
    """The ids of ``path`` mapped read-only: a plain ndarray view of the file's pages."""
    if path.stat().st_size <= IdsWriter.HEADER:
        ids = np.load(path, allow_pickle=False)  # no ids: nothing to map
    else:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    if ids.ndim != 1 or ids.dtype.kind != "u":
        raise ValueError(f"{path} does not hold token ids")
    return ids.view(np.ndarray)


# ---------------------------------------------------------------- the cache


def _stream_sha256(files: corpora.TextFiles, *, log: Log | None, live: bool | None, label: str) -> str:
    digest = hashlib.sha256()
    with ByteProgress(label, files.size, log=log, live=live) as bar:
        for file in files.files:
            try:
                with file.open("rb") as handle:
                    while chunk := handle.read(corpora.READ_BYTES):
                        digest.update(chunk)
                        bar.advance(len(chunk))
            except OSError as error:
                raise RnnkitError(f"cannot read {file}: {error.strerror or error}") from None
    return digest.hexdigest()


def _load_cache(folder: Path, settings: list[Any], stat: list[list[Any]], files: corpora.TextFiles, *,
                log: Log | None, live: bool | None) -> tuple[dict[str, Any], np.ndarray] | None:
    """The cached meta and mapped ids for these files and settings, or None (then they are rebuilt)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("version") != CACHE_VERSION or meta.get("settings") != settings:
            return None
        if [f[0] for f in meta["files"]] != [f[0] for f in stat] or [f[1] for f in meta["files"]] != [f[1] for f in stat]:
            return None  # other files, or other sizes
        racy = any(mtime + RACY_NS >= meta["hashed_at_ns"] for _, _, mtime in stat)
        if meta["files"] != stat or racy:
            # Touched since, or too recently to tell by the mtime: the bytes decide.
            if _stream_sha256(files, log=log, live=live, label="checking the cached ids") != meta["sha256"]:
                return None
        ids = _map_ids(folder / IDS_FILE)
        if len(ids) != meta["tokens"] or str(ids.dtype) != meta["dtype"]:
            return None
        return meta, ids
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # a missing or damaged cache is simply rebuilt


def save_lm_cache(data: LMData, cache_dir: str | Path) -> None:
    """Keep the ids in ``cache_dir`` so the next run on the same text skips reading it.

    Renames the folder :func:`prepare_lm_data` built beside ``cache_dir``
    into place (a previous cache is replaced); ids prepared without a
    ``cache_dir`` are copied in. Failing to write a cache is not fatal.
    """
    if data.from_cache or data._meta is None:
        return
    target = Path(cache_dir)
    try:
        if data._staging is not None and data._staging.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if target.exists():
                    shutil.rmtree(target)
                os.replace(data._staging, target)
                fsync_dir(target.parent)
                data._staging = None
                return
            except OSError:
                pass  # another file system: copy instead
        with atomic_folder(target, replace=True) as tmp:
            out = IdsWriter(tmp / IDS_FILE, data.train.dtype)
            try:
                for split in (data.train, data.val, data.test):
                    for start in range(0, len(split), _BLOCK):
                        out.write(split[start : start + _BLOCK])
            finally:
                out.close()
            (tmp / "meta.json").write_text(json.dumps(data._meta, ensure_ascii=False), encoding="utf-8")
    except OSError:
        pass  # a cache is an optimisation: failing to write it is not fatal


# ---------------------------------------------------------------- building


def _staging_folder(cache_dir: Path | None) -> Path:
    """A fresh folder for the ids being built: beside ``cache_dir`` (for a cheap rename), or a temporary one."""
    if cache_dir is None:
        return Path(tempfile.mkdtemp(prefix="rnnkit-ids-"))
    base = cache_dir.parent
    while not base.is_dir() and base != base.parent:
        base = base.parent  # a run folder not made yet: nothing is created in it before the run starts
    try:
        return Path(tempfile.mkdtemp(prefix=f".tmp-{cache_dir.name}-", dir=base))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="rnnkit-ids-"))  # not writable there: the cache will be copied in


# The BPE vocabulary of a text longer than --bpe-sample-mb is trained on this many stretches spread over it.
SAMPLE_PLACES = 16


def sample_windows(total: int, budget: int) -> list[tuple[int, int]]:
    """Byte ranges of a ``total``-byte text that sum to about ``budget``: all of it when it is no longer."""
    if budget <= 0 or total <= budget:
        return [(0, total)]
    width = budget // SAMPLE_PLACES
    return [(k * total // SAMPLE_PLACES, k * total // SAMPLE_PLACES + width) for k in range(SAMPLE_PLACES)]


def sample_text(pieces: Iterable[tuple[str, int]], windows: list[tuple[int, int]]) -> Iterator[str]:
    """The text of ``pieces`` that lies in the byte ranges ``windows``, in whole lines; every piece is read.

    Each piece comes with the byte offset where it ends; a byte offset inside
    a piece is taken proportionally to its characters. A range that begins
    inside a piece begins after the next line end, and one that ends inside a
    piece ends after the next line end, so no line is cut except where a line
    runs over a piece's end. One range from the start gives the whole text, unchanged.
    """
    if len(windows) == 1 and windows[0][0] == 0:
        yield from (text for text, _ in pieces)
        return
    begin = 0
    for text, end in pieces:
        span = max(end - begin, 1)
        for low, high in windows:
            a, b = max(low, begin), min(high, end)
            if a >= b or not text:
                continue
            i = (a - begin) * len(text) // span
            j = (b - begin) * len(text) // span if b < end else len(text)
            if a == low and low > 0:  # the range starts here: at the start of a line (if the piece has one)
                i = text.find("\n", i) + 1 or i
            if b < end:
                j = text.find("\n", j)
                j = len(text) if j < 0 else j + 1
            if i < j:
                yield text[i:j]
        begin = end


def _changed(source: str) -> RnnkitError:
    return RnnkitError(f"{source} changed while it was being read (between the vocabulary and the encoding "
                       "pass); run again once nothing writes to it")


def _vocabulary_pass(files: corpora.TextFiles, config: DataConfig, *, digest: Any, bar: ByteProgress, staging: Path,
                     windows: list[tuple[int, int]], behind: Behind) -> tuple[Tokenizer, int, np.ndarray | None, int]:
    """Pass one: the tokenizer and the text's characters; word level also its provisional ids.

    Returns (tokenizer, characters, word level's final number of each provisional id
    or None, how many provisional ids ``staging/pieces.npy`` holds).
    """
    level = config.level
    chars = 0
    if level == "char":
        seen = CharSet()
        for piece in files.pieces(digest=digest, on_bytes=bar.advance):
            chars += len(piece)
            for part in char_pieces(piece, lowercase=config.lowercase):  # what `encode` will see
                seen.add(part)
        # Counted here, as `encode` will read them: pass two only encodes.
        return CharTokenizer(chars=seen.sorted(), lowercase=config.lowercase, counts=seen.counts()), chars, None, 0
    if level == "word":
        counter = WordCounter(lowercase=config.lowercase, eos=config.eos)
        out = IdsWriter(staging / "pieces.npy", np.dtype(np.uint32), behind=behind)
        try:
            for piece in cut_after_space(files.pieces(digest=digest, on_bytes=bar.advance)):
                chars += len(piece)
                out.write(counter.add(piece))
        finally:
            out.close()
        tokenizer, final = counter.tokenizer(min_freq=config.min_freq, max_vocab=config.max_vocab)
        return tokenizer, chars, final, out.count
    if level != "bpe":
        raise RnnkitError(f"unknown tokenization level {level!r} (choose: char, word, bpe)")
    read = 0

    def advance(count: int) -> None:
        nonlocal read
        read += count
        bar.advance(count)

    def counted() -> Iterator[tuple[str, int]]:
        nonlocal chars
        for piece in files.pieces(digest=digest, on_bytes=advance):
            chars += len(piece)
            yield piece, read

    try:
        tokenizer = BPETokenizer.fit_stream(sample_text(counted(), windows), vocab_size=config.vocab_size,
                                            lowercase=config.lowercase)
    except Exception as exc:  # the trainer hands on what the stream raised, sometimes wrapped
        cause = exc if isinstance(exc, RnnkitError) else exc.__cause__ or exc.__context__
        if isinstance(cause, RnnkitError):
            raise cause from None
        raise
    return tokenizer, chars, None, 0


def _build(files: corpora.TextFiles, config: DataConfig, *, source: str, stat: list[list[Any]], staging: Path,
           log: Log | None, live: bool | None) -> tuple[Tokenizer, str, int]:
    """Both passes into ``staging/ids.npy``: the tokenizer (with counts), the text's sha256, its characters."""
    behind = Behind()  # hashing and writing, in a thread of their own
    try:
        return _build_both(files, config, source=source, stat=stat, staging=staging, log=log, live=live,
                           behind=behind)
    finally:
        behind.close()


def _build_both(files: corpora.TextFiles, config: DataConfig, *, source: str, stat: list[list[Any]], staging: Path,
                log: Log | None, live: bool | None, behind: Behind) -> tuple[Tokenizer, str, int]:
    """:func:`_build`'s two passes, hashing and writing through ``behind``."""
    total = sum(size for _, size, _ in stat)
    first = HashBehind(hashlib.sha256(), behind)
    label = f"pass 1/2, {config.level} vocabulary"
    windows = sample_windows(total, int(config.bpe_sample_mb * 1e6))
    if config.level == "bpe" and len(windows) > 1:
        label += f" (trained on {config.bpe_sample_mb:g} MB of the text from {len(windows)} places: --bpe-sample-mb)"
    with ByteProgress(label, total, log=log, live=live) as bar:
        tokenizer, chars, word_final, provisional = _vocabulary_pass(files, config, digest=first, bar=bar,
                                                                     staging=staging, windows=windows, behind=behind)
    sha = first.hexdigest()
    if [list(f) for f in files.stat()] != stat:
        raise _changed(source)

    vocab = tokenizer.vocab_size
    counted = config.level == "char"  # pass one counted the characters as `encode` reads them
    counts = np.array(tokenizer.counts, dtype=np.int64) if counted else np.zeros(vocab, dtype=np.int64)
    out = IdsWriter(staging / IDS_FILE, ids_dtype(vocab), behind=behind)
    try:
        if word_final is not None:
            with ByteProgress("pass 2/2, numbering the words", provisional * 4, log=log, live=live) as bar, \
                    open(staging / "pieces.npy", "rb") as provisional_ids:
                # Read, not mapped: the pages stay in the page cache, out of this process's memory.
                provisional_ids.seek(IdsWriter.HEADER)
                while len(block := np.fromfile(provisional_ids, dtype=np.uint32, count=_BLOCK)):
                    ids = word_final[block]
                    counts += np.bincount(ids, minlength=vocab)
                    out.write(ids)
                    bar.advance(4 * len(block))
            (staging / "pieces.npy").unlink()
        else:
            second = HashBehind(hashlib.sha256(), behind)
            with ByteProgress(f"pass 2/2, encoding to {IDS_FILE}", total, log=log, live=live) as bar:
                try:
                    for ids in encode_pieces(tokenizer, files.pieces(digest=second, on_bytes=bar.advance)):
                        if not counted:
                            counts += count_ids(ids, vocab)
                        out.write(ids)
                except RnnkitError:
                    # Characters pass one never saw, or bytes it read as valid: the files changed.
                    raise _changed(source) from None
            if second.hexdigest() != sha or [list(f) for f in files.stat()] != stat:
                raise _changed(source)
    finally:
        out.close()
    # How often the model sees each token (after <unk> mapping): shown by `rnnkit vocab`.
    tokenizer.counts = counts.tolist()
    return tokenizer, sha, chars


def prepare_lm_data(
    config: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    log: Log | None = None,
    live: bool | None = None,
) -> LMData:
    """Read, tokenize and split the training text (mapping the cache in ``cache_dir`` when valid).

    Nothing is written into ``cache_dir`` here: new ids are built in a
    temporary folder beside it, which :func:`save_lm_cache` renames into place
    once the run is known to start (and which is removed if it never is).
    ``log`` gets progress lines; ``live`` asks for a progress bar instead
    (default: when ``log`` is given and stderr is a terminal).
    """
    files, source = text_files(config, log=log)
    settings = _settings(config)
    stat = [list(f) for f in files.stat()]
    folder = Path(cache_dir) if cache_dir is not None else None
    cached = _load_cache(folder, settings, stat, files, log=log, live=live) if folder is not None else None
    if cached is not None:
        meta, ids = cached
        data = LMData(tokenizer=tokenizer_from_dict(meta["tokenizer"]), source=source, chars=int(meta["chars"]),
                      cache_key=meta["key"], from_cache=True,
                      **dict(zip(SPLITS, split_ids(ids, val_fraction=config.val_fraction,
                                                    test_fraction=config.test_fraction), strict=True)))
        _check_lengths(data, config)
        return data

    staging = _staging_folder(folder)
    try:
        hashed_at = time.time_ns()
        tokenizer, sha, chars = _build(files, config, source=source, stat=stat, staging=staging, log=log, live=live)
        ids = _map_ids(staging / IDS_FILE)
        key = _key(settings, stat, sha)
        meta = {"version": CACHE_VERSION, "key": key, "settings": settings, "files": stat, "sha256": sha,
                "hashed_at_ns": hashed_at, "source": source, "chars": chars, "tokens": len(ids),
                "dtype": str(ids.dtype), "tokenizer": tokenizer.to_dict()}
        train, val, test = split_ids(ids, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
        meta["sizes"] = {"train": len(train), "val": len(val), "test": len(test)}
        (staging / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        data = LMData(tokenizer=tokenizer, train=train, val=val, test=test, source=source, chars=chars,
                      cache_key=key, from_cache=False, _meta=meta)
        _check_lengths(data, config)
    except OSError as exc:  # reading errors are RnnkitErrors already: this is writing the ids
        shutil.rmtree(staging, ignore_errors=True)
        raise RnnkitError(f"cannot write the ids of {source} to {staging}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder is None:
        # No cache wanted: the mapped pages outlive the unlinked file (POSIX).
        try:
            shutil.rmtree(staging)
        except OSError:
            weakref.finalize(data, shutil.rmtree, staging, True)
    else:
        data._staging = staging
        # A run that never starts leaves nothing behind: gone with the data, or at exit.
        weakref.finalize(data, shutil.rmtree, staging, True)
    return data


def _check_lengths(data: LMData, config: DataConfig) -> None:
    if len(data.train) < config.seq_len + 1:
        raise RnnkitError(
            f"{data.source} gives {len(data.train)} training tokens, fewer than one window of {config.seq_len} + 1; "
            "use a longer text or a smaller --seq-len (or --window)"
        )
    if config.val_fraction > 0 and len(data.val) < 2:
        raise RnnkitError(
            f"the validation split of {data.source} has {len(data.val)} tokens; use a longer text or a larger "
            "--val-fraction"
        )


# ---------------------------------------------------------------- a text to evaluate on


@dataclass
class EncodedText:
    ids: np.ndarray  # mapped from an unlinked temporary file
    chars: int
    unknown: int  # word level: pieces not in the vocabulary (scored as <unk>, or skipped)


def encode_text(tokenizer: Tokenizer, path: str | Path, *, encoding: str = "utf-8", unknown: Unknown | None = None,
                what: str = "the text", log: Log | None = None, live: bool | None = None) -> EncodedText:
    """Encode a file or folder with a trained tokenizer into a memory-mapped ids file, streaming the text.

    Reading errors are raised as they are; what the tokenizer refuses is
    prefixed with ``what`` (``"evaluation text: 3 character(s) not in ..."``).
    """
    files = corpora.open_text(path, encoding=encoding)
    staging = _staging_folder(None)
    try:
        chars = 0
        unk = 0
        unk_id = tokenizer.unk_id if isinstance(tokenizer, WordTokenizer) else -1
        mode = unknown or tokenizer.default_unknown
        out = IdsWriter(staging / IDS_FILE, ids_dtype(tokenizer.vocab_size))
        reading = False

        def counted() -> Iterator[str]:
            nonlocal chars, reading
            stream = files.pieces(on_bytes=bar.advance)
            while True:
                reading = True
                piece = next(stream, None)
                reading = False
                if piece is None:
                    return
                chars += len(piece)
                yield piece

        try:
            with ByteProgress(f"encoding {what}", files.size, log=log, live=live) as bar:
                # Words are encoded with <unk> kept, to count them; --unknown skip drops them after.
                asked: Unknown | None = "unk" if unk_id >= 0 and mode == "skip" else unknown
                for ids in encode_pieces(tokenizer, counted(), unknown=asked):
                    if unk_id >= 0:
                        missing = ids == unk_id
                        unk += int(missing.sum())
                        if mode == "skip":
                            ids = ids[~missing]
                    out.write(ids)
        except RnnkitError as exc:
            if reading:
                raise
            raise (exc.within(what) if isinstance(exc, UnknownTokens) else RnnkitError(f"{what}: {exc}")) from None
        finally:
            out.close()
        ids = _map_ids(staging / IDS_FILE)
    except OSError as exc:
        raise RnnkitError(f"cannot write the ids of {what} to {staging}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the mapped pages outlive the unlinked file (POSIX)
    return EncodedText(ids=ids, chars=chars, unknown=unk)
