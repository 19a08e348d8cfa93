"""bpe_fast gives exactly the ids of `tokenizers` for any text, and the BPE vocabulary of a long text is
trained on a sample of it (whole lines from places spread over it).

The reference is always `tokenizers` itself: each chunk encoded on its own by
the same Tokenizer object the fast encoder wraps.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnkit.config import DataConfig
from rnnkit.data import bpe_fast, corpora, lm_data
from rnnkit.data.bpe_fast import FastByteLevelBPE, piece_starts
from rnnkit.data.lm_data import prepare_lm_data, sample_text, sample_windows
from rnnkit.data.tokenizers import BPETokenizer, _chunks, encode_pieces

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora"

# Characters that exercise every rule of the pre-tokenizer: letters of several scripts, numbers that are
# not ASCII digits (Nd, Nl, No), each kind of white space (and \x1c, which Python calls space and
# Oniguruma does not), apostrophes and contraction letters, marks, symbols, astral characters.
ALPHABET = list("abcdeilmnorstvyABST") + list("éßøЖж猫座明月") + list("0123٣²Ⅻ") + \
    [" ", " ", " ", "\n", "\n", "\t", "\r", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000", "\x1c"] + \
    list("''''.,;!?-\"()") + ["\u0301", "\u200d", "€", "😀", "𝔘", "\ue000"]
WORDS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'x", "''s", " 's", "don't", "we're", "  ", "\n\n",
         " \n", "\n ", "the", " the", "猫は", "12", " 34"]


@functools.cache
def _tokenizer() -> BPETokenizer:
    rng = np.random.default_rng(0)
    parts = rng.choice(np.array(ALPHABET + WORDS * 3, dtype=object), size=20000)
    return BPETokenizer.fit("".join(parts) * 2, vocab_size=400)


def _reference(tok: BPETokenizer, chunks: list[str]) -> np.ndarray:
    parts = [np.asarray(e.ids, dtype=np.int64) for e in tok.hf.encode_batch(chunks, add_special_tokens=False)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _fast(tok: BPETokenizer) -> FastByteLevelBPE:
    fast = FastByteLevelBPE.for_tokenizer(tok.hf)
    assert fast is not None
    return fast


texts = st.lists(st.sampled_from(ALPHABET + WORDS), max_size=200).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(texts, min_size=1, max_size=4))
def test_any_chunks_get_the_ids_of_tokenizers(chunks):
    tok = _tokenizer()
    fast = _fast(tok)
    want = _reference(tok, chunks)
    assert np.array_equal(fast.encode_chunks(chunks, np.int64), want)
    # Again, now that every piece is stored: the ids come from the store alone.
    assert np.array_equal(fast.encode_chunks(chunks, np.int64), want)


def test_pieces_are_the_matches_of_the_regular_expression():
    text = "Don't  stop\n\n  'tis 3.5x, we'll\t\tgo 'S ''s\n"
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    starts = piece_starts(cp, bpe_fast.char_classes()[cp], np.zeros(1, dtype=np.int64)).tolist()
    pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    # What the `regex` module's findall gives for GPT-2's pattern on this text.
    assert pieces == ["Don", "'t", " ", " stop", "\n\n ", " '", "tis", " 3", ".", "5", "x", ",", " we", "'ll", "\t",
                      "\t", "go", " '", "S", " ''", "s", "\n"]


def test_every_code_point_is_classed_as_oniguruma_classes_it():
    # One text with every assigned code point, each between letters, doubled after a space, between
    # digits, after an apostrophe: the pieces must begin where those of tokenizers' pre-tokenizer begin
    # (the ids alone could agree by chance: no merge may join two wrongly cut pieces).
    tok = _tokenizer()
    points = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    text = "".join(f"a{c}a {c}{c}x 1{c}1 '{c}\n" for c in points)
    classes = bpe_fast.char_classes()
    for chunk in _chunks(text):
        cp = np.frombuffer(chunk.encode("utf-32-le"), dtype=np.uint32)
        mine = piece_starts(cp, classes[cp], np.zeros(1, dtype=np.int64)).tolist()
        theirs = [start for _, (start, _) in tok.hf.pre_tokenizer.pre_tokenize_str(chunk)]
        assert mine == theirs
    chunks = list(_chunks(text))
    assert np.array_equal(_fast(tok).encode_chunks(chunks, np.int64), _reference(tok, chunks))


def test_a_code_point_this_python_does_not_know_goes_to_tokenizers():
    tok = _tokenizer()
    fast = _fast(tok)
    text = "the cat \u0378 sat\n"  # U+0378 is unassigned
    assert np.array_equal(fast.encode_chunks([text], np.int64), _reference(tok, [text]))
    assert fast.pieces == 0  # nothing was split or stored


def test_a_hash_shared_by_two_pieces_falls_back_to_tokenizers(monkeypatch):
    tok = _tokenizer()
    fast = _fast(tok)
    monkeypatch.setattr(bpe_fast, "_mix", lambda x: np.ones_like(x))  # every piece has the same hash
    text = "the cat sat on the mat, the end\n"
    assert np.array_equal(fast.encode_chunks([text], np.int64), _reference(tok, [text]))


def test_the_store_is_emptied_when_full_and_the_ids_stay_right(monkeypatch):
    tok = _tokenizer()
    fast = _fast(tok)
    monkeypatch.setattr(bpe_fast, "MAX_PIECES", 50)
    rng = np.random.default_rng(1)
    for _ in range(5):
        chunks = ["".join(rng.choice(np.array(ALPHABET + WORDS, dtype=object), size=300)) for _ in range(3)]
        assert np.array_equal(fast.encode_chunks(chunks, np.int64), _reference(tok, chunks))
        assert fast.pieces <= 50


def test_a_tokenizer_it_cannot_reproduce_is_left_to_tokenizers():
    from tokenizers import pre_tokenizers

    tok = BPETokenizer.fit("the cat sat on the mat\n" * 50, vocab_size=270)
    tok.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert FastByteLevelBPE.for_tokenizer(tok.hf) is None
    text = "the cat\n" * 20000  # long enough for the fast path
    assert np.array_equal(tok.encode(text), _reference(tok, list(_chunks(text))))


def test_the_stream_in_two_threads_is_the_stream_in_one():
    tok = _tokenizer()
    rng = np.random.default_rng(2)
    batches = [["".join(rng.choice(np.array(ALPHABET + WORDS, dtype=object), size=500)) for _ in range(4)]
               for _ in range(9)]
    got = list(_fast(tok).encode_batches(batches, np.dtype(np.int64)))
    assert [len(g) for g in got] == [len(_reference(tok, b)) for b in batches]
    assert all(np.array_equal(g, _reference(tok, b)) for g, b in zip(got, batches, strict=True))


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/corpora")
@pytest.mark.parametrize("name", ["shakespeare.txt", "song-ci.txt"])
def test_real_corpora_get_the_ids_of_tokenizers(name):
    text = (SHARED / name).read_text(encoding="utf-8")
    tok = BPETokenizer.fit(text[:300_000], vocab_size=1000)
    chunks = list(_chunks(text))
    got = np.concatenate(list(encode_pieces(tok, [text])))
    assert np.array_equal(got, _reference(tok, chunks))


# ------------------------------------------------------------------ the training sample


def test_a_text_no_longer_than_the_sample_is_trained_on_whole():
    assert sample_windows(1000, 1000) == [(0, 1000)]
    assert sample_windows(1000, 0) == [(0, 1000)]
    pieces = [("ab\n", 3), ("\n", 3), ("cd", 5)]  # a joining line end has no bytes of its own
    assert "".join(sample_text(iter(pieces), sample_windows(5, 10))) == "ab\n\ncd"


def test_the_sample_is_whole_lines_from_sixteen_places():
    lines = [f"line {i:05d} of the text\n" for i in range(20000)]  # 22 bytes each
    text = "".join(lines)
    size = len(text)
    pieces, at = [], 0
    for start in range(0, size, 4096):  # 4 KB pieces, as the reader hands them out
        piece = text[start:start + 4096]
        at += len(piece)
        pieces.append((piece, at))
    windows = sample_windows(size, 22_000)
    assert len(windows) == lm_data.SAMPLE_PLACES and windows[0][0] == 0 and windows[-1][0] > 0.9 * size
    sample = "".join(sample_text(iter(pieces), windows))
    got = sample.splitlines(keepends=True)
    assert set(got) <= set(lines)  # no line cut
    assert 20_000 <= len(sample) <= 26_000
    assert got[0] == lines[0] and int(got[-1].split()[1]) > 18_000  # from the start to the end


def test_bpe_on_a_long_text_trains_on_the_sample_and_encodes_it_all(tmp_path):
    rng = np.random.default_rng(3)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"], dtype=object)
    text = "".join(" ".join(rng.choice(words, size=8)) + "\n" for _ in range(4000))
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    config = DataConfig(text=str(path), level="bpe", vocab_size=300, seq_len=8, bpe_sample_mb=0.02)
    data = prepare_lm_data(config, cache_dir=tmp_path / "run" / "data")
    assert len(text) > 0.02e6
    ids = np.concatenate([data.train, data.val, data.test])
    assert np.array_equal(ids, data.tokenizer.encode(text))  # every line is encoded, not just the sample
    assert data.tokenizer.decode(ids.tolist()) == text
    assert data.chars == len(text)
    whole = prepare_lm_data(DataConfig(text=str(path), level="bpe", vocab_size=300, seq_len=8, bpe_sample_mb=0))
    # Another sample size is another vocabulary, and another cache.
    assert data.cache_key != whole.cache_key
    assert json.dumps(data.tokenizer.to_dict()["tokenizer"]["model"]) != \
        json.dumps(whole.tokenizer.to_dict()["tokenizer"]["model"])


def test_reading_errors_outside_the_sample_still_stop_the_first_pass(tmp_path):
    text = "a line of text\n" * 5000
    path = tmp_path / "bad.txt"
    path.write_bytes(text.encode() + b"\xff\n")
    config = DataConfig(text=str(path), level="bpe", vocab_size=300, seq_len=8, bpe_sample_mb=0.001)
    with pytest.raises(corpora.RnnkitError, match=f"byte 0xff at byte offset {len(text)}"):
        prepare_lm_data(config)


def test_code_points_classed_as_they_are_met_get_the_full_table_s_classes():
    rng = np.random.default_rng(3)
    table = bpe_fast.char_classes()
    met = bpe_fast.CharClasses()
    for _ in range(5):  # batches meeting new and known code points, in any order
        cp = rng.integers(0, 0x110000, size=5000).astype(np.uint32)
        cp[:100] = rng.integers(0, 0x80, size=100)
        assert np.array_equal(met.of(cp), table[cp])
    assert met.of(np.zeros(0, dtype=np.uint32)).tolist() == []
