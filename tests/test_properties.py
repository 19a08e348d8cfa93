"""Property-based tests: tokenizers and config parsing over generated inputs (hypothesis).

Tokenizers must give back what they were given (char and BPE for any text;
words for ordinary prose, plus encode(decode(ids)) == ids for any ids). Config
overrides must round-trip every valid value through to_dict/from_dict and the
run's TOML, and reject every unknown key and wrong-typed value with an
RnnkitError, never another exception.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import typing
from typing import Any, Literal, get_args, get_origin

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from rnnkit.config import (
    SECTIONS,
    RunConfig,
    all_keys,
    apply_mapping,
    parse_override,
    set_value,
    toml_value,
    validate,
)
from rnnkit.data.tokenizers import BPETokenizer, CharTokenizer, WordTokenizer
from rnnkit.errors import RnnkitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Modest: the whole file runs in seconds on a busy 2-core machine. No deadline: a loaded
# machine makes single examples slow, which says nothing about the property.
MODEST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ tokenizers


@MODEST
@given(st.text(min_size=1))
def test_char_round_trip_for_any_text(text):
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


@MODEST
@given(st.text(min_size=1, max_size=40), st.text(max_size=40))
def test_char_skip_drops_exactly_the_unseen_characters(seen, text):
    tok = CharTokenizer.fit(seen)
    kept = "".join(c for c in text if c in tok.index)
    assert tok.decode(tok.encode(text, unknown="skip")) == kept
    if kept != text:
        with pytest.raises(RnnkitError, match="not in the model's vocabulary"):
            tok.encode(text)


def test_char_encoding_in_slices_matches_one_pass(monkeypatch):
    text = "abcdefg" * 50 + "é"
    whole = CharTokenizer.fit(text).encode(text)
    monkeypatch.setattr(CharTokenizer, "ENCODE_SLICE", 7)
    sliced = CharTokenizer.fit(text)
    assert (sliced.encode(text) == whole).all()
    assert sliced.decode(sliced.encode(text + "zz", unknown="skip")) == text


WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=8)
TRAILING = st.sampled_from(["", "", "", ",", ".", ";", ":", "!", "?"])


@MODEST
@given(st.lists(st.tuples(WORDS, TRAILING), min_size=1, max_size=30))
def test_word_round_trip_for_ordinary_prose(pieces):
    # Words separated by single spaces, punctuation marks right after a word: how prose is written.
    text = " ".join(word + mark for word, mark in pieces)
    tok = WordTokenizer.fit(text)
    assert tok.decode(tok.encode(text)) == text


# Everything but apostrophes: "rock ' n" decodes to "rock'n", which is one word when read back.
VOCAB = ["the", "cat", "Sat", "3", "14", ",", ".", ";", ":", "!", "?", "(", ")", "[", "]", "-", "/", '"', "$",
         "%", "#", "…", "n", "s"]


@functools.cache
def _word_tokenizer() -> WordTokenizer:
    return WordTokenizer.fit(" ".join(VOCAB))


@MODEST
@given(st.lists(st.sampled_from(VOCAB), max_size=30))
def test_word_decoding_reads_back_as_the_same_ids(words):
    tok = _word_tokenizer()
    ids = [tok.index[w] for w in words]
    assert tok.encode(tok.decode(ids)).tolist() == ids


@MODEST
@given(st.text(max_size=200))
def test_word_encoding_of_any_text_gives_known_ids_or_unk(text):
    tok = _word_tokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(tok.split(text))
    assert all(0 <= i < tok.vocab_size for i in ids.tolist())
    assert (tok.unk_id in ids.tolist()) == bool(tok.unknown_in(text))


@functools.cache
def _bpe() -> BPETokenizer:
    # Small and trained once: the smallest byte-level vocabulary plus a few dozen merges.
    return BPETokenizer.fit("the cat sat on the mat; le chat noir, 猫は座った.\n" * 30, vocab_size=300)


@MODEST
@given(st.text(max_size=200))
def test_bpe_round_trip_for_any_text(text):
    tok = _bpe()
    assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------ config


HINTS = {key: typing.get_type_hints(type(getattr(RunConfig(), key.split(".")[0]) if "." in key else RunConfig()))[
    key.split(".")[-1]] for key in all_keys()}
# Values in these ranges pass every range check of validate() for every key of their type.
VALID_BY_TYPE = {
    int: st.integers(min_value=1, max_value=10_000),
    float: st.floats(min_value=0.01, max_value=0.4),
    bool: st.booleans(),
    # Any text, with the characters a writer must escape (quotes, backslashes, controls, DEL) made common.
    str: st.text(st.characters() | st.sampled_from('"\\\n\t\x00\x1f\x7f'), max_size=20),
}


def _valid(tp: Any) -> st.SearchStrategy:
    if get_origin(tp) is Literal:
        return st.sampled_from(get_args(tp))
    if get_origin(tp) is list:
        return st.lists(_valid(get_args(tp)[0]), max_size=3)
    options = [a for a in get_args(tp) if a is not type(None)]
    if options:  # Optional[X]
        return st.none() | _valid(options[0]) if type(None) in get_args(tp) else _valid(options[0])
    return VALID_BY_TYPE[tp]


SETTABLE = [key for key in all_keys() if key != "model.tie_weights"]  # tie_weights constrains two other keys


# Keys whose valid values are narrower than their type's.
SPECIAL = {
    "data.symbols": st.integers(min_value=2, max_value=36),
    "train.live_plot": st.none() | VALID_BY_TYPE[str].map(lambda name: name + ".png"),
    "train.min_lr": st.just(0.0),  # at most train.lr, whatever that is drawn to be
    "model.mlp_ratio": st.just(0.0),  # an MLP needs model.block = "residual"
    "model.cutoffs": st.just([]),
    "model.softmax": st.just("full"),  # adaptive needs data.level = "word" and the language-model task
    "model.block": st.just("plain"),  # residual refuses the classifier task, which may be drawn  # increasing ids below the vocabulary, which is not known here
}


@st.composite
def overrides(draw) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(SETTABLE), unique=True, max_size=12))
    return {key: draw(SPECIAL[key] if key in SPECIAL else _valid(HINTS[key])) for key in keys}


@MODEST
@given(overrides())
@example({"data.text": 'a "quoted"\\path\x7f\x00\n', "train.sample_prefixes": ["\x7f", ""]})  # what TOML escapes
def test_valid_overrides_round_trip_through_dict_and_toml(values):
    config = RunConfig()
    for key, value in values.items():
        if value is None:
            continue  # --set cannot spell "unset"; None is the default of every optional key anyway
        dotted, parsed = parse_override(f"{key}={toml_value(value)}")
        set_value(config, dotted, parsed, source="--set")
    validate(config)
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        got = getattr(getattr(config, section) if section else config, name)
        if value is not None and key not in ("data.seq_len", "data.target", "data.sampling"):  # --window sets these
            assert got == value, key
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert RunConfig.from_dict(tomllib.loads(config.to_toml())) == config


KNOWN = set(all_keys())


@MODEST
@given(st.text(max_size=30).filter(lambda k: k.strip() not in KNOWN and "=" not in k), st.text(max_size=10))
def test_unknown_keys_are_always_rejected(key, raw):
    with pytest.raises(RnnkitError, match="unknown config key|KEY=VALUE"):
        set_value(RunConfig(), *parse_override(f"{key}={raw}"), source="--set")
    with pytest.raises(RnnkitError):
        apply_mapping(RunConfig(), {key: raw}, source="test")
    section = key.split(".")[0] if "." in key else "train"
    assume(section in SECTIONS)
    with pytest.raises(RnnkitError):
        apply_mapping(RunConfig(), {section: {key.split(".", 1)[-1] + "_x": raw}}, source="test")


NOT_AN_INT = st.floats(allow_nan=False).filter(lambda x: not x.is_integer()) | st.booleans() | st.lists(
    st.integers(), max_size=2) | st.text(max_size=6).filter(lambda s: not s.strip().replace("_", "").lstrip(
        "+-").isdigit())


def _wrong(tp: Any) -> st.SearchStrategy:
    if get_origin(tp) is Literal:
        return st.text(max_size=8).filter(lambda s: s not in get_args(tp)) | st.integers()
    if tp is int:
        return NOT_AN_INT
    if tp is float:
        return st.booleans() | st.lists(st.floats(), max_size=2) | st.text(max_size=6).filter(_not_a_float)
    if tp is bool:
        return st.integers() | st.floats() | st.text(max_size=6).filter(
            lambda s: s.lower() not in ("true", "false", "1", "0", "yes", "no"))
    if get_origin(tp) is list:
        if get_args(tp) == (int,):
            return st.integers() | st.lists(st.text(min_size=1, max_size=4).filter(_not_a_float), min_size=1,
                                            max_size=2)
        return st.integers() | st.lists(st.integers(), min_size=1, max_size=2)
    return st.integers() | st.floats() | st.booleans() | st.lists(st.integers(), max_size=2)  # str and str | None


def _not_a_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


@MODEST
@given(st.data())
def test_wrong_typed_values_are_rejected(data):
    key = data.draw(st.sampled_from(all_keys()))
    value = data.draw(_wrong(HINTS[key]))
    with pytest.raises(RnnkitError, match=f"'{key}' must be"):
        set_value(RunConfig(), key, value, source="test")


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


@MODEST
@given(st.dictionaries(st.sampled_from([*SECTIONS, "out", "task", "nope"]) | st.text(max_size=8), JSONISH,
                       max_size=4))
def test_any_mapping_loads_or_fails_with_an_rnnkit_error(mapping):
    try:
        config = RunConfig.from_dict(mapping)
    except RnnkitError as exc:
        assert "\n" not in str(exc)
    else:
        assert dataclasses.is_dataclass(config)
