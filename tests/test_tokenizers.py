from collections import Counter

import numpy as np
import pytest

from rnnkit.data.tokenizers import CharSet, CharTokenizer, byte_counts, count_ids, ids_dtype, tokenizer_from_dict
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
    assert tok.unknown_in("xaby") == ["x", "y"]


@pytest.mark.parametrize("vocab", [
    "abc \n",  # every id a byte, the largest code point below 128
    "abcdefghijklmnopqrstuvwxyz ,.\n" + "é東",  # every id a byte, non-ASCII characters too
    "abcdefghijklmnopqrstuvwxyz ,.\n" + "".join(chr(0x4E00 + i) for i in range(300)),  # two-byte ids
])
def test_ascii_text_read_by_its_bytes_gets_the_ids_of_a_dictionary_lookup(vocab):
    tok = CharTokenizer(chars=sorted(set(vocab)))
    rng = np.random.default_rng(0)
    known_ascii = [c for c in tok.chars if c.isascii()]
    text = "".join(rng.choice(known_ascii, size=3000))
    ids = tok.encode(text)
    assert ids.dtype == ids_dtype(tok.vocab_size)
    assert ids.tolist() == [tok.index[c] for c in text]
    with pytest.raises(RnnkitError, match="'Z'"):  # an ASCII character the vocabulary lacks
        tok.encode(text + "Z")
    assert tok.encode("Z" + text + "Z", unknown="skip").tolist() == ids.tolist()
    mixed = text[:100] + "東" + text[100:]  # not ASCII: read by code points, same ids
    if "東" in tok.index:
        assert tok.encode(mixed).tolist() == [tok.index[c] for c in mixed]


@pytest.mark.parametrize("size", [0, 1, 5, 65_535, 65_536, 65_537, 200_001])
def test_byte_counts_equal_bincount(size):
    raw = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    assert byte_counts(raw).tolist() == np.bincount(raw, minlength=256).tolist()
    assert byte_counts(raw[::2]).tolist() == np.bincount(raw[::2], minlength=256).tolist()  # not contiguous
    assert count_ids(raw, 256, slice_size=70_001) == np.bincount(raw, minlength=256).tolist()


def test_count_ids_refuses_an_id_beyond_the_vocabulary():
    with pytest.raises(ValueError, match="larger id"):
        count_ids(np.arange(100_000, dtype=np.uint8) % 9, 8)


def test_char_set_counts_each_character():
    pieces = ["hello world\n" * 10_000, "naïve 東京 🙂", "", "plain ascii again\n" * 7000]
    seen = CharSet()
    for piece in pieces:
        seen.add(piece)
    want = Counter("".join(pieces))
    assert seen.sorted() == sorted(want)
    assert seen.counts() == [want[c] for c in sorted(want)]
    assert seen.chars == sum(map(len, pieces))


def test_empty_text_cannot_make_a_vocabulary():
    with pytest.raises(RnnkitError):
        CharTokenizer.fit("")


# ------------------------------------------------------------------ words

FABLE = ("long ago , the mice had a general council to consider what measures they could take to outwit "
         "their common enemy , the cat . some said this , and some said that")


def test_word_vocabulary_is_ranked_by_frequency_with_first_occurrence_ties():
    from rnnkit.data.tokenizers import WordTokenizer

    tok = WordTokenizer.fit(FABLE)
    assert tok.words[:5] == [",", "the", "to", "some", "said"]  # 3 times, then the 2s in order of first use
    assert tok.words[5:7] == ["long", "ago"]  # then the singles, also in order of first use
    assert tok.words[-1] == "<unk>"
    assert tok.encode("the mice").tolist() == [1, tok.index["mice"]]


def test_word_min_freq_max_vocab_and_unk():
    from rnnkit.data.tokenizers import WordTokenizer

    tok = WordTokenizer.fit(FABLE, min_freq=2)
    assert tok.words == [",", "the", "to", "some", "said", "<unk>"]
    assert tok.decode(tok.encode("the zebra said")) == "the <unk> said"
    assert tok.unknown_in("the zebra said zebra") == ["zebra"]
    assert WordTokenizer.fit(FABLE, max_vocab=3).words == [",", "the", "<unk>"]
    with pytest.raises(RnnkitError, match="min-freq"):
        WordTokenizer.fit(FABLE, min_freq=100)


@pytest.mark.parametrize("text", [
    "The cat sat on the mat.",
    "Hello, world! It's a fine day; isn't it?",
    "She said: yes (quietly), then left.",
    "A well-known fact, 3.5 times over: 42% of them.",
    'He said "hello there" and smiled.',
])
def test_word_round_trip_on_ordinary_english(text):
    from rnnkit.data.tokenizers import WordTokenizer

    tok = WordTokenizer.fit(text)
    assert tok.decode(tok.encode(text)) == text


def test_word_eos_keeps_line_breaks_and_lowercase():
    from rnnkit.data.tokenizers import WordTokenizer

    text = "The Cat sat.\nThe dog ran.\n"
    tok = WordTokenizer.fit(text, eos=True, lowercase=True)
    assert "<eos>" in tok.words and "The" not in tok.words
    assert tok.decode(tok.encode(text)) == "the cat sat.\nthe dog ran.\n"


def test_word_save_load():
    from rnnkit.data.tokenizers import WordTokenizer

    tok = WordTokenizer.fit(FABLE, eos=True)
    again = tokenizer_from_dict(tok.to_dict())
    assert again.words == tok.words and again.eos


# ------------------------------------------------------------------ BPE


def test_bpe_is_lossless_and_saves():
    from rnnkit.data.tokenizers import BPETokenizer

    text = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 30
            + "东风夜放花千树 🙂\n")
    tok = BPETokenizer.fit(text, vocab_size=300)
    assert tok.vocab_size <= 300
    ids = tok.encode(text)
    assert len(ids) < len(text) / 2  # merges learned: far fewer tokens than characters
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("unseen words ü")) == "unseen words ü"  # bytes: nothing is unknown
    again = tokenizer_from_dict(tok.to_dict())
    assert again.encode(text).tolist() == ids.tolist()


# ------------------------------------------------------------------ lower-casing at every level


@pytest.mark.parametrize("level", ["char", "word", "bpe"])
def test_lowercase_is_applied_to_every_text_and_saved(level):
    from types import SimpleNamespace

    from rnnkit.data.tokenizers import build_tokenizer

    text = "The Cat SAT on the Mat.\nSupposing that Truth is a Woman--what then?\n" * 20
    config = SimpleNamespace(level=level, lowercase=True, eos=False, min_freq=1, max_vocab=0, vocab_size=300)
    tok = build_tokenizer(config, text)
    assert tok.lowercase
    assert tok.encode(text).tolist() == tok.encode(text.lower()).tolist()
    if level != "word":  # word level re-spaces punctuation when decoding
        assert tok.decode(tok.encode(text)) == text.lower()
    assert tok.encode("THE CAT").tolist() == tok.encode("the cat").tolist()  # a prime reads as training did
    if level == "char":
        assert not any(c.isupper() for c in tok.chars)
    again = tokenizer_from_dict(tok.to_dict())
    assert again.lowercase and again.encode("The MAT").tolist() == tok.encode("the mat").tolist()
    config.lowercase = False
    plain = build_tokenizer(config, text)
    assert not plain.lowercase and plain.encode("The").tolist() != plain.encode("the").tolist()


def test_char_lowercase_knows_only_lower_case_and_names_nothing_missing_for_capitals():
    tok = CharTokenizer.fit("Hello World", lowercase=True)
    assert tok.chars == sorted(set("hello world"))
    assert tok.unknown_in("HELLO") == [] and tok.unknown_in("Hi!") == ["!", "i"]
    assert tok.encode("Hi!", unknown="skip").tolist() == tok.encode("h").tolist()


def test_char_lowercase_encodes_letters_that_lengthen_when_lower_cased():
    text = "İstanbul " * 3  # "İ".lower() is "i" + a combining dot: two characters
    tok = CharTokenizer.fit(text, lowercase=True)
    ids = tok.encode(text)
    assert len(ids) == len(text.lower()) > len(text) and tok.decode(ids) == text.lower()


@pytest.mark.parametrize("saved", [
    {"type": "char", "chars": ["a", "B"]},
    {"type": "word", "words": ["a", "<unk>"], "eos": False},
])
def test_a_tokenizer_json_from_before_the_lowercase_setting_loads_without_lowercasing(saved):
    tok = tokenizer_from_dict(saved)
    assert tok.lowercase is False
    assert tok.decode(tok.encode("a")) == "a"


def test_a_lowercase_setting_that_is_not_true_or_false_is_a_one_line_error():
    with pytest.raises(RnnkitError, match="'lowercase' must be true or false"):
        tokenizer_from_dict({"type": "char", "chars": ["a"], "lowercase": "yes"})
