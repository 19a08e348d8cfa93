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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from rnnkit.errors import RnnkitError

Unknown = Literal["error", "skip", "unk"]  # raise, drop the piece, or map it to <unk>


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds ids below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise RnnkitError(f"vocabulary of {vocab_size} tokens is too large")


def count_ids(ids: np.ndarray, vocab_size: int, *, slice_size: int = 1 << 22) -> list[int]:
    """How often each id occurs in ``ids``.

    Counted slice by slice: ``np.bincount`` first widens its input to int64, which for
    the uint8 ids of a 100 MB text would be an 800 MB temporary.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(ids), slice_size):
        counts += np.bincount(ids[start : start + slice_size], minlength=vocab_size)
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
        # Code points sorted, with the id each maps to: lets `encode` run as one
        # vectorised searchsorted instead of a Python loop over millions of chars.
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        order = np.argsort(points)
        self._points = points[order]
        self._ids = order.astype(np.int64)

    @classmethod
    def fit(cls, text: str, *, lowercase: bool = False) -> CharTokenizer:
        if not text:
            raise RnnkitError("cannot build a vocabulary from an empty text")
        seen: set[str] = set()
        for piece in _slices(text, cls.ENCODE_SLICE, lowercase):  # the very pieces `encode` will see
            seen.update(piece)
        return cls(chars=sorted(seen), lowercase=lowercase)

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
            points = np.frombuffer(piece.encode("utf-32-le"), dtype="<u4")
            points = points.astype(np.int64)
            pos = np.clip(np.searchsorted(self._points, points), 0, len(self._points) - 1)
            known = self._points[pos] == points
            if not known.all():
                missing.update(chr(p) for p in np.unique(points[~known]))
                pos = pos[known]
            if filled + len(pos) > len(out):  # lower() lengthened a few letters ("İ" -> "i̇")
                out = np.resize(out, max(2 * len(out), filled + len(pos)))
            out[filled : filled + len(pos)] = self._ids[pos]
            filled += len(pos)
        if missing and unknown != "skip":
            shown = sorted(missing)
            raise RnnkitError(
                f"{len(shown)} character(s) not in the model's vocabulary: {_show(shown)}; "
                "remove them or pass --unknown skip"
            )
        return out[:filled]

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


def _slices(text: str, size: int, lowercase: bool) -> Iterator[str]:
    """``text`` in pieces of ``size`` characters, each lower-cased when asked."""
    for start in range(0, len(text), size):
        piece = text[start : start + size]
        yield piece.lower() if lowercase else piece


# Numbers with inner separators ("3.5", "1,000"), words (with inner apostrophes as in
# "don't"), or single punctuation marks; whitespace only separates.
_WORD_RE = re.compile(r"\d+(?:[.,]\d+)+|\w+(?:['’]\w+)*|[^\w\s]")
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
        probe = cls(words=[cls.UNK], lowercase=lowercase, eos=eos)
        pieces = [p for p in probe.split(text) if p != cls.EOS]
        if not pieces:
            raise RnnkitError("the text has no words to build a vocabulary from")
        # Counter keeps first-insertion order and sorted() is stable: ties stay in order of first use.
        ranked = sorted(Counter(pieces).items(), key=lambda kv: -kv[1])
        specials = [cls.UNK] + ([cls.EOS] if eos else [])
        words = [w for w, c in ranked if c >= min_freq]
        if max_vocab:
            words = words[: max(0, max_vocab - len(specials))]
        if not words:
            raise RnnkitError(
                f"no word occurs at least {min_freq} times (--min-freq), so the vocabulary would be empty; "
                "lower --min-freq or use a longer text"
            )
        return cls(words=words + specials, lowercase=lowercase, eos=eos)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str, *, unknown: Unknown | None = None) -> np.ndarray:
        unknown = unknown or self.default_unknown
        pieces = self.split(text)
        ids = [self.index.get(p, -1) for p in pieces]
        if unknown == "error" and -1 in ids:
            raise RnnkitError(f"word(s) not in the model's vocabulary: {_show(self.unknown_in(text))}")
        if unknown == "skip":
            ids = [i for i in ids if i >= 0]
        else:
            ids = [self.unk_id if i < 0 else i for i in ids]
        return np.asarray(ids, dtype=ids_dtype(self.vocab_size))

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

    @classmethod
    def fit(cls, text: str, *, vocab_size: int = 2000, lowercase: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not text.strip():
            raise RnnkitError("cannot train BPE on an empty text")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise RnnkitError(f"--vocab-size must be at least {len(alphabet) + 1} for byte-level BPE, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
        chunks = (c.lower() for c in _chunks(text)) if lowercase else _chunks(text)
        hf.train_from_iterator(chunks, trainer=trainer)
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
        chunks = [c.lower() for c in _chunks(text)] if self.lowercase else list(_chunks(text))
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
    start = 0
    limit = 16 * size
    while start < len(text):
        end = text.find("\n", start + size, start + limit)
        if end < 0 and start + limit < len(text):
            end = text.rfind(" ", start + size, start + limit)
            end = start + limit - 1 if end < 0 else end
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _flag(data: dict[str, Any], key: str) -> bool:
    """A true/false setting of tokenizer.json; absent (a file from before the setting) means false."""
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise RnnkitError(f"tokenizer.json: {key!r} must be true or false, got {value!r}")
    return value


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
