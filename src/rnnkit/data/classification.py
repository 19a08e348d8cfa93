"""Labelled text for sequence classification: read, split, encode, batch.

The data flows once, left to right::

    file or folder ─▶ read_labelled ─▶ split_examples ─▶ encode_examples ─▶ BucketBatcher ─▶ (ids, lengths, labels)
                      {name: [Example]}  train/val/test    EncodedSet

* :func:`read_labelled` reads what a user has: a ``.tsv``/``.csv`` file with a
  header row naming a label column and a text column, or a folder with one
  sub-folder of ``*.txt`` files per label, or a folder with ``train/`` and
  ``test/`` in that layout (the IMDB ``aclImdb`` layout). Rows without a label
  or a text are skipped, counted and reported with their line numbers; every
  problem a user can fix is a one-line :class:`~rnnkit.errors.RnnkitError`.
* :func:`split_examples` makes a seeded, stratified train/validation/test
  split that is the same on every machine.
* :func:`build_label_index` and :func:`encode_examples` turn labels into ids
  and texts into token ids, truncated to ``max_len`` (``pre`` keeps the end of
  a long text, as Keras's ``pad_sequences`` does; ``post`` keeps the start).
* :class:`BucketBatcher` yields post-padded batches, each padded only to its
  own longest text; with ``shuffle`` it groups texts of similar length
  (bucketing), so little time goes into padding.

Randomness comes only from :class:`random.Random` objects seeded from the
caller's ``seed`` and drawn through ``random()``, whose sequence Python
promises to keep across versions and platforms; no global state is touched.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import os
import pathlib
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

from rnnkit.data.corpora import _read_one, read_text
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError

__all__ = [
    "BucketBatcher",
    "EncodedSet",
    "Example",
    "build_label_index",
    "encode_examples",
    "read_labelled",
    "split_examples",
]

Log = Callable[[str], None]
Truncate = Literal["pre", "post"]  # pre: keep the end of a long text; post: keep its start
UnknownLabel = Literal["error", "skip"]

T = TypeVar("T")

# Sub-folders that hold texts without a label: IMDB's train/unsup (50,000 reviews for
# unsupervised learning). Never taken for a class.
_UNLABELLED = frozenset({"unsup"})
# Line numbers shown in one warning or error before "and N more".
_SHOW = 10


@dataclass(frozen=True)
class Example:
    """One labelled text."""

    text: str
    label: str
    line: int | None = None  # source line number (1-based) for TSV/CSV rows, None for folders


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def read_labelled(
    path: str | os.PathLike[str],
    *,
    label_column: str = "label",
    text_column: str = "text",
    encoding: str = "utf-8",
    min_classes: int = 2,
    log: Log | None = None,
) -> dict[str, list[Example]]:
    """Read labelled examples from a TSV/CSV file or a folder of label sub-folders.

    * A file: ``.tsv`` is tab-separated, ``.csv`` comma-separated; any other
      suffix is sniffed from the header line (a tab, else a comma). The header
      names the columns; fields may be quoted (and then hold delimiters,
      doubled quotes and newlines). Returns ``{"all": [...]}``.
    * A folder with one sub-folder per label, each holding ``*.txt`` files
      (one example per file, read in name order): ``{"all": [...]}``.
    * A folder with ``train/`` (and usually ``test/``) in that layout:
      ``{"train": [...], "test": [...]}``. ``unsup`` folders, hidden folders,
      folders without ``.txt`` files and loose files are ignored.

    Rows with an empty label or text, and empty files, are skipped and
    reported through ``log`` in one line. ``min_classes`` is the number of
    distinct labels required (2 for training; pass 1 to evaluate on a file that
    holds a single class). Raises :class:`RnnkitError` for a missing path, an
    empty or undecodable file (with the byte offset), a file that is not
    TSV/CSV, an unknown column, a folder without label sub-folders, no usable
    example, or fewer than ``min_classes`` labels.
    """
    root = pathlib.Path(path)
    if not root.exists():
        raise RnnkitError(f"no such file or folder: {root}; check the path")
    if root.is_dir():
        sets = _read_folder(root, encoding=encoding, log=log)
    else:
        sets = {
            "all": _read_table(root, label_column=label_column, text_column=text_column, encoding=encoding, log=log)
        }
    labels = sorted({example.label for examples in sets.values() for example in examples})
    if len(labels) < min_classes:
        only = f"only one class ({labels[0]!r})" if labels else "no class"
        raise RnnkitError(
            f"{only} in {root}; a classifier needs at least {min_classes} labels: "
            "add examples of another class, or check --label-column"
        )
    return sets


def read_labelled_source(config, *, log: Log | None = None) -> tuple[dict[str, list[Example]], str]:
    """The labelled examples of a run's ``data.text`` (a file or folder) or ``data.corpus``, and their description.

    ``config`` is a :class:`~rnnkit.config.DataConfig`.
    """
    from rnnkit.data import corpora

    if config.text and config.corpus:
        raise RnnkitError("give either --data/--text or --corpus, not both")
    if config.corpus:
        path, source = corpora.fetch(config.corpus, log=log), f"corpus {config.corpus}"
    elif config.text:
        path, source = config.text, str(config.text)
    else:
        raise RnnkitError("no labelled data: pass --data FILE.tsv|FOLDER or --corpus NAME")
    sets = read_labelled(path, label_column=config.label_column, text_column=config.text_column,
                         encoding=config.encoding, log=log)
    return sets, source


def _read_table(
    path: pathlib.Path, *, label_column: str, text_column: str, encoding: str, log: Log | None
) -> list[Example]:
    # read_text gives the same errors as for training text: empty file, binary
    # file, unknown encoding, invalid bytes with their byte offset. It also drops
    # a BOM and turns \r\n into \n (inside quoted fields too).
    text = read_text(path, encoding=encoding)
    delimiter = _delimiter(path, text)
    shown = "tab-separated" if delimiter == "\t" else "comma-separated"
    # newline="" hands csv the line ends untouched, so quoted fields keep their newlines.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    examples: list[Example] = []
    skipped: list[int] = []
    try:
        header = next((row for row in reader if any(field.strip() for field in row)), None)
        if header is None:  # only blank lines
            raise RnnkitError(f"{path} is empty; pass a file that contains a header row and examples")
        names = [name.strip() for name in header]
        columns = []
        for wanted in (label_column, text_column):
            if wanted not in names:
                listed = ", ".join(repr(name) for name in names)
                raise RnnkitError(
                    f"{path} has no column {wanted!r} (read as {shown}, its header has {listed}); "
                    "name the columns with --label-column and --text-column"
                )
            columns.append(names.index(wanted))
        at_label, at_text = columns
        # csv's line_num counts source lines read so far, so a row (which may span
        # several lines inside quotes) starts one line after the previous row ended.
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(field.strip() for field in row):
                continue  # a blank line is not a row
            if len(row) > len(names):
                # Most likely an unquoted delimiter inside a text: which part is the text is a guess.
                mark = "tab" if delimiter == "\t" else "comma"
                raise RnnkitError(
                    f"{path} line {line} has {len(row)} {shown} fields but the header names {len(names)}; "
                    f'put a text that holds a {mark} in double quotes, or add the missing column names to the header'
                )
            label = row[at_label].strip() if at_label < len(row) else ""
            body = row[at_text] if at_text < len(row) else ""
            if not label or not body.strip():
                skipped.append(line)
                continue
            examples.append(Example(text=body, label=label, line=line))
    except csv.Error as error:
        raise RnnkitError(
            f"{path} line {reader.line_num}: {error}; a stray double quote can make a field run on, "
            'quote the whole field and double the quotes inside ("a ""quoted"" word")'
        ) from None
    if skipped:
        _say(log, f"{path.name}: skipped {_count(len(skipped), 'row')} without a label or text ({_lines(skipped)})")
    if not examples:
        raise RnnkitError(
            f"no row of {path} has both a label and a text; fill in the {label_column!r} and {text_column!r} "
            "columns, or name others with --label-column and --text-column"
        )
    return examples


def read_texts(path: str | os.PathLike[str], *, text_column: str = "text", encoding: str = "utf-8") -> list[str]:
    """Texts to classify: the text column of a TSV/CSV file with a header row."""
    path = pathlib.Path(path)
    text = read_text(path, encoding=encoding)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, text))
    try:
        header = [name.strip() for name in next(reader)]
        if text_column not in header:
            listed = ", ".join(repr(name) for name in header)
            raise RnnkitError(f"{path} has no column {text_column!r} (its header has {listed}); "
                              "name the column with --text-column")
        at = header.index(text_column)
        texts = [row[at] for row in reader if at < len(row) and row[at].strip()]
    except csv.Error as error:
        raise RnnkitError(f"{path} line {reader.line_num}: {error}") from None
    if not texts:
        raise RnnkitError(f"{path} has no texts in its {text_column!r} column")
    return texts


def _delimiter(path: pathlib.Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "\t"
    if suffix == ".csv":
        return ","
    first = next((line for line in text.split("\n") if line.strip()), "")
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    raise RnnkitError(
        f"{path} is not a TSV or CSV file (its first line has no tab or comma); pass a file with a header "
        "row such as label<TAB>text, or a folder with one sub-folder of .txt files per label"
    )


def _read_folder(root: pathlib.Path, *, encoding: str, log: Log | None) -> dict[str, list[Example]]:
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise RnnkitError(
            f"unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1 or cp1252"
        ) from None
    train = root / "train"
    if train.is_dir() and _label_folders(train):
        sets = {"train": _read_label_folders(train, codec=codec, encoding=encoding, log=log)}
        test = root / "test"
        if test.is_dir() and _label_folders(test):
            sets["test"] = _read_label_folders(test, codec=codec, encoding=encoding, log=log)
        return sets
    return {"all": _read_label_folders(root, codec=codec, encoding=encoding, log=log)}


def _label_folders(folder: pathlib.Path) -> list[pathlib.Path]:
    """Sub-folders that hold ``*.txt`` files, sorted by name; hidden and ``unsup`` ones left out."""
    return sorted(
        (
            sub
            for sub in folder.iterdir()
            if sub.is_dir()
            and not sub.name.startswith(".")
            and sub.name not in _UNLABELLED
            and any(p.is_file() for p in sub.glob("*.txt"))
        ),
        key=lambda sub: sub.name,
    )


def _read_label_folders(folder: pathlib.Path, *, codec: str, encoding: str, log: Log | None) -> list[Example]:
    subs = _label_folders(folder)
    if not subs:
        raise RnnkitError(
            f"no label sub-folders with .txt files in {folder}; put each class's texts in "
            f"{folder}/<label>/*.txt (one text per file), or pass a TSV/CSV file"
        )
    examples: list[Example] = []
    empty: list[str] = []
    for sub in subs:
        for file in sorted((p for p in sub.glob("*.txt") if p.is_file()), key=lambda p: p.name):
            text = _read_one(file, encoding=encoding, codec_name=codec)
            if not text.strip():
                empty.append(f"{sub.name}/{file.name}")
                continue
            # IMDB reviews keep HTML line breaks; a tokenizer would read them as words.
            examples.append(Example(text=_HTML_BREAK.sub(" ", text), label=sub.name))
    if empty:
        more = f" and {len(empty) - _SHOW} more" if len(empty) > _SHOW else ""
        _say(log, f"{folder.name}: skipped {_count(len(empty), 'empty file')} ({', '.join(empty[:_SHOW])}{more})")
    if not examples:
        raise RnnkitError(f"all .txt files under {folder} are empty; add texts to them")
    return examples


# --------------------------------------------------------------------------
# Splitting and labels
# --------------------------------------------------------------------------


def split_examples(
    sets: dict[str, list[Example]], *, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Split into (train, validation, test), the same way for the same seed on any machine.

    ``sets`` is what :func:`read_labelled` returns. With ``"all"``, the
    examples are split by the two fractions. With ``"train"`` and ``"test"``,
    the given test set is kept and the validation set is taken from train
    (``test_fraction`` is not used); with ``"train"`` alone it is split like
    ``"all"``. The split is stratified: each label is split by the fractions
    on its own (rounded per label), so every part has the label mix of the
    whole. Each part comes back in a seeded shuffled order.
    """
    for name, value in (("validation", val_fraction), ("test", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise RnnkitError(f"the {name} fraction must be at least 0 and below 1, got {value}")
    if "all" in sets:
        pool, given_test = sets["all"], None
    elif "train" in sets:
        pool, given_test = sets["train"], sets.get("test")
    else:
        raise ValueError(f"split_examples needs 'all' or 'train' in sets, got {sorted(sets)}")
    if given_test is not None:
        test_fraction = 0.0
    if val_fraction + test_fraction >= 1.0:
        raise RnnkitError(
            f"the validation and test fractions ({val_fraction} + {test_fraction}) must add up to less than 1"
        )

    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for example in pool:
        by_label.setdefault(example.label, []).append(example)
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    for label in sorted(by_label):  # a fixed order, so the rng draws are the same everywhere
        group = _shuffled(by_label[label], rng)
        n_test = round(len(group) * test_fraction)
        n_val = round(len(group) * val_fraction)
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    if not train:
        raise RnnkitError(
            f"no training examples are left after taking validation and test from {len(pool)}; "
            "lower the validation and test fractions or add data"
        )
    if given_test is not None:
        return _shuffled(train, rng), _shuffled(val, rng), list(given_test)
    return _shuffled(train, rng), _shuffled(val, rng), _shuffled(test, rng)


def _shuffled(items: Sequence[T], rng: random.Random) -> list[T]:
    """A seeded shuffle that stays the same across Python versions and platforms.

    Sorting by one ``rng.random()`` draw per item relies only on ``random()``,
    whose sequence Python guarantees for a given seed; ``Random.shuffle``'s
    algorithm carries no such promise (nor do numpy Generator methods).
    """
    keys = [rng.random() for _ in range(len(items))]
    return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


def build_label_index(examples: Sequence[Example]) -> list[str]:
    """The distinct labels of ``examples``, sorted: label id = position (so ``neg`` 0, ``pos`` 1)."""
    labels = sorted({example.label for example in examples})
    if len(labels) < 2:
        only = f"only one class ({labels[0]!r})" if labels else "no examples"
        raise RnnkitError(
            f"{only} in the training data; a classifier needs at least two labels: add examples of another class"
        )
    return labels


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


@dataclass
class EncodedSet:
    """Token ids and label ids of a list of examples, ready to batch."""

    ids: list[np.ndarray]  # token ids per example (the tokenizer's dtype), 1 <= len <= max_len
    labels: np.ndarray  # (N,) int64 label ids: positions in the label list
    # (N,) int64: each example's position in the list given to encode_examples
    # (examples can be skipped), e.g. to print predictions next to their texts.
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.index is None:
            self.index = np.arange(len(self.ids), dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        if not len(self.ids) == len(self.labels) == len(self.index):
            raise ValueError("ids, labels and index must have one entry per example")
        if any(len(seq) == 0 for seq in self.ids):
            raise ValueError("every example needs at least one token")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) int64 token count of each example."""
        return np.fromiter((len(seq) for seq in self.ids), dtype=np.int64, count=len(self.ids))


def encode_examples(
    examples: Sequence[Example],
    *,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    max_len: int,
    truncate: Truncate = "pre",
    unknown_label: UnknownLabel = "error",
    log: Log | None = None,
) -> EncodedSet:
    """Tokenize ``examples``, cut each to ``max_len`` tokens and map labels to their positions in ``labels``.

    ``truncate="pre"`` keeps the last ``max_len`` tokens of a long text (the
    end of a review usually carries its verdict; Keras's default), ``"post"``
    the first ones. A text with no tokens is skipped and counted. A label not
    in ``labels`` (at evaluation: a class the model never saw) raises
    :class:`RnnkitError` naming it, or with ``unknown_label="skip"`` is skipped
    and counted. Skips are reported through ``log``, one line each kind.
    """
    if max_len < 1:
        raise RnnkitError(f"--max-len must be at least 1, got {max_len}")
    if truncate not in ("pre", "post"):
        raise RnnkitError(f"truncate must be 'pre' or 'post', got {truncate!r}")
    if unknown_label not in ("error", "skip"):
        raise RnnkitError(f"unknown_label must be 'error' or 'skip', got {unknown_label!r}")
    label_id = {label: i for i, label in enumerate(labels)}
    unknown = {example.label for example in examples} - label_id.keys()
    if unknown and unknown_label == "error":
        first = next(example for example in examples if example.label in unknown)
        where = f" (first at line {first.line})" if first.line is not None else ""
        raise RnnkitError(
            f"label(s) {', '.join(repr(u) for u in sorted(unknown))}{where} not among the model's labels "
            f"({', '.join(labels)}); the model never saw them: remove those examples, or pass --unknown-label skip"
        )

    ids: list[np.ndarray] = []
    label_ids: list[int] = []
    index: list[int] = []
    no_tokens: list[Example] = []
    unknown_skipped: list[Example] = []
    for position, example in enumerate(examples):
        if example.label in unknown:
            unknown_skipped.append(example)
            continue
        tokens = tokenizer.encode(example.text)
        if len(tokens) == 0:
            no_tokens.append(example)
            continue
        # (L,) -> (min(L, max_len),)
        ids.append(tokens[-max_len:] if truncate == "pre" else tokens[:max_len])
        label_ids.append(label_id[example.label])
        index.append(position)

    if unknown_skipped:
        names = ", ".join(repr(u) for u in sorted(unknown))
        _say(
            log,
            f"skipped {_count(len(unknown_skipped), 'example')} with labels the model never saw ({names})"
            + _where(unknown_skipped),
        )
    if no_tokens:
        _say(log, f"skipped {_count(len(no_tokens), 'example')} whose text has no tokens" + _where(no_tokens))
    if examples and not ids:  # an empty split (e.g. --test-fraction 0) is simply an empty set
        raise RnnkitError(f"none of the {len(examples)} examples has a known label and a text with tokens")
    return EncodedSet(ids=ids, labels=np.asarray(label_ids, dtype=np.int64), index=np.asarray(index, dtype=np.int64))


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


class BucketBatcher:
    """Batches of ``(ids, lengths, labels)``: ids (B, T) int64 padded after the tokens with ``pad_id``.

    T is the longest text in the batch, never more. With ``shuffle``, each
    epoch shuffles the examples, cuts them into chunks of ``batch_size *
    bucket_factor``, sorts each chunk by length (longest first, so the rows of
    a batch come in decreasing length, as ``pack_padded_sequence`` likes
    them), cuts it into batches and shuffles the batch order: batches hold
    texts of similar length and pad little, while the order still varies.
    Without ``shuffle`` the batches follow the data's order (for evaluation).

    Epoch ``e`` draws its order from ``(seed, e)``: the same seed gives the
    same epochs on any machine, each epoch a new order; set :attr:`epoch` to
    resume mid-run.
    """

    def __init__(
        self,
        data: EncodedSet,
        *,
        batch_size: int,
        pad_id: int,
        shuffle: bool,
        seed: int = 0,
        bucket_factor: int = 50,
    ) -> None:
        if batch_size < 1:
            raise RnnkitError(f"--batch-size must be at least 1, got {batch_size}")
        if bucket_factor < 1:
            raise RnnkitError(f"bucket_factor must be at least 1, got {bucket_factor}")
        if len(data) == 0:
            raise RnnkitError("there are no examples to batch")
        self.data = data
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.shuffle = shuffle
        self.seed = seed
        self.bucket_factor = bucket_factor
        self.epoch = 0  # epochs started so far: the next one draws its order from (seed, epoch)
        self._lengths = data.lengths

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        plan = self.plan(self.epoch)
        self.epoch += 1  # here, not in the generator: iter() alone starts the epoch
        return (self._collate(rows) for rows in plan)

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The example rows of each batch of epoch ``epoch``, in batch order."""
        n, size = len(self.data), self.batch_size
        if not self.shuffle:
            return [np.arange(start, min(start + size, n)) for start in range(0, n, size)]
        # A string seed is hashed with SHA-512: stable everywhere, and distinct per (seed, epoch).
        rng = random.Random(f"rnnkit-buckets:{self.seed}:{epoch}")
        order = np.asarray(_shuffled(range(n), rng), dtype=np.int64)
        chunk = size * self.bucket_factor
        batches: list[np.ndarray] = []
        for start in range(0, n, chunk):
            part = order[start : start + chunk]
            part = part[np.argsort(-self._lengths[part], kind="stable")]  # longest first
            batches += [part[i : i + size] for i in range(0, len(part), size)]
        return _shuffled(batches, rng)

    def _collate(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lengths = self._lengths[rows]  # (B,)
        ids = np.full((len(rows), int(lengths.max())), self.pad_id, dtype=np.int64)  # (B, T)
        for r, i in enumerate(rows):
            seq = self.data.ids[i]
            ids[r, : len(seq)] = seq  # tokens first, padding after (post-padding)
        return torch.from_numpy(ids), torch.from_numpy(lengths.copy()), torch.from_numpy(self.data.labels[rows])


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def _say(log: Log | None, message: str) -> None:
    if log is not None:
        log(message)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _lines(numbers: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_SHOW])
    more = f" and {len(numbers) - _SHOW:,} more" if len(numbers) > _SHOW else ""
    return f"line{'' if len(numbers) == 1 else 's'} {shown}{more}"


def _where(examples: Sequence[Example]) -> str:
    numbers = [example.line for example in examples if example.line is not None]
    return f" ({_lines(numbers)})" if numbers else ""
