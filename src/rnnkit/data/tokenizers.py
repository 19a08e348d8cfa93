"""Tokenizers: text <-> token ids, saved inside every checkpoint.

A tokenizer knows nothing about models. It encodes a string into a numpy
array of ids (the narrowest unsigned dtype that fits the vocabulary, so a
large corpus stays small in memory and on disk) and decodes ids back into
text. ``to_dict``/``tokenizer_from_dict`` give the JSON form stored as
``tokenizer.json`` in a checkpoint.

Every level can lower-case (``lowercase=True``): the tokenizer then
lower-cases whatever it encodes, training text, primes and evaluation text
alike, and saves the setting in ``tokenizer.json``, so a checkpoint reads its
input the way it was trained. A ``tokenizer.json`` written before the setting
existed has no ``lowercase`` key and means ``False``.
"""

from __future__ import annotations

import json
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any, Literal, Protocol

import numpy as np

from rnnkit.errors import RnnkitError, UnknownTokens

Unknown = Literal["error", "skip", "unk"]  # raise, drop the piece, or map it to <unk>


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds ids below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise RnnkitError(f"vocabulary of {vocab_size} tokens is too large")


def byte_counts(raw: np.ndarray) -> np.ndarray:
    """How often each of the 256 values occurs in the uint8 array ``raw`` (256 int64 counts).

    ``np.bincount`` counts one element at a time; read as uint16 pairs it counts half
    as many, and the 65,536 pair counts fold back into bytes: 3-4x faster.
    """
    if len(raw) < 1 << 16 or not raw.flags.c_contiguous:
        return np.bincount(raw, minlength=256)
    even = len(raw) & ~1
    pairs = np.bincount(raw[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)  # one byte of each pair, then the other
    if even < len(raw):
        counts[raw[-1]] += 1
    return counts


def count_ids(ids: np.ndarray, vocab_size: int, *, slice_size: int = 1 << 22) -> list[int]:
    """How often each id occurs in ``ids``.

    Counted slice by slice: ``np.bincount`` first widens its input to int64, which for
    the uint8 ids of a 100 MB text would be an 800 MB temporary.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(ids), slice_size):
        part = ids[start : start + slice_size]
        if part.dtype == np.uint8:
            found = byte_counts(part)
            if found[vocab_size:].any():
                raise ValueError(f"ids of {vocab_size} tokens hold a larger id")
            counts += found[:vocab_size]
        else:
            counts += np.bincount(part, minlength=vocab_size)
    return counts.tolist()


class Tokenizer(Protocol):
    """What the rest of rnnkit needs from a tokenizer."""

    kind: str
    default_unknown: Unknown  # what encode does with unknown pieces unless told otherwise
    counts: list[int] | None  # how often each id occurs in the training text, if known

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, unknown: Unknown | None = None) -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token(self, i: int) -> str: ...

    def unknown_in(self, text: str) -> list[str]: ...

    def to_dict(self) -> dict[str, Any]: ...


def _show(pieces: Sequence[str], limit: int = 8) -> str:
    shown = " ".join(repr(c) for c in pieces[:limit])
    more = f" and {len(pieces) - limit} more" if len(pieces) > limit else ""
    return shown + more


def _counts_from(data: dict[str, Any], vocab_size: int) -> list[int] | None:
    counts = data.get("counts")
    if counts is None:
        return None
    if not isinstance(counts, list) or len(counts) != vocab_size:
        raise RnnkitError("tokenizer.json: 'counts' must list one count per token")
    return [int(c) for c in counts]


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of characters seen.

    With ``lowercase`` the text is lower-cased before encoding (the TF2 notes'
    ``text.lower()`` of nietzsche.txt), slice by slice as it is encoded.
    """

    kind = "char"
    default_unknown: Unknown = "error"

    def __init__(self, *, chars: Sequence[str], lowercase: bool = False, counts: list[int] | None = None) -> None:
        if not chars:
            raise RnnkitError("a character vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars):
            raise RnnkitError("a character vocabulary holds single characters only")
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise RnnkitError("a character vocabulary must not repeat characters")
        self.lowercase = lowercase
        self.counts = counts
        self.index = {c: i for i, c in enumerate(self.chars)}
        # The id of every code point up to the largest one known (-1: not in the vocabulary),
        # and one slot more that stands for every larger one: lets `encode` run as one
        # vectorised table lookup instead of a Python loop over millions of characters.
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._top = int(points.max()) + 1
        self._lut = np.full(self._top + 1, -1, dtype=np.int32)
        self._lut[points] = np.arange(len(points), dtype=np.int32)
        # ASCII text is encoded from its bytes (3x faster): the ASCII characters known, and
        # the id of each byte, as a `bytes.translate` table when every id fits in a byte.
        ascii_ids = np.full(256, -1, dtype=np.int64)
        low = points < 128
        ascii_ids[points[low]] = np.flatnonzero(low)
        self._ascii_known = bytes(points[low].astype(np.uint8))
        dtype = ids_dtype(len(points))
        self._ascii_table = bytes(np.maximum(ascii_ids, 0).astype(np.uint8)) if dtype == np.uint8 else None
        self._ascii_lut = np.maximum(ascii_ids, 0).astype(dtype)

    @classmethod
    def fit(cls, text: str, *, lowercase: bool = False) -> CharTokenizer:
        return cls.fit_stream([text], lowercase=lowercase)

    @classmethod
    def fit_stream(cls, pieces: Iterable[str], *, lowercase: bool = False) -> CharTokenizer:
        """The vocabulary of a text given as pieces (any cut): its characters, sorted by code point.

        With ``lowercase`` each piece is lower-cased first, as ``encode`` will read it.
        """
        seen = CharSet()
        for piece in pieces:
            for part in cls.as_read(piece, lowercase=lowercase):
                seen.add(part)
        if not seen.chars:
            raise RnnkitError("cannot build a vocabulary from an empty text")
        return cls(chars=seen.sorted(), lowercase=lowercase)

    @classmethod
    def as_read(cls, text: str, *, lowercase: bool) -> Iterator[str]:
        """``text`` in the very pieces ``encode`` reads (lower-cased when asked): what a vocabulary must hold."""
        return _slices(text, cls.ENCODE_SLICE, lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    # Characters encoded per slice: the working arrays (4 + 8 + 8 bytes per character) stay
    # around 20 MB however long the text, instead of 20 times the size of the text.
    ENCODE_SLICE = 1 << 20

    def encode(self, text: str, *, unknown: Unknown | None = None) -> np.ndarray:
        unknown = unknown or self.default_unknown
        dtype = ids_dtype(self.vocab_size)
        out = np.empty(len(text), dtype=dtype)
        filled = 0
        missing: set[str] = set()
        for piece in _slices(text, self.ENCODE_SLICE, self.lowercase):
            ids = self._ascii_ids(piece) if piece.isascii() else None
            if ids is None:
                points = np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")
                ids = self._lut[np.minimum(points, self._top)]
                known = ids >= 0
                if not known.all():
                    missing.update(chr(p) for p in np.unique(points[~known]))
                    ids = ids[known]
            if filled + len(ids) > len(out):  # lower() lengthened a few letters ("İ" -> "i̇")
                out = np.resize(out, max(2 * len(out), filled + len(ids)))
            out[filled : filled + len(ids)] = ids
            filled += len(ids)
        if missing and unknown != "skip":
            shown = sorted(missing)
            raise UnknownTokens(f"{len(shown)} character(s) not in the model's vocabulary: {_show(shown)}")
        return out[:filled]

    def _ascii_ids(self, piece: str) -> np.ndarray | None:
        """The ids of the ASCII string ``piece`` read byte by byte; None if it holds a character not known."""
        raw = piece.encode("ascii")
        if raw.translate(None, self._ascii_known):  # what is left once the known characters are deleted
            return None
        if self._ascii_table is not None:
            return np.frombuffer(raw.translate(self._ascii_table), dtype=np.uint8)
        return self._ascii_lut[np.frombuffer(raw, dtype=np.uint8)]

    def unknown_in(self, text: str) -> list[str]:
        """The distinct characters of ``text`` (lower-cased when the tokenizer lower-cases) not in the vocabulary."""
        if self.lowercase:
            text = text.lower()
        return sorted({c for c in set(text) if c not in self.index})

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def token(self, i: int) -> str:
        return self.chars[i]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars, "lowercase": self.lowercase, "counts": self.counts}


def char_pieces(text: str, *, lowercase: bool) -> Iterator[str]:
    """``text`` in the very pieces a :class:`CharTokenizer` reads (lower-cased when asked)."""
    return CharTokenizer.as_read(text, lowercase=lowercase)


def _slices(text: str, size: int, lowercase: bool) -> Iterator[str]:
    """``text`` in pieces of ``size`` characters, each lower-cased when asked."""
    for start in range(0, len(text), size):
        piece = text[start : start + size]
        yield piece.lower() if lowercase else piece


class CharSet:
    """The distinct characters of a text seen piece by piece, and how often each occurs (a count per code point, 9 MB)."""

    def __init__(self) -> None:
        self._counts = np.zeros(0x110000, dtype=np.int64)
        self.chars = 0  # characters seen

    def add(self, piece: str) -> None:
        if piece.isascii():  # a flag of the string: no scan
            self._counts[:256] += byte_counts(np.frombuffer(piece.encode("ascii"), dtype=np.uint8))
        else:
            found = np.bincount(np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype="<u4"))
            self._counts[: len(found)] += found
        self.chars += len(piece)

    def sorted(self) -> list[str]:
        """The characters seen, sorted as ``sorted(set(text))`` sorts them (by code point)."""
        return [chr(p) for p in np.flatnonzero(self._counts)]

    def counts(self) -> list[int]:
        """How often each character of :meth:`sorted` occurs, in that order."""
        return self._counts[self._counts > 0].tolist()


# Numbers with inner separators ("3.5", "1,000"), words (with inner apostrophes as in
# "don't"), or single punctuation marks; whitespace only separates.
_WORD_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’]\w+)*|[^\w\s]")
# Stands for a line end when <eos> is kept: a NUL never occurs in a text rnnkit reads
# (it marks a binary file), and as a mark of its own it is one piece, as "<eos>" is.
_EOS_MARK = "\x00"


class _PieceIds:
    """The ids of ``_WORD_RE.findall(text)``, in order, with ``lookup(piece)`` giving one piece's id.

    The same pieces as the regex over the whole text, found faster: no piece
    spans whitespace, so the text is cut at whitespace (``str.split``, the
    same whitespace as the regex's ``\\s``) and each distinct cut token is
    taken apart once: a plain run of word characters (``str.isalnum`` is the
    regex's ``\\w`` without ``_``) is one piece, anything else goes through the
    regex. The pieces of the tokens seen so far are kept (up to ``CACHE``
    tokens, then forgotten and found again), so a token costs a dict lookup.
    New tokens are taken apart in order of first occurrence, so ``lookup``
    meets new pieces in order of first occurrence.
    """

    CACHE = 1 << 20  # distinct tokens remembered, ~150 MB at most

    def __init__(self, lookup: Callable[[str], int]) -> None:
        self.lookup = lookup
        self._forget()

    def _forget(self) -> None:
        self.table: dict[str, int] = {}  # token -> its row in starts / sizes
        self.starts = array("q")  # where each token's piece ids begin in flat
        self.sizes = array("q")  # how many pieces each token has
        self.flat = array("q")  # the piece ids of every token, one after the other

    def __call__(self, text: str) -> np.ndarray:
        tokens = text.split()
        if not tokens:
            return np.zeros(0, dtype=np.int64)
        if len(self.table) > self.CACHE:
            self._forget()
        table = self.table
        rows = np.fromiter(map(table.get, tokens, repeat(-1, len(tokens))), dtype=np.int64, count=len(tokens))
        new = np.flatnonzero(rows < 0)
        if len(new):
            fresh = [tokens[i] for i in new.tolist()]
            for token in dict.fromkeys(fresh):  # in order of first occurrence
                self.starts.append(len(self.flat))
                if token.isalnum():
                    self.flat.append(self.lookup(token))
                    self.sizes.append(1)
                else:
                    pieces = _WORD_RE.findall(token)
                    self.flat.extend(map(self.lookup, pieces))
                    self.sizes.append(len(pieces))
                table[token] = len(table)
            rows[new] = [table[token] for token in fresh]
        starts = np.frombuffer(self.starts, dtype=np.int64)
        sizes = np.frombuffer(self.sizes, dtype=np.int64)
        flat = np.frombuffer(self.flat, dtype=np.int64)
        n = sizes[rows]  # pieces per token occurrence
        if (n == 1).all():
            return flat[starts[rows]]
        ends = np.cumsum(n)
        within = np.arange(int(ends[-1]), dtype=np.int64) - np.repeat(ends - n, n)
        return flat[np.repeat(starts[rows], n) + within]


def _piece_ids(text: str, lookup: Callable[[str], int]) -> np.ndarray:
    """:class:`_PieceIds` for one text."""
    return _PieceIds(lookup)(text)


class WordCounter:
    """Pass one of a word vocabulary: every piece of a text given in pieces, as a provisional id.

    Provisional ids number the distinct pieces in order of first occurrence,
    so ranking by count with ties in id order is the ranking
    :meth:`WordTokenizer.fit` promises; :meth:`tokenizer` gives the
    vocabulary and the table that maps provisional ids to final ones. Feed
    pieces cut after whitespace (:func:`cut_after_space`).
    """

    def __init__(self, *, lowercase: bool = False, eos: bool = False) -> None:
        self.lowercase = lowercase
        self.eos = eos
        self.index: dict[str, int] = {}
        self.counts = np.zeros(0, dtype=np.int64)
        self._plain = _PieceIds(self._lookup)
        self._marked = _PieceIds(self._lookup_marked)

    def _lookup(self, piece: str) -> int:
        i = self.index.get(piece)
        if i is None:
            i = self.index[piece] = len(self.index)
        return i

    def _lookup_marked(self, piece: str) -> int:
        return self._lookup(WordTokenizer.EOS if piece == _EOS_MARK else piece)

    def add(self, text: str) -> np.ndarray:
        """The provisional ids (uint32) of ``text``'s pieces, line ends as ``<eos>`` where kept."""
        if self.lowercase:
            text = text.lower()
        if not self.eos:
            ids = self._plain(text)
        elif _EOS_MARK not in text:
            ids = self._marked(text.replace("\n", f" {_EOS_MARK} "))
        else:  # a NUL of the text's own is a piece like any mark: go line by line
            lines = text.split("\n")
            parts = []
            for n, line in enumerate(lines):
                parts.append(self._plain(line))
                if n < len(lines) - 1:
                    parts.append(np.array([self._lookup(WordTokenizer.EOS)], dtype=np.int64))
            ids = np.concatenate(parts)
        if len(self.counts) < len(self.index):
            self.counts = np.concatenate([self.counts, np.zeros(len(self.index) - len(self.counts), np.int64)])
        self.counts += np.bincount(ids, minlength=len(self.counts))
        return ids.astype(np.uint32)

    def tokenizer(self, *, min_freq: int = 1, max_vocab: int = 0) -> tuple[WordTokenizer, np.ndarray]:
        """The vocabulary, and the final id of every provisional id (``<unk>`` for words left out)."""
        eos_id = self.index.get(WordTokenizer.EOS) if self.eos else None
        counts = self.counts.copy()
        if eos_id is not None:
            counts[eos_id] = -1  # <eos> is not ranked: it comes after the words
        if not (counts > 0).any():
            raise RnnkitError("the text has no words to build a vocabulary from")
        # Stable sort: ties keep the order of first occurrence.
        order = np.argsort(-counts, kind="stable")
        order = order[counts[order] >= max(min_freq, 1)]
        specials = [WordTokenizer.UNK] + ([WordTokenizer.EOS] if self.eos else [])
        if max_vocab:
            order = order[: max(0, max_vocab - len(specials))]
        if not len(order):
            raise RnnkitError(
                f"no word occurs at least {min_freq} times (--min-freq), so the vocabulary would be empty; "
                "lower --min-freq or use a longer text"
            )
        pieces = list(self.index)
        words = [pieces[i] for i in order.tolist()]
        final = np.full(len(pieces), len(words), dtype=np.int64)  # <unk> comes right after the words
        final[order] = np.arange(len(words))
        if eos_id is not None:
            final[eos_id] = len(words) + 1
        tok = WordTokenizer(words=words + specials, lowercase=self.lowercase, eos=self.eos)
        return tok, final


def cut_after_space(pieces: Iterable[str]) -> Iterator[str]:
    """The same text re-cut so that every piece but the last ends in a space or a line end.

    A word tokenizer can then handle the pieces one by one: no word or
    number is cut in two, and ``str.lower`` sees the same context.
    """
    held = ""
    for piece in pieces:
        piece = held + piece
        cut = max(piece.rfind(" "), piece.rfind("\n")) + 1
        held = piece[cut:]
        if cut:
            yield piece[:cut]
    if held:
        yield held
_NO_SPACE_BEFORE = set(",.;:!?)]}%…") | {"'s", "n't"}
_NO_SPACE_AFTER = set("([{$#")
_JOINERS = set("-/'’")


class WordTokenizer:
    """Words and punctuation marks, ranked by frequency (ties: first occurrence first).

    ``<unk>`` (and ``<eos>`` when line ends are kept) come after the ranked
    words, so on the fable ``,`` and ``the`` get ids 0 and 1 as in the classic
    example. Decoding re-attaches punctuation: ``council , to`` reads ``council, to``.
    """

    kind = "word"
    default_unknown: Unknown = "unk"
    UNK = "<unk>"
    EOS = "<eos>"

    def __init__(self, *, words: Sequence[str], lowercase: bool = False, eos: bool = False,
                 counts: list[int] | None = None) -> None:
        self.words = list(words)
        if self.UNK not in self.words:
            raise RnnkitError("a word vocabulary must contain <unk>")
        if len(set(self.words)) != len(self.words):
            raise RnnkitError("a word vocabulary must not repeat words")
        self.lowercase = lowercase
        self.eos = eos
        self.counts = counts
        self.index = {w: i for i, w in enumerate(self.words)}
        self.unk_id = self.index[self.UNK]
        # Made on first use by `encode`: the pieces of the tokens seen so far.
        self._pieces: _PieceIds | None = None
        self._marked: _PieceIds | None = None

    def split(self, text: str) -> list[str]:
        """Pre-tokenize: the word and punctuation pieces of ``text`` (and <eos> per line)."""
        if self.lowercase:
            text = text.lower()
        if not self.eos:
            return _WORD_RE.findall(text)
        pieces: list[str] = []
        lines = text.split("\n")
        for n, line in enumerate(lines):
            pieces += _WORD_RE.findall(line)
            if n < len(lines) - 1:  # a line end, not text after the last newline
                pieces.append(self.EOS)
        return pieces

    @classmethod
    def fit(cls, text: str, *, lowercase: bool = False, eos: bool = False, min_freq: int = 1,
            max_vocab: int = 0) -> WordTokenizer:
        """Rank the words of ``text`` by count (ties: first occurrence first); see :class:`WordCounter`."""
        counter = WordCounter(lowercase=lowercase, eos=eos)
        counter.add(text)
        return counter.tokenizer(min_freq=min_freq, max_vocab=max_vocab)[0]

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def _lookup(self, piece: str) -> int:
        return self.index.get(piece, -1)

    def _lookup_marked(self, piece: str) -> int:
        return self.index.get(self.EOS if piece == _EOS_MARK else piece, -1)

    def _ids(self, text: str) -> np.ndarray:
        """The id of every piece of ``split(text)``, -1 for pieces not in the vocabulary (int64)."""
        if self.lowercase:
            text = text.lower()
        if not self.eos:
            if self._pieces is None:
                self._pieces = _PieceIds(self._lookup)
            return self._pieces(text)
        if _EOS_MARK not in text:
            if self._marked is None:
                self._marked = _PieceIds(self._lookup_marked)
            return self._marked(text.replace("\n", f" {_EOS_MARK} "))
        return np.array([self.index.get(p, -1) for p in self.split(text)], dtype=np.int64)

    def encode(self, text: str, *, unknown: Unknown | None = None) -> np.ndarray:
        unknown = unknown or self.default_unknown
        ids = self._ids(text)
        missing = ids < 0
        if missing.any():
            if unknown == "error":
                raise UnknownTokens(f"word(s) not in the model's vocabulary: {_show(self.unknown_in(text))}")
            ids = ids[~missing] if unknown == "skip" else np.where(missing, self.unk_id, ids)
        return ids.astype(ids_dtype(self.vocab_size))

    def unknown_in(self, text: str) -> list[str]:
        seen: dict[str, None] = {}
        for p in self.split(text):
            if p not in self.index:
                seen[p] = None
        return list(seen)

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        prev = None
        open_quote = False
        for i in ids:
            word = self.words[int(i)]
            if word == self.EOS:
                out.append("\n")
                prev = "\n"
                continue
            space = prev is not None and prev != "\n"
            if word in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
                space = False
            if word in _JOINERS or prev in _JOINERS:
                space = False
            if word == '"':
                # A straight double quote opens or closes: no space inside the quotes.
                if open_quote:
                    space = False
                open_quote = not open_quote
            elif prev == '"' and open_quote:
                space = False
            out.append((" " if space else "") + word)
            prev = word
        return "".join(out)

    def token(self, i: int) -> str:
        return self.words[i]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "words": self.words, "lowercase": self.lowercase, "eos": self.eos,
                "counts": self.counts}

    def rules(self) -> dict[str, Any]:
        """How :meth:`split` and :meth:`decode` work, as data, for a driver written in another language.

        ``split_pattern`` is the regular expression (Python syntax) whose matches
        in each line are the pieces; decoding puts a space between two words
        except where these sets say not to (see :meth:`decode`).
        """
        return {"split_pattern": _WORD_RE.pattern, "eos": self.eos, "unk_id": self.unk_id,
                "eos_id": self.index.get(self.EOS), "no_space_before": sorted(_NO_SPACE_BEFORE),
                "no_space_after": sorted(_NO_SPACE_AFTER), "joiners": sorted(_JOINERS)}


class BPETokenizer:
    """Byte-level BPE trained on the corpus with the `tokenizers` library: no unknowns.

    Lossless unless ``lowercase``: then every text is lower-cased (Python's
    ``str.lower``, as at the other levels) before it is split into pieces.
    """

    kind = "bpe"
    default_unknown: Unknown = "error"

    def __init__(self, *, hf_tokenizer: Any, lowercase: bool = False, counts: list[int] | None = None) -> None:
        self.hf = hf_tokenizer
        self.lowercase = lowercase
        self.counts = counts
        self._vocab = {i: t for t, i in self.hf.get_vocab().items()}
        self._fast: Any = None  # the FastByteLevelBPE, made on first need (False: this tokenizer has none)

    @classmethod
    def fit(cls, text: str, *, vocab_size: int = 2000, lowercase: bool = False) -> BPETokenizer:
        if not text.strip():
            raise RnnkitError("cannot train BPE on an empty text")
        return cls.fit_stream([text], vocab_size=vocab_size, lowercase=lowercase)

    @classmethod
    def fit_stream(cls, pieces: Iterable[str], *, vocab_size: int = 2000, lowercase: bool = False) -> BPETokenizer:
        """Train on a text given as pieces (any cut): the trainer reads it re-cut as :func:`_chunks` cuts it."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise RnnkitError(f"--vocab-size must be at least {len(alphabet) + 1} for byte-level BPE, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        chunks = _stream_chunks(pieces)
        hf.train_from_iterator((c.lower() for c in chunks) if lowercase else chunks, trainer=trainer)
        return cls(hf_tokenizer=hf, lowercase=lowercase)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, *, unknown: Unknown | None = None) -> np.ndarray:
        dtype = ids_dtype(self.vocab_size)
        if not text:
            return np.zeros(0, dtype=dtype)
        # Encode in line-aligned chunks: the Rust encoder then runs in parallel and
        # never holds one giant string's offsets in memory.
        return self.encode_chunks(list(_chunks(text)))

    def encode_chunks(self, chunks: list[str]) -> np.ndarray:
        """The ids of the chunks of a text (as :func:`_chunks` cuts it), concatenated (lower-cased when asked)."""
        if self.lowercase:
            chunks = [c.lower() for c in chunks]
        if sum(map(len, chunks)) >= _FAST_MIN_CHARS and self._fast_encoder():
            return self._fast.encode_chunks(chunks, ids_dtype(self.vocab_size))
        return self._hf_ids(chunks)

    def encode_batches(self, batches: Iterable[list[str]]) -> Iterator[np.ndarray]:
        """:meth:`encode_chunks` of each batch of chunks, in order (a long text's stream)."""
        fast = self._fast_encoder()
        if self.lowercase:
            batches = ([c.lower() for c in chunks] for chunks in batches)
        if fast:
            yield from fast.encode_batches(batches, ids_dtype(self.vocab_size))
            return
        for chunks in batches:
            yield self._hf_ids(chunks)

    def _fast_encoder(self) -> Any:
        if self._fast is None:
            from rnnkit.data.bpe_fast import FastByteLevelBPE

            self._fast = FastByteLevelBPE.for_tokenizer(self.hf) or False
        return self._fast

    def _hf_ids(self, chunks: list[str]) -> np.ndarray:
        dtype = ids_dtype(self.vocab_size)
        parts = self.hf.encode_batch(chunks, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=dtype) for e in parts]) if parts else np.zeros(0, dtype)

    def unknown_in(self, text: str) -> list[str]:
        return []  # every byte has a token

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token(self, i: int) -> str:
        return self._vocab[i]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "tokenizer": json.loads(self.hf.to_str()), "lowercase": self.lowercase,
                "counts": self.counts}


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of about ``size`` characters that end at a line end, so no word is cut.

    A text with no line end for ``16 * size`` characters is cut after a space instead, and
    where there is none either, after ``16 * size`` characters: one giant piece would make
    BPE training and encoding slow and memory-hungry. Byte-level BPE decodes the pieces
    back to exactly the text whatever the cut.
    """
    return _stream_chunks([text], size)


def _stream_chunks(pieces: Iterable[str], size: int = 1 << 16) -> Iterator[str]:
    """:func:`_chunks` of the concatenation of ``pieces``, never holding more than ``17 * size`` characters.

    Where the text is cut depends only on the next ``16 * size`` characters
    and on whether the text goes on beyond them, so a buffer of a little more
    than that finds the same cuts as the whole text would.
    """
    limit = 16 * size
    source = iter(pieces)
    buf = ""
    start = 0
    ended = False
    while True:
        while not ended and len(buf) - start <= limit:
            piece = next(source, None)
            if piece is None:
                ended = True
            else:
                buf = buf[start:] + piece
                start = 0
        if start >= len(buf):
            return
        end = buf.find("\n", start + size, start + limit)
        if end < 0 and start + limit < len(buf):
            end = buf.rfind(" ", start + size, start + limit)
            end = start + limit - 1 if end < 0 else end
        end = len(buf) if end < 0 else end + 1
        yield buf[start:end]
        start = end


def _flag(data: dict[str, Any], key: str) -> bool:
    """A true/false setting of tokenizer.json; absent (a file from before the setting) means false."""
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise RnnkitError(f"tokenizer.json: {key!r} must be true or false, got {value!r}")
    return value


# Chunks of about 64k characters handed to the BPE encoder at a time (bpe_fast's arrays take ~60 bytes a
# character of the batch; `tokenizers`' Encoding ~100 bytes a token until it is read).
_BPE_BATCH = 16
# Texts at least this long are encoded by bpe_fast (the same ids, faster where words repeat).
_FAST_MIN_CHARS = 1 << 16


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encode_pieces(tokenizer: Tokenizer, pieces: Iterable[str], *, unknown: Unknown | None = None) -> Iterator[np.ndarray]:
    """``tokenizer.encode`` of a text given as pieces (any cut), as a stream of id arrays.

    The arrays concatenate to exactly ``tokenizer.encode("".join(pieces))``:
    words are encoded from pieces re-cut after whitespace, BPE from the
    pieces :func:`_chunks` would cut. With ``unknown="error"`` the error
    names what the first piece with unknown tokens lacks.
    """
    if isinstance(tokenizer, BPETokenizer):
        yield from tokenizer.encode_batches(_batched(_stream_chunks(pieces), _BPE_BATCH))
        return
    if isinstance(tokenizer, WordTokenizer):
        pieces = cut_after_space(pieces)
    for piece in pieces:
        yield tokenizer.encode(piece, unknown=unknown)


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its saved JSON form."""
    kind = data.get("type")
    try:
        if kind == "char":
            chars = data.get("chars")
            if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
                raise RnnkitError("tokenizer.json: 'chars' must be a list of characters")
            return CharTokenizer(chars=chars, lowercase=_flag(data, "lowercase"), counts=_counts_from(data, len(chars)))
        if kind == "word":
            words = data.get("words")
            if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                raise RnnkitError("tokenizer.json: 'words' must be a list of strings")
            return WordTokenizer(words=words, lowercase=_flag(data, "lowercase"), eos=_flag(data, "eos"),
                                 counts=_counts_from(data, len(words)))
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_str(json.dumps(data["tokenizer"]))
            return BPETokenizer(hf_tokenizer=hf, lowercase=_flag(data, "lowercase"),
                                counts=_counts_from(data, hf.get_vocab_size()))
    except RnnkitError:
        raise
    except Exception as exc:  # anything else in a hand-edited or foreign file
        raise RnnkitError(f"tokenizer.json is damaged: {exc}") from None
    raise RnnkitError(f"tokenizer.json: unknown tokenizer type {kind!r}")


def build_tokenizer(config: Any, text: str) -> Tokenizer:
    """Fit the tokenizer that ``config`` (a DataConfig) asks for on the training text."""
    level = config.level
    if level == "char":
        return CharTokenizer.fit(text, lowercase=config.lowercase)
    if level == "word":
        return WordTokenizer.fit(text, lowercase=config.lowercase, eos=config.eos, min_freq=config.min_freq,
                                 max_vocab=config.max_vocab)
    if level == "bpe":
        return BPETokenizer.fit(text, vocab_size=config.vocab_size, lowercase=config.lowercase)
    raise RnnkitError(f"unknown tokenization level {level!r} (choose: char, word, bpe)")
