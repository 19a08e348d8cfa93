"""Tokenizers: text <-> token ids, saved inside every checkpoint.

A tokenizer knows nothing about models. It encodes a string into a numpy
array of ids (the narrowest unsigned dtype that fits the vocabulary, so a
large corpus stays small in memory and on disk) and decodes ids back into
text. ``to_dict``/``tokenizer_from_dict`` give the JSON form stored as
``tokenizer.json`` in a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from rnnkit.errors import RnnkitError

Unknown = Literal["error", "skip"]


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds ids below ``vocab_size``."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise RnnkitError(f"vocabulary of {vocab_size} tokens is too large")


class Tokenizer(Protocol):
    """What the rest of rnnkit needs from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, *, unknown: Unknown = "error") -> np.ndarray: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


def _show(chars: Sequence[str], limit: int = 8) -> str:
    shown = " ".join(repr(c) for c in chars[:limit])
    more = f" and {len(chars) - limit} more" if len(chars) > limit else ""
    return shown + more


class CharTokenizer:
    """One token per Unicode character; the vocabulary is the sorted set of characters seen."""

    kind = "char"

    def __init__(self, *, chars: Sequence[str]) -> None:
        if not chars:
            raise RnnkitError("a character vocabulary needs at least one character")
        if any(len(c) != 1 for c in chars):
            raise RnnkitError("a character vocabulary holds single characters only")
        self.chars = list(chars)
        if len(set(self.chars)) != len(self.chars):
            raise RnnkitError("a character vocabulary must not repeat characters")
        self.index = {c: i for i, c in enumerate(self.chars)}
        # Code points sorted, with the id each maps to: lets `encode` run as one
        # vectorised searchsorted instead of a Python loop over millions of chars.
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        order = np.argsort(points)
        self._points = points[order]
        self._ids = order.astype(np.int64)

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        if not text:
            raise RnnkitError("cannot build a vocabulary from an empty text")
        return cls(chars=sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, unknown: Unknown = "error") -> np.ndarray:
        dtype = ids_dtype(self.vocab_size)
        if not text:
            return np.zeros(0, dtype=dtype)
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        pos = np.clip(np.searchsorted(self._points, points), 0, len(self._points) - 1)
        known = self._points[pos] == points
        if not known.all():
            missing = sorted({chr(p) for p in points[~known]})
            if unknown == "error":
                raise RnnkitError(
                    f"{len(missing)} character(s) not in the model's vocabulary: {_show(missing)}; "
                    "remove them or pass --unknown skip"
                )
            pos = pos[known]
        return self._ids[pos].astype(dtype)

    def unknown_chars(self, text: str) -> list[str]:
        """The distinct characters of ``text`` that the vocabulary lacks, sorted."""
        return sorted({c for c in set(text) if c not in self.index})

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "chars": self.chars}


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its saved JSON form."""
    kind = data.get("type")
    if kind == "char":
        chars = data.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
            raise RnnkitError("tokenizer.json: 'chars' must be a list of characters")
        return CharTokenizer(chars=chars)
    raise RnnkitError(f"tokenizer.json: unknown tokenizer type {kind!r}")


def build_tokenizer(level: str, text: str) -> Tokenizer:
    """Fit the tokenizer for ``level`` on the training text."""
    if level == "char":
        return CharTokenizer.fit(text)
    raise RnnkitError(f"unknown tokenization level {level!r} (choose: char)")
