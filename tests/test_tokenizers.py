import numpy as np
import pytest

from rnnkit.data.tokenizers import CharTokenizer, ids_dtype, tokenizer_from_dict
from rnnkit.errors import RnnkitError

TEXTS = {
    "ascii": "Hello, world!\nTo be, or not to be: that is the question.\t~",
    "chinese": "分开 不分开\n东风夜放花千树，更吹落、星如雨。",
    "mixed": "naïve café — 東京 🙂 emoji\r\n",
}


@pytest.mark.parametrize("name", TEXTS)
def test_round_trip(name):
    text = TEXTS[name]
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == len(set(text))
    assert tok.chars == sorted(set(text))


def test_save_load_round_trip():
    tok = CharTokenizer.fit(TEXTS["chinese"])
    again = tokenizer_from_dict(tok.to_dict())
    assert again.chars == tok.chars
    assert np.array_equal(again.encode(TEXTS["chinese"]), tok.encode(TEXTS["chinese"]))


def test_ids_match_a_plain_dictionary_lookup():
    text = TEXTS["mixed"] + TEXTS["chinese"]
    tok = CharTokenizer.fit(text)
    assert tok.encode(text).tolist() == [tok.index[c] for c in text]


def test_narrowest_dtype():
    assert ids_dtype(80) == np.uint8
    assert ids_dtype(256) == np.uint8
    assert ids_dtype(257) == np.uint16
    assert ids_dtype(70_000) == np.uint32
    assert CharTokenizer.fit("abc").encode("abc").dtype == np.uint8
    big = "".join(chr(0x4E00 + i) for i in range(300))
    assert CharTokenizer.fit(big).encode(big).dtype == np.uint16


def test_unknown_character_is_named():
    tok = CharTokenizer.fit("abc")
    with pytest.raises(RnnkitError, match="'z'"):
        tok.encode("abz")
    assert tok.decode(tok.encode("abzc", unknown="skip")) == "abc"
    assert tok.unknown_chars("xaby") == ["x", "y"]


def test_empty_text_cannot_make_a_vocabulary():
    with pytest.raises(RnnkitError):
        CharTokenizer.fit("")
