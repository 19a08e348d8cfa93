"""Byte-level BPE encoding of long texts at numpy speed, with exactly the `tokenizers` library's ids.

The `tokenizers` encoder costs ~2-4 MB/s on this kind of machine: most of it
is the pre-tokenizer (GPT-2's regular expression) and building an Encoding
(offsets, token strings) per chunk. A corpus, though, repeats its words. This
encoder splits a batch of chunks into the regular expression's pieces with
array operations on the code points, recognises pieces it has seen before by
a hash that is then checked character by character against the stored piece,
and asks `tokenizers` only for the ids of pieces it has not met yet. The ids
are those `tokenizers` gives the same chunks; where that cannot be vouched for
(a code point this Python's Unicode tables do not know, a hash that matched a
different piece) the batch is encoded by `tokenizers` itself.

The pieces are the matches, in each chunk, of
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``,
which come down to runs of one class of characters (letter, number, space,
other) with three corrections: a run of white space followed by more text in
the chunk gives its last character to what follows when that is a plain space
(`` ?X+``) and otherwise keeps it apart (``\\s+(?!\\S)``); and an apostrophe
that starts a piece takes the letters of a contraction with it.
"""

from __future__ import annotations

import functools
import json
import threading
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

_L, _N, _O, _W, _UNKNOWN = 0, 1, 2, 3, 4
# Oniguruma's \s for Unicode: 0009-000D, 0085 and the Zs, Zl, Zp categories (the White_Space property).
_SPACE_CONTROLS = (0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x85)
_APOSTROPHE = 0x27
_ONE_LETTER = tuple(ord(c) for c in "stmd")
_TWO_LETTERS = tuple((ord(a), ord(b)) for a, b in ("re", "ve", "ll"))
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
# Pieces kept before the store is emptied (and built up again): bounds the memory of a text with no repeats.
MAX_PIECES = 1_000_000
# New pieces are sent to `tokenizers` in texts of this many.
_GROUP = 1 << 14


_GROUPS = {"L": _L, "N": _N, "Z": _O, "C": _O, "M": _O, "P": _O, "S": _O}
_UNSEEN = 255


def _class_of(code: int) -> int:
    if code in _SPACE_CONTROLS:
        return _W
    cat = unicodedata.category(chr(code))
    return _UNKNOWN if cat == "Cn" else _W if cat in ("Zs", "Zl", "Zp") else _GROUPS[cat[0]]


class CharClasses:
    """The class of each code point: letter, number, white space, other, or unknown (unassigned here).

    Looked up in ``unicodedata`` the first time a code point is met and kept in a
    table of all 1,114,112: a text meets a few thousand, and classing them all
    up front would cost ~0.7 s of every process that encodes.
    """

    def __init__(self) -> None:
        self._table = np.full(0x110000, _UNSEEN, dtype=np.uint8)
        self._lock = threading.Lock()

    def of(self, cp: np.ndarray) -> np.ndarray:
        """The classes of the code points ``cp`` (uint8, one per code point)."""
        classes = self._table[cp]
        if len(classes) and classes.max() == _UNSEEN:
            with self._lock:
                new = np.unique(cp[classes == _UNSEEN])
                self._table[new] = [_class_of(code) for code in new.tolist()]
            classes = self._table[cp]
        return classes


@functools.cache
def char_classes() -> np.ndarray:
    """The class of every code point (uint8), as :class:`CharClasses` gives it."""
    return CharClasses().of(np.arange(0x110000, dtype=np.uint32))


def supports(hf_config: dict[str, Any]) -> bool:
    """Whether a tokenizer (its JSON form) is the byte-level BPE this encoder reproduces."""
    pre = hf_config.get("pre_tokenizer") or {}
    model = hf_config.get("model") or {}
    return (hf_config.get("normalizer") is None and hf_config.get("post_processor") is None
            and not hf_config.get("added_tokens")
            and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True
            and model.get("type") == "BPE" and model.get("dropout") is None
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))


def piece_starts(cp: np.ndarray, classes: np.ndarray, chunk_starts: np.ndarray) -> np.ndarray:
    """Where each piece begins in ``cp`` (the code points of chunks laid end to end), ascending.

    ``classes`` holds each code point's class; ``chunk_starts`` where each chunk
    begins (0 first). No piece crosses from one chunk into the next.
    """
    n = len(cp)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.empty(n + 1, dtype=bool)
    start[0] = start[n] = True
    np.not_equal(classes[1:], classes[:-1], out=start[1:n])
    chunk_start = np.zeros(n + 1, dtype=bool)
    chunk_start[chunk_starts] = True
    chunk_start[n] = True
    start |= chunk_start
    # White space followed by more of the same chunk: its last character goes with the next piece if it
    # is a plain space, else stands alone (a no-op for a run of one).
    space = classes == _W
    ends = np.flatnonzero(space[:-1] & ~space[1:]) + 1
    ends = ends[~chunk_start[ends]]
    plain = cp[ends - 1] == 0x20
    start[ends[plain]] = False
    start[ends - 1] = True
    # Contractions: an apostrophe that begins a piece, followed in its chunk by s, t, m, d, re, ve or ll.
    apos = np.flatnonzero((cp[:-1] == _APOSTROPHE) & start[:n - 1] & ~chunk_start[1:n])
    if len(apos):
        nxt = cp[apos + 1]
        one = np.isin(nxt, _ONE_LETTER)
        two = np.zeros(len(apos), dtype=bool)
        room = (apos + 2 < n)
        room[room] &= ~chunk_start[apos[room] + 2]
        third = np.zeros(len(apos), dtype=cp.dtype)
        third[room] = cp[apos[room] + 2]
        for a, b in _TWO_LETTERS:
            two |= room & (nxt == a) & (third == b)
        for positions, width in ((apos[one], 2), (apos[two], 3)):
            start[positions + 1] = False
            start[positions + width] = True
    return np.flatnonzero(start[:n])


def _mix(x: np.ndarray) -> np.ndarray:
    """A bijective scramble of uint64 values (SplitMix64's finaliser), then bit 0 set: 0 marks a free slot."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    x |= np.uint64(1)
    return x


class _Powers:
    """BASE**i and its inverse modulo 2**64 for i < n, grown on demand."""

    def __init__(self) -> None:
        self._both = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        up, down = self._both  # one read: a thread that grows them meanwhile replaces the pair whole
        if len(up) < n:
            size = max(n, 2 * len(up))
            inverse = pow(_BASE, -1, 1 << 64)
            up = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, _BASE, dtype=np.uint64))])
            down = np.concatenate([[np.uint64(1)], np.cumprod(np.full(size - 1, inverse, dtype=np.uint64))])
            self._both = (up, down)
        return up[:n], down[:n]


class _HashTable:
    """uint64 keys (never 0) to int64 values, open addressing with linear probing, in numpy arrays."""

    def __init__(self, bits: int = 16) -> None:
        self.bits = bits
        self.keys = np.zeros(1 << bits, dtype=np.uint64)
        self.values = np.zeros(1 << bits, dtype=np.int64)
        self.size = 0

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        return (keys >> np.uint64(64 - self.bits)).astype(np.int64)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where it is absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        slots = self._slots(keys)
        mask = (1 << self.bits) - 1
        while len(todo):
            found = self.keys[slots]
            hit = found == keys[todo]
            out[todo[hit]] = self.values[slots[hit]]
            going = ~hit & (found != 0)
            todo, slots = todo[going], (slots[going] + 1) & mask
        return out

    def put(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Add keys that are not in the table yet (distinct)."""
        if 2 * (self.size + len(keys)) > len(self.keys):
            old = self.keys != 0
            old_keys, old_values = self.keys[old], self.values[old]
            while 2 * (self.size + len(keys)) > (1 << self.bits):
                self.bits += 1
            self.keys = np.zeros(1 << self.bits, dtype=np.uint64)
            self.values = np.zeros(1 << self.bits, dtype=np.int64)
            self.size = 0
            self._insert(old_keys, old_values)
        self._insert(keys, values)

    def _insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        mask = (1 << self.bits) - 1
        slots = self._slots(keys)
        self.size += len(keys)
        while len(keys):
            free = self.keys[slots] == 0
            # Of the keys that want the same free slot, the first takes it; the others probe on.
            _, first = np.unique(np.where(free, slots, -1), return_index=True)
            first = first[free[first]]
            self.keys[slots[first]] = keys[first]
            self.values[slots[first]] = values[first]
            left = np.ones(len(keys), dtype=bool)
            left[first] = False
            keys, values, slots = keys[left], values[left], (slots[left] + 1) & mask


class _Growing:
    """A 1-d array appended to in amortised constant time."""

    def __init__(self, dtype: Any, first: Any = None) -> None:
        self.data = np.zeros(1024, dtype=dtype)
        self.size = 0
        if first is not None:
            self.extend(np.asarray([first], dtype=dtype))

    def extend(self, values: np.ndarray) -> None:
        need = self.size + len(values)
        if need > len(self.data):
            bigger = np.zeros(max(need, 2 * len(self.data)), dtype=self.data.dtype)
            bigger[: self.size] = self.data[: self.size]
            self.data = bigger
        self.data[self.size : need] = values
        self.size = need

    @property
    def last(self) -> Any:
        return self.data[self.size - 1]


@dataclass
class _Batch:
    """Chunks cut into pieces: where each begins and ends in ``cp`` (their code points), and its hash."""

    chunks: list[str]
    text: str
    cp: np.ndarray | None = None
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None
    hashes: np.ndarray | None = None


class FastByteLevelBPE:
    """Encode chunks with a `tokenizers` byte-level BPE, remembering the ids of every piece met."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.classes = CharClasses()
        self._powers = _Powers()
        self._lock = threading.Lock()  # the store: one batch at a time (a server encodes in threads)
        self._reset()

    @classmethod
    def for_tokenizer(cls, hf: Any) -> FastByteLevelBPE | None:
        return cls(hf) if supports(json.loads(hf.to_str())) else None

    def _reset(self) -> None:
        self._table = _HashTable()  # piece hash -> piece number
        self._chars = _Growing(np.uint32)  # the pieces' code points, end to end
        self._ids = _Growing(np.uint32)  # their token ids, end to end
        self._char_off = _Growing(np.int64, 0)  # piece k: chars[char_off[k]:char_off[k + 1]]
        self._id_off = _Growing(np.int64, 0)
        self.pieces = 0

    def _hf_ids(self, chunks: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch_fast(chunks, add_special_tokens=False)]

    def encode_chunks(self, chunks: list[str], dtype: np.dtype) -> np.ndarray:
        """The ids of ``chunks`` (each encoded on its own), concatenated: those of ``tokenizers``."""
        return self._finish(self._split(chunks), dtype)

    def encode_batches(self, batches: Iterable[list[str]], dtype: np.dtype) -> Iterator[np.ndarray]:
        """:meth:`encode_chunks` of each batch, in order; the next batches are split in a second thread.

        Splitting and hashing touch nothing shared; looking pieces up and storing
        the new ones happen here, one batch after the other, so the ids are the
        same as one thread's.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rnnkit-bpe") as pool:
            pending: deque[Future[_Batch]] = deque()
            for chunks in batches:
                pending.append(pool.submit(self._split, chunks))
                if len(pending) > 2:
                    yield self._finish(pending.popleft().result(), dtype)
            while pending:
                yield self._finish(pending.popleft().result(), dtype)

    def _split(self, chunks: list[str]) -> _Batch:
        """Cut the chunks into pieces and hash them (None: a code point this Python does not know)."""
        text = "".join(chunks)
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        classes = self.classes.of(cp)
        if not text or (classes == _UNKNOWN).any():
            return _Batch(chunks, text)
        lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = piece_starts(cp, classes, np.cumsum(lengths) - lengths)
        n = len(cp)
        ends = np.append(starts[1:], n)
        sizes = ends - starts
        up, down = self._powers.get(n + 1)
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((cp.astype(np.uint64) + np.uint64(1)) * up[:n], out=prefix[1:])
        hashes = _mix((prefix[ends] - prefix[starts]) * down[starts] + sizes.astype(np.uint64) * _MIX)
        return _Batch(chunks, text, cp, starts, ends, hashes)

    def _finish(self, batch: _Batch, dtype: np.dtype) -> np.ndarray:
        """The ids of a split batch, from the stored pieces (new pieces are encoded and stored)."""
        with self._lock:
            return self._finish_locked(batch, dtype)

    def _finish_locked(self, batch: _Batch, dtype: np.dtype) -> np.ndarray:
        if not batch.text:
            return np.zeros(0, dtype=dtype)
        if batch.hashes is None:
            return self._exact(batch.chunks, dtype)
        cp, starts, ends = batch.cp, batch.starts, batch.ends
        sizes = ends - starts
        numbers = self._numbers(batch.hashes, batch.text, starts, ends)
        if numbers is None:
            return self._exact(batch.chunks, dtype)
        # Check every piece against the stored one, character by character: a hash proves nothing.
        char_off = self._char_off.data
        if not np.array_equal(char_off[numbers + 1] - char_off[numbers], sizes):
            return self._exact(batch.chunks, dtype)
        where = np.repeat(char_off[numbers] - starts, sizes)
        where += np.arange(len(cp))
        if not np.array_equal(self._chars.data[where], cp):
            return self._exact(batch.chunks, dtype)
        id_off = self._id_off.data
        counts = id_off[numbers + 1] - id_off[numbers]
        total = int(counts.sum())
        where = np.repeat(id_off[numbers] - (np.cumsum(counts) - counts), counts)
        where += np.arange(total)
        return self._ids.data[where].astype(dtype)

    def _piece_ids(self, pieces: list[str], space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids of each piece (``space``: those that are white space), end to end, and how many each has.

        Asking `tokenizers` for each piece on its own costs ~10 us a piece, most of it
        making Encodings. Pieces that are not white space are asked for together,
        joined by line ends: a line end next to such a piece is a piece of its own
        and leaves the piece as it is (a space that starts it stays with it), so
        every other word of the result is one of the pieces. White space would run
        into the line ends: those pieces go one by one.
        """
        flat = np.zeros(0, dtype=np.int64)
        sizes = np.zeros(len(pieces), dtype=np.int64)
        words = np.flatnonzero(~space)
        if len(words):
            # Groups of up to 16k pieces, two at a time: both cores work, and the Encodings stay small.
            groups = np.array_split(words, -(-len(words) // _GROUP))
            encodings = (encoding for pair in range(0, len(groups), 2) for encoding in self.hf.encode_batch(
                ["\n".join([pieces[k] for k in group.tolist()]) for group in groups[pair : pair + 2]],
                add_special_tokens=False))
            parts, counts = [], []
            for group, encoding in zip(groups, encodings, strict=True):
                ids = np.asarray(encoding.ids, dtype=np.int64)
                word = np.asarray(encoding.word_ids, dtype=np.int64)
                if len(ids) == 0 or word[-1] != 2 * (len(group) - 1) or (word % 2).sum() != len(group) - 1:
                    return self._one_by_one(pieces)  # not split as expected: never silently wrong
                mine = word % 2 == 0
                parts.append(ids[mine])
                counts.append(np.bincount(word[mine] // 2, minlength=len(group)))
            sizes[np.concatenate(groups)] = np.concatenate(counts)
            if (sizes[words] == 0).any():
                return self._one_by_one(pieces)
            flat = np.concatenate(parts)
        if space.any():
            # Put the white-space pieces' ids in their places.
            alone = np.flatnonzero(space)
            ids = self._hf_ids([pieces[k] for k in alone.tolist()])
            sizes[alone] = [len(i) for i in ids]
            out = np.empty(int(sizes.sum()), dtype=np.int64)
            owner = np.repeat(space, sizes)
            out[~owner] = flat
            out[owner] = [t for i in ids for t in i]
            flat = out
        return flat, sizes

    def _one_by_one(self, pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self._hf_ids(pieces)
        sizes = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        return np.fromiter((t for i in ids for t in i), dtype=np.int64, count=int(sizes.sum())), sizes

    def _exact(self, chunks: list[str], dtype: np.dtype) -> np.ndarray:
        parts = [np.asarray(ids, dtype=dtype) for ids in self._hf_ids(chunks)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

    def _numbers(self, hashes: np.ndarray, text: str, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
        """The stored number of each piece (by its hash), storing the pieces not met before.

        When they would overfill the store it is emptied first; None when even an
        empty store could not hold them.
        """
        numbers = self._table.get(hashes)
        miss = np.flatnonzero(numbers < 0)
        if not len(miss):
            return numbers
        unique, first, inverse = np.unique(hashes[miss], return_index=True, return_inverse=True)
        if self.pieces + len(unique) > MAX_PIECES:
            if len(unique) >= MAX_PIECES:
                return None  # more new pieces than the store holds: this batch goes to `tokenizers`
            self._reset()
            return self._numbers(hashes, text, starts, ends)
        at = miss[first]
        pieces = [text[s:e] for s, e in zip(starts[at].tolist(), ends[at].tolist(), strict=True)]
        flat, id_sizes = self._piece_ids(pieces, self.classes.of(np.frombuffer(
            "".join(p[-1] for p in pieces).encode("utf-32-le"), dtype=np.uint32)) == _W)
        new = np.arange(self.pieces, self.pieces + len(pieces))
        self._chars.extend(np.frombuffer("".join(pieces).encode("utf-32-le"), dtype=np.uint32))
        self._char_off.extend(self._char_off.last + np.cumsum(ends[at] - starts[at]))
        self._ids.extend(flat)
        self._id_off.extend(self._id_off.last + np.cumsum(id_sizes))
        self._table.put(unique, new)
        self.pieces += len(pieces)
        numbers[miss] = new[inverse.reshape(-1)]
        return numbers
