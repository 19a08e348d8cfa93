"""Corpora larger than memory: the text streamed in pieces, ids built in two passes into a memory-mapped file.

Small files and tiny read sizes stand in for big ones: every chunk boundary
case (a UTF-8 sequence, a \\r\\n, a word cut by a read) happens in a few bytes.
"""

import json
import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit.cli import main
from rnnkit.config import DataConfig, ModelConfig
from rnnkit.data import corpora, lm_data
from rnnkit.data.batching import RandomWindows, SequentialStreams
from rnnkit.data.lm_data import Behind, IdsWriter, encode_text, prepare_lm_data, save_lm_cache, split_ids
from rnnkit.data.progress import ByteProgress
from rnnkit.data.tokenizers import build_tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_lm
from rnnkit.models.language_model import LanguageModel

TEXT = ("Café au lait, s'il vous plaît!\r\nDon't stop: 3.5 or 1,000 ways...\r\n"
        "明月几时有？把酒问青天。\n\tEnd of part one\r\n") * 40


@pytest.fixture
def tiny_reads(monkeypatch):
    """Read 7 bytes at a time: multi-byte characters and \\r\\n pairs are cut by the reads."""
    monkeypatch.setattr(corpora, "READ_BYTES", 7)


def _config(path: Path, level: str, **extra) -> DataConfig:
    config = DataConfig()
    config.text = str(path)
    config.level = level
    config.seq_len = 8
    config.vocab_size = 300
    for key, value in extra.items():
        setattr(config, key, value)
    return config


def _in_memory(config: DataConfig):
    """What rnnkit did before streaming: the whole text, one tokenizer fit, one encode, split."""
    text = corpora.read_text(config.text, encoding=config.encoding)
    tokenizer = build_tokenizer(config, text)
    ids = tokenizer.encode(text)
    return tokenizer, ids, split_ids(ids, val_fraction=config.val_fraction, test_fraction=config.test_fraction)


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a memory-mapped file."""
    while array is not None:
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = getattr(array, "base", None)
    return False


# ------------------------------------------------------------------ reading


def test_pieces_join_to_the_decoded_text_whatever_the_read_size(tmp_path, tiny_reads):
    folder = tmp_path / "texts"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))  # BOM, \r\n
    (folder / "b" / "c.txt").write_bytes("no newline at the end: é".encode())
    (folder / "b" / "empty.txt").write_bytes(b"")
    (folder / "d.txt").write_bytes(b"last\r")
    expected = TEXT.replace("\r\n", "\n") + "no newline at the end: é" + "\n" + "last\r"
    pieces = list(corpora.open_text(folder).pieces())
    assert len(pieces) > 100 and all(pieces)
    assert "".join(pieces) == expected
    assert corpora.read_text(folder) == expected


def test_a_bad_byte_late_in_a_file_names_its_offset_and_line(tmp_path, tiny_reads):
    path = tmp_path / "late.txt"
    good = "ligne été\n" * 30
    path.write_bytes(good.encode() + b"ok \xff ok\n")
    offset = len(good.encode()) + 3
    with pytest.raises(RnnkitError, match=f"byte 0xff at byte offset {offset} \\(line 31\\)"):
        corpora.read_text(path)


def test_a_sequence_cut_off_by_the_end_of_the_file(tmp_path, tiny_reads):
    path = tmp_path / "cut.txt"
    path.write_bytes(b"fin\n" * 5 + "é".encode()[:1])
    with pytest.raises(RnnkitError, match="byte 0xc3 at byte offset 20 \\(line 6\\)"):
        corpora.read_text(path)


def test_a_nul_byte_late_in_a_file_is_a_binary_file(tmp_path, tiny_reads):
    path = tmp_path / "model.txt"
    path.write_bytes(b"a" * 40 + b"\x00rest")
    with pytest.raises(RnnkitError, match="binary file \\(NUL byte at byte offset 40\\)"):
        corpora.read_text(path)


def test_utf16_streams_too(tmp_path, tiny_reads):
    path = tmp_path / "wide.txt"
    path.write_bytes(TEXT.encode("utf-16"))
    assert corpora.read_text(path, encoding="utf-16") == TEXT.replace("\r\n", "\n")


# ------------------------------------------------------------------ two passes, memory-mapped ids


@pytest.mark.parametrize(("level", "extra"), [
    ("char", {}),
    ("char", {"lowercase": True}),
    ("word", {}),
    ("word", {"lowercase": True, "eos": True, "max_vocab": 20}),
    ("word", {"min_freq": 41}),
    ("bpe", {}),
])
def test_streamed_ids_equal_the_in_memory_ones(tmp_path, tiny_reads, level, extra):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    config = _config(path, level, **extra)
    tokenizer, ids, splits = _in_memory(config)
    data = prepare_lm_data(config, cache_dir=tmp_path / "run" / "data")
    tokenizer.counts = np.bincount(ids, minlength=tokenizer.vocab_size).tolist()
    assert data.tokenizer.to_dict() == tokenizer.to_dict()  # same vocabulary, same order, same counts
    for got, want in zip((data.train, data.val, data.test), splits, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert data.chars == len(corpora.read_text(path))
    # Every split is a view of one read-only memory map, not a copy.
    assert not data.train.flags.writeable and _mapped(data.train) and _mapped(data.val)


def test_nothing_is_written_until_the_run_starts_and_then_the_cache_is_renamed_in(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    cache = tmp_path / "run" / "data"
    data = prepare_lm_data(_config(path, "char"), cache_dir=cache)
    assert not (tmp_path / "run").exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(staging) == 1 and (staging[0] / "ids.npy").is_file()
    save_lm_cache(data, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["ids.npy", "meta.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    meta = json.loads((cache / "meta.json").read_text())
    assert sum(meta["sizes"].values()) == meta["tokens"] == len(data.train) + len(data.val) + len(data.test)
    assert np.array_equal(np.load(cache / "ids.npy")[: len(data.train)], data.train)  # still mapped after the rename


def test_a_run_that_never_starts_leaves_no_staging_folder(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    data = prepare_lm_data(_config(path, "word"), cache_dir=tmp_path / "run" / "data")
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    del data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_the_cache_trusts_old_files_by_stat_and_checks_recent_ones_by_their_bytes(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    cache = tmp_path / "run" / "data"
    config = _config(path, "char")
    save_lm_cache(prepare_lm_data(config, cache_dir=cache), cache)

    real = lm_data._stream_sha256
    hashed = []
    monkeypatch.setattr(lm_data, "_stream_sha256", lambda *a, **k: hashed.append(1) or real(*a, **k))
    again = prepare_lm_data(config, cache_dir=cache)
    assert again.from_cache and not hashed  # same paths, sizes and old mtimes: the text is not read

    os.utime(path)  # touched, same bytes: hashed, still the cache
    assert prepare_lm_data(config, cache_dir=cache).from_cache and hashed

    # Other bytes of the same size with the mtime put back, in a file modified within
    # RACY_NS of when the cache hashed it: the mtime cannot be trusted, the bytes decide.
    meta = json.loads((cache / "meta.json").read_text())
    meta["hashed_at_ns"] = int(an_hour_ago * 1e9) + lm_data.RACY_NS // 2
    (cache / "meta.json").write_text(json.dumps(meta))
    path.write_bytes(TEXT.replace("Don't", "Won't").encode())
    os.utime(path, (an_hour_ago, an_hour_ago))
    changed = prepare_lm_data(config, cache_dir=cache)
    assert not changed.from_cache and "W" in changed.tokenizer.chars


@pytest.mark.parametrize("appended", ["more\n", "a character pass one never saw: €\n"])
def test_a_corpus_changed_between_the_passes_is_refused_and_nothing_is_left(tmp_path, monkeypatch, appended):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    real = lm_data.CharTokenizer

    def build_then_edit(*args, **kwargs):
        with open(path, "ab") as f:  # someone appends while the vocabulary is built
            f.write(appended.encode())
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_data, "CharTokenizer", build_then_edit)
    with pytest.raises(RnnkitError, match="changed while it was being read"):
        prepare_lm_data(_config(path, "char"), cache_dir=tmp_path / "run" / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]


@pytest.mark.parametrize(("files", "match"), [
    ({"short.txt": "tiny\n"}, "fewer than one window"),
    ({}, "no .txt files"),
    ({"a.txt": " \n", "b.txt": "\n"}, "are empty"),
])
def test_bad_corpora_are_one_line_errors_and_write_nothing(tmp_path, capsys, files, match):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    target = folder / "short.txt" if "short.txt" in files else folder
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", "--text", str(target), "--out", str(tmp_path / "run"), "--max-steps", "1",
                 "--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch-size", "2", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0] and "Traceback" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_bytes_during_bpe_training_are_the_reading_error(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(TEXT.encode() + b"\xff\n")
    with pytest.raises(RnnkitError, match=f"byte 0xff at byte offset {len(TEXT.encode())}"):
        prepare_lm_data(_config(path, "bpe"))


# ------------------------------------------------------------------ reading the ids through the map


def test_ids_writer_fills_in_the_length(tmp_path):
    for dtype, count in ((np.uint8, 0), (np.uint16, 1), (np.uint32, 123_457)):
        ids = np.arange(count, dtype=np.int64) % np.iinfo(dtype).max
        out = IdsWriter(tmp_path / "ids.npy", np.dtype(dtype))
        for start in range(0, count, 1000):
            out.write(ids[start : start + 1000])
        out.close()
        loaded = np.load(tmp_path / "ids.npy")
        assert loaded.dtype == dtype and np.array_equal(loaded, ids)


def test_ids_written_behind_arrive_whole_and_in_order(tmp_path):
    behind = Behind(depth=2)
    try:
        ids = np.arange(300_000, dtype=np.int64) % 65_535
        out = IdsWriter(tmp_path / "ids.npy", np.dtype(np.uint16), behind=behind)
        for start in range(0, len(ids), 777):
            out.write(ids[start : start + 777])
        out.close()
        assert np.array_equal(np.load(tmp_path / "ids.npy"), ids)
    finally:
        behind.close()


def test_an_error_behind_is_raised_to_the_caller():
    behind = Behind(depth=1)
    ran = []

    def fail():
        raise OSError(28, "No space left on device")

    behind.call(fail)
    with pytest.raises(OSError, match="No space"):
        behind.call(ran.append, 1)  # waits for the failed call first
        behind.wait()
    behind.call(ran.append, 2)
    behind.close()
    assert 2 in ran


def test_batchers_and_evaluation_read_the_map_as_they_read_an_array(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    data = prepare_lm_data(_config(path, "char"))
    copy = np.array(data.train)
    for make in (lambda ids: RandomWindows(ids, seq_len=8, batch_size=4, seed=3),
                 lambda ids: SequentialStreams(ids, seq_len=8, batch_size=4)):
        for a, b in zip(make(data.train).epoch(), make(copy).epoch(), strict=True):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    torch.manual_seed(0)
    model = LanguageModel(config=ModelConfig(hidden=8, layers=1), vocab_size=data.tokenizer.vocab_size)
    assert evaluate_lm(model, data.train, batch_size=4, seq_len=8) == evaluate_lm(model, copy, batch_size=4, seq_len=8)


@pytest.mark.parametrize("level", ["char", "word", "bpe"])
def test_encode_text_streams_what_encode_gives(tmp_path, tiny_reads, level):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.encode())
    tokenizer = build_tokenizer(_config(path, level, max_vocab=12), TEXT[: len(TEXT) // 2])
    whole = corpora.read_text(path)
    encoded = encode_text(tokenizer, path)
    assert np.array_equal(encoded.ids, tokenizer.encode(whole)) and encoded.chars == len(whole)
    if level == "word":
        assert encoded.unknown == sum(1 for p in tokenizer.split(whole) if p not in tokenizer.index) > 0
        skipped = encode_text(tokenizer, path, unknown="skip")
        assert np.array_equal(skipped.ids, tokenizer.encode(whole, unknown="skip"))


def test_progress_lines_when_not_on_a_terminal():
    lines = []
    total = 200 << 20
    with ByteProgress("pass 1/2, char vocabulary", total, log=lines.append, live=False) as bar:
        for _ in range(200):
            bar.advance(1 << 20)
    assert len(lines) == 4 and all("MB/s" in line for line in lines)
    assert "25%" in lines[0] and "left" in lines[0] and "in " in lines[-1]
    quiet = []
    with ByteProgress("small", 1000, log=quiet.append, live=False) as bar:
        bar.advance(1000)
    assert quiet == []


# ------------------------------------------------------------------ the word pieces, found faster


def _reference_pieces(text: str, *, lowercase: bool, eos: bool) -> list[str]:
    """The word tokenizer's pieces as its definition says: the regex over the (lower-cased) lines."""
    from rnnkit.data.tokenizers import _WORD_RE

    text = text.lower() if lowercase else text
    if not eos:
        return _WORD_RE.findall(text)
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines):
        out += _WORD_RE.findall(line)
        if n < len(lines) - 1:
            out.append("<eos>")
    return out


@pytest.mark.parametrize("seed", range(6))
def test_word_vocabulary_and_ids_follow_the_regex_definition(seed):
    from collections import Counter

    from rnnkit.data.tokenizers import WordTokenizer

    rng = np.random.default_rng(seed)
    alphabet = list("ab c1 2.,'’\n\t_-É ΣσὈ\u00a0\u3000\x1c") + ["don't ", "3,5 ", "1.000 ", "x''y ", "\x00", "。"]
    text = "".join(rng.choice(alphabet, size=3000))
    for lowercase in (False, True):
        for eos in (False, True):
            pieces = [p for p in _reference_pieces(text, lowercase=lowercase, eos=eos) if p != "<eos>"]
            ranked = [w for w, _ in sorted(Counter(pieces).items(), key=lambda kv: -kv[1])]
            tok = WordTokenizer.fit(text, lowercase=lowercase, eos=eos, max_vocab=40)
            assert tok.words == ranked[: 40 - 1 - eos] + ["<unk>"] + (["<eos>"] if eos else [])
            want = [tok.index.get(p, tok.unk_id) for p in _reference_pieces(text, lowercase=lowercase, eos=eos)]
            assert tok.encode(text).tolist() == want
