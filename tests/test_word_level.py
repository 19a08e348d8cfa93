"""Word-level and BPE language models: the belling-the-cat recipe, checkpoints, primes, bad input."""

from pathlib import Path

import pytest
import torch

from rnnkit import load_checkpoint, load_config, prepare_lm_data, train_language_model
from rnnkit.cli import main
from rnnkit.evaluation import evaluate_lm

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(scope="module")
def cat_run(tmp_path_factory):
    """The recipe as shipped, with a reduced step budget."""
    out = tmp_path_factory.mktemp("cat") / "run"
    config = load_config(RECIPES / "belling-the-cat.toml")
    config.out = str(out)
    config.train.max_steps, config.train.eval_every, config.train.sample_prefixes = 600, 600, []
    data = prepare_lm_data(config.data)
    result = train_language_model(config, data, out_dir=out)
    return out, data, result


@pytest.mark.slow
def test_recipe_reaches_95_percent_training_accuracy(cat_run):
    out, data, result = cat_run
    ckpt = load_checkpoint(out)
    assert data.tokenizer.vocab_size == 113  # 112 distinct words + <unk>
    assert data.tokenizer.token(0) == "," and data.tokenizer.token(1) == "the"
    loss, count, accuracy = evaluate_lm(ckpt.model, data.train, batch_size=256, seq_len=3, window=3)
    assert count == 204 - 3
    assert accuracy >= 0.95, accuracy
    assert result.train_accuracy >= 0.9


@pytest.mark.slow
def test_story_from_had_a_general(cat_run, capsys):
    out, _, _ = cat_run
    assert main(["generate", "--checkpoint", str(out), "--prime", "had a general", "--length", "8",
                 "--temperature", "0"]) == 0
    story = capsys.readouterr().out
    assert story.startswith("had a general council to consider what measures they could")


@pytest.mark.slow
def test_unknown_words_in_a_prime_become_unk_with_a_warning(cat_run, capsys):
    out, _, _ = cat_run
    assert main(["generate", "--checkpoint", str(out), "--prime", "mouse mouse zebra", "--length", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("mouse mouse <unk> ")
    assert "'zebra'" in captured.err and "<unk>" in captured.err
    assert main(["generate", "--checkpoint", str(out), "--prime", "zebra", "--unknown", "error"]) == 2
    assert "zebra" in capsys.readouterr().err


def test_bpe_checkpoint_round_trip(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--text", str(text), "--out", str(out), "--level", "bpe", "--vocab-size", "300",
                 "--hidden", "32", "--layers", "1", "--seq-len", "8", "--batch-size", "4", "--max-steps", "3",
                 "--quiet"]) == 0
    ckpt = load_checkpoint(out)
    data_tok = prepare_lm_data(ckpt.run_config.data).tokenizer
    sample = "the lazy fox jumps."
    assert ckpt.tokenizer.kind == "bpe"
    assert ckpt.tokenizer.encode(sample).tolist() == data_tok.encode(sample).tolist()
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode(sample)) == sample
    with torch.no_grad():
        ids = torch.tensor([ckpt.tokenizer.encode(sample).tolist()])
        assert torch.isfinite(ckpt.model(ids)[0]).all()


def test_word_level_tied_sequential_and_eval(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat . the dog sat on the log .\n" * 100, encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", "--text", str(text), "--out", str(out), "--level", "word", "--tie-weights",
                 "--sampling", "sequential", "--hidden", "32", "--layers", "2", "--seq-len", "10",
                 "--batch-size", "4", "--max-steps", "150", "--lr", "0.01", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--text", str(text), "--json"]) == 0
    import json

    metrics = json.loads(capsys.readouterr().out)
    assert metrics["perplexity"] < 3  # a 7-word vocabulary with a fixed pattern
    assert metrics["bits_per_char"] < metrics["bits_per_token"]  # a word spans several characters


def _bad(argv, capsys, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_word_level_bad_input(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten\n" * 3, encoding="utf-8")
    out = tmp_path / "run"
    common = ["--text", str(text), "--out", str(out), "--level", "word", "--hidden", "8", "--layers", "1"]
    _bad(["train", *common, "--min-freq", "10"], capsys, "--min-freq")
    _bad(["train", *common, "--window", "100"], capsys, "--seq-len")
    punct = tmp_path / "p.txt"
    punct.write_text("   \n  \n", encoding="utf-8")
    _bad(["train", "--text", str(punct), "--out", str(out), "--level", "word"], capsys, "empty")
    assert not out.exists()
    assert main(["train", *common, "--window", "3", "--max-steps", "2", "--quiet", "--val-fraction", "0"]) == 0
    _bad(["generate", "--checkpoint", str(out), "--prime", ". , !", "--unknown", "skip"], capsys, "empty")
