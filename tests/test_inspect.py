"""`rnnkit inspect`: features by hand, activations equal to the model's own, a quote-tracking unit, CLI and PNGs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit.checkpoint import load_checkpoint, write_checkpoint
from rnnkit.cli import main
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import CharTokenizer, WordTokenizer
from rnnkit.inference import classify_texts
from rnnkit.models.language_model import LanguageModel
from rnnkit.views import (
    attribute,
    char_features,
    inspect_language_model,
    pearson,
    token_features,
    token_spans,
    trace,
)
from tiny import classifier_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


def quoted_text(lines: int, seed: int = 0) -> str:
    """Lines of two-letter words, about half of the runs of words inside "...": the same letters in and out."""
    rng = random.Random(seed)
    words = ["ab", "cd", "ef", "gh", "ij", "kl"]
    out = []
    for _ in range(lines):
        runs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 9))]
        out.append(" ".join(f'"{r}"' if rng.random() < 0.5 else r for r in runs))
    return "\n".join(out) + "\n"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _save(path: Path, model, tokenizer, config: RunConfig, extra=None) -> Path:
    return write_checkpoint(path, model=model, tokenizer=tokenizer, task=config.task, run_config=config,
                            state={"step": 1}, extra=extra)


def _lm(cell: str, *, layers: int = 2, hidden: int = 12, text: str = "ab (cd) \"ef\" 12\n",
        block: str = "plain", mlp_ratio: float = 0.0) -> tuple:
    torch.manual_seed(0)
    config = RunConfig()
    config.model.cell, config.model.hidden, config.model.layers = cell, hidden, layers
    config.model.block, config.model.mlp_ratio = block, mlp_ratio
    tok = CharTokenizer.fit(text)
    return LanguageModel(config=config.model, vocab_size=tok.vocab_size).eval(), tok, config


# ---------------------------------------------------------------- features


def test_char_features_by_hand():
    f = char_features('a "b(1)"\nxy')
    #                  a  _  "  b  (  1  )  "  \n x  y
    assert f["in_quotes"].tolist() == [0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert f["in_brackets"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    assert f["line_position"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]
    assert f["end_of_line"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    assert f["word_start"].tolist() == [1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0]
    assert f["digit"].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]


def test_nested_brackets_and_typographic_quotes():
    f = char_features("((a)b)c \u201cq\u201d")
    assert f["in_brackets"].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert f["in_quotes"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0]


def test_word_tokens_take_their_characters_features():
    tok = WordTokenizer.fit('he said "no 42 ( yes )" .')
    ids = tok.encode('he said "no 42 ( yes )" .', unknown="unk").tolist()
    text, spans = token_spans(tok, ids)
    assert "".join(text[a:b] for a, b in spans) == text
    # Each span ends where the prefix up to that token ends, decoded whole (quotes change the spacing).
    assert [b for _, b in spans] == [len(tok.decode(ids[: k + 1])) for k in range(len(ids))]
    words = [text[a:b].strip() for a, b in spans]
    f = token_features(text, spans)
    assert [w for w, q in zip(words, f["in_quotes"], strict=True) if q] == ['"', "no", "42", "(", "yes", ")"]
    assert [w for w, d in zip(words, f["digit"], strict=True) if d] == ["42"]
    assert [w for w, b in zip(words, f["in_brackets"], strict=True) if b] == ["(", "yes"]


@pytest.mark.parametrize("level", ["word", "bpe"])
def test_word_and_bpe_models_are_inspected_per_token(level):
    text = 'she said "yes (twice)" at 9 and left\nhe said "no" at 10\n' * 3
    if level == "bpe":
        pytest.importorskip("tokenizers")
        from rnnkit.data.tokenizers import BPETokenizer

        tok = BPETokenizer.fit(text, vocab_size=300)
    else:
        tok = WordTokenizer.fit(text, eos=True)
    torch.manual_seed(0)
    config = RunConfig()
    config.model.hidden, config.model.layers = 8, 1
    model = LanguageModel(config=config.model, vocab_size=tok.vocab_size).eval()
    ins = inspect_language_model(model, tok, text, top=2)
    tr = ins.trace
    assert "".join(tr.text[a:b] for a, b in tr.spans) == tr.text and len(tr.spans) == len(tr.ids)
    pieces = [tr.text[a:b] for a, b in tr.spans]
    digits = [p for p, d in zip(pieces, ins.features["digit"], strict=True) if d]
    assert digits and all(any(ch.isdigit() for ch in p) for p in digits)
    assert ins.ranking["in_quotes"][0].signal in ("h", "c") and len(ins.ranking["in_quotes"]) == 2


def test_pearson_is_numpys_and_zero_for_a_constant():
    rng = np.random.default_rng(0)
    values, feature = rng.normal(size=(50, 3)), rng.normal(size=50)
    values[:, 2] = 4.0
    r = pearson(values, feature)
    for j in range(2):
        assert r[j] == pytest.approx(np.corrcoef(values[:, j], feature)[0, 1], abs=1e-12)
    assert r[2] == 0.0
    assert pearson(values, np.ones(50)).tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- activations


BLOCKS = [("plain", 0.0), ("residual", 0.0), ("residual", 2.0)]


@pytest.mark.parametrize(("block", "mlp_ratio"), BLOCKS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mingru", "minlstm"])
def test_the_trace_is_the_models_own_forward(cell, block, mlp_ratio):
    model, tok, _ = _lm(cell, block=block, mlp_ratio=mlp_ratio)
    ids = tok.encode("ab (cd) \"ef\" 12\nab").tolist()
    tr = trace(model, tok, ids)
    assert list(tr.signals) == (["h", "c"] if cell == "lstm" else ["h"])
    assert tr.signals["h"].shape == (len(ids), 2, 12)
    for t in (0, 5, len(ids) - 1):  # the state after token t is the window forward's final state over ids[:t+1]
        with torch.no_grad():
            _, state = model(torch.tensor([ids[: t + 1]]))
        for name, final in zip(tr.signals, state, strict=True):
            np.testing.assert_allclose(tr.signals[name][t], final[:, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize(("block", "mlp_ratio"), BLOCKS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "mingru", "minlstm"])
def test_the_gates_rebuild_the_stepped_state(cell, block, mlp_ratio):
    model, tok, _ = _lm(cell, block=block, mlp_ratio=mlp_ratio)
    ids = tok.encode("ab (cd) \"ef\" 12\nab").tolist()
    tr = trace(model, tok, ids, gates=True)
    h = torch.tensor(tr.signals["h"])  # (T, L, H)
    g = {k: torch.tensor(v) for k, v in tr.signals.items()}
    before = torch.cat([torch.zeros_like(h[:1]), h[:-1]])  # h_{t-1}
    if cell == "lstm":
        c = g["c"]
        c_before = torch.cat([torch.zeros_like(c[:1]), c[:-1]])
        torch.testing.assert_close(g["f"] * c_before + g["i"] * g["g"], c, atol=1e-5, rtol=0)
        torch.testing.assert_close(g["o"] * torch.tanh(c), h, atol=1e-5, rtol=0)
    elif cell == "gru":
        torch.testing.assert_close((1 - g["z"]) * g["n"] + g["z"] * before, h, atol=1e-5, rtol=0)
    elif cell == "mingru":
        torch.testing.assert_close((1 - g["z"]) * before + g["z"] * g["candidate"], h, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(g["f"] * before + g["i"] * g["candidate"], h, atol=1e-5, rtol=0)


def test_gates_of_a_vanilla_rnn_are_refused():
    model, tok, _ = _lm("rnn")
    with pytest.raises(Exception, match="vanilla RNN has no gates"):
        trace(model, tok, [0, 1, 2], gates=True)


# ---------------------------------------------------------------- a unit that tracks quotes


@pytest.fixture(scope="module")
def quotes_run(tmp_path_factory):
    """A tiny char LSTM trained for a few seconds on text full of quotations."""
    folder = tmp_path_factory.mktemp("inspect")
    (folder / "train.txt").write_text(quoted_text(400), encoding="utf-8")
    (folder / "probe.txt").write_text(quoted_text(60, seed=1), encoding="utf-8")
    code = main(["train", "--text", str(folder / "train.txt"), "--out", str(folder / "run"), "--model", "lstm",
                 "--hidden", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "16", "--lr", "0.01",
                 "--max-steps", "300", "--eval-every", "1000", "--log-every", "100", "--threads", "1", "--quiet"])
    assert code == 0
    return folder


def test_a_trained_model_has_a_unit_that_tracks_quotes(quotes_run):
    ckpt = load_checkpoint(quotes_run / "run")
    text = (quotes_run / "probe.txt").read_text(encoding="utf-8")
    ins = inspect_language_model(ckpt.model, ckpt.tokenizer, text, top=3)
    best = ins.ranking["in_quotes"][0]
    everyone = np.abs(pearson(np.concatenate([ins.trace.signals[s][:, 0] for s in ("h", "c")], axis=1),
                              ins.features["in_quotes"]))
    assert abs(best.r) == pytest.approx(everyone.max())
    assert abs(best.r) > 0.5 and abs(best.r) > 2 * np.median(everyone), (best, np.median(everyone))
    # An untrained model of the same shape has no such unit: the training made it.
    model, tok, _ = _lm("lstm", layers=1, hidden=32, text=text)
    untrained = inspect_language_model(model, tok, text, top=1).ranking["in_quotes"][0]
    assert abs(untrained.r) < abs(best.r) - 0.15


def test_cli_prints_the_ranking_as_json_and_draws_the_pngs(quotes_run, capsys):
    code, out, err = run(["inspect", "--checkpoint", quotes_run / "run", "--text", quotes_run / "probe.txt",
                          "--top", "3", "--gates", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["layer"] == 0 and data["signals"] == ["h", "c", "i", "f", "g", "o"]
    assert set(data["ranking"]) == {"in_quotes", "line_position", "end_of_line", "word_start"}
    assert set(data["constant_features"]) == {"in_brackets", "digit"}  # the probe has neither
    for units in data["ranking"].values():
        assert len(units) == 3 and all(set(u) == {"signal", "unit", "r"} for u in units)
        assert [abs(u["r"]) for u in units] == sorted((abs(u["r"]) for u in units), reverse=True)
    folder = quotes_run / "run" / "inspect"
    assert data["files"] == [str(folder / "units.png"), str(folder / "heatmap.png")]
    for name in ("units.png", "heatmap.png"):
        content = (folder / name).read_bytes()
        assert content.startswith(PNG) and len(content) > 10_000
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_cli_table_and_out_folder(quotes_run, capsys, tmp_path):
    code, out, err = run(["inspect", "--checkpoint", quotes_run / "run", "--text", quotes_run / "probe.txt",
                          "--top", "2", "--out", tmp_path / "views"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("# layer 0,") and lines[1].split() == ["feature", "rank", "unit", "r"]
    assert lines[2].split()[:2] == ["in_quotes", "1"] and "constant in this text" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "views").iterdir()) == ["heatmap.png", "units.png"]


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    model, tok, config = _lm("rnn", layers=2)
    echo = RunConfig(task="echo")
    echo.model.hidden = 4
    echo_tok = CharTokenizer.fit("01")
    (root / "text.txt").write_text("ab (cd) \"ef\" 12\n", encoding="utf-8")
    return {"rnn": _save(root / "rnn", model, tok, config), "text": root / "text.txt", "root": root,
            "echo": _save(root / "echo", LanguageModel(config=echo.model, vocab_size=2), echo_tok, echo)}


@pytest.mark.parametrize(("extra", "message"), [
    (["--layer", "2"], "layer 2 is out of range: this model has 2 layer(s), 0..1"),
    (["--layer", "-1"], "layer -1 is out of range"),
    (["--top", "0"], "top 0 is out of range: show at least 1"),
    (["--top", "14"], "top 14 is out of range: a layer has 12 units, so 1..12"),
    (["--top", "13"], "top 13 is out of range"),
    (["--gates"], "a vanilla RNN has no gates (this checkpoint's cell is 'rnn'); inspect it without gates"),
])
def test_bad_flags_are_one_line_errors_and_write_nothing(small_runs, capsys, tmp_path, extra, message):
    code, out, err = run(["inspect", "--checkpoint", small_runs["rnn"], "--text", small_runs["text"],
                          "--out", tmp_path / "views", *extra], capsys)
    assert code == 2 and out == ""
    assert err.startswith("rnnkit: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "views").exists()


def test_flags_a_classifier_cannot_use(classifier, small_runs, capsys, tmp_path):
    for extra, message in ((["--layer", "0"], "layers and gates are for language models"),
                           (["--gates"], "layers and gates are for language models"),
                           (["--top", "0"], "top 0 is out of range: show at least 1"),
                           (["--max-tokens", "-1"], "max tokens must be >= 0")):
        code, out, err = run(["inspect", "--checkpoint", classifier, "--text", small_runs["text"],
                              "--out", tmp_path / "views", *extra], capsys)
        assert code == 2 and out == "" and message in err and err.count("\n") == 1
    assert not (tmp_path / "views").exists()


def test_an_echo_checkpoint_is_the_wrong_kind(small_runs, capsys, tmp_path):
    code, _, err = run(["inspect", "--checkpoint", small_runs["echo"], "--text", small_runs["text"],
                        "--out", tmp_path / "views"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "holds a echo-task model checkpoint, but `rnnkit inspect` needs a language model or a classifier" in err
    assert "pass a run trained with --task language_model" in err and not (tmp_path / "views").exists()


def test_missing_text_and_an_out_that_is_a_file(small_runs, capsys, tmp_path):
    code, _, err = run(["inspect", "--checkpoint", small_runs["rnn"], "--text", tmp_path / "nope.txt"], capsys)
    assert code == 2 and "nope.txt" in err and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    code, _, err = run(["inspect", "--checkpoint", small_runs["rnn"], "--text", small_runs["text"],
                        "--out", tmp_path / "file"], capsys)
    assert code == 2 and "is a file; give a folder for the PNGs" in err


# ---------------------------------------------------------------- classifiers


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return classifier_checkpoint(tmp_path_factory.mktemp("cls") / "cls")


def test_attribution_follows_the_prefixes_to_the_classifiers_answer(classifier):
    ckpt = load_checkpoint(classifier)
    labels = ckpt.meta["labels"]
    a = attribute(ckpt.model, ckpt.tokenizer, labels, "a good film , dull plot", max_len=80)
    probs, _ = classify_texts(ckpt.model, ckpt.tokenizer, labels, ["a good film , dull plot"], max_len=80)
    assert a.label == labels[int(probs[0].argmax())] and a.probability == pytest.approx(probs[0].max(), abs=1e-6)
    assert [t.strip() for t in a.tokens] == ["a", "good", "film", ",", "dull", "plot"]
    assert a.p[-1] == pytest.approx(a.probability)
    assert a.change.sum() == pytest.approx(a.probability - a.before, abs=1e-6)
    k = labels.index(a.label)
    for n in range(1, len(a.tokens) + 1):  # each p is the classifier's answer on that prefix
        prefix = " ".join(t.strip() for t in a.tokens[:n])
        assert a.p[n - 1] == pytest.approx(classify_texts(ckpt.model, ckpt.tokenizer, labels, [prefix],
                                                          max_len=80)[0][0, k], abs=1e-6)


def test_attribution_cuts_long_texts_as_the_classifier_does(classifier):
    ckpt = load_checkpoint(classifier)
    labels = ckpt.meta["labels"]
    text = "a good film , dull plot"
    kept_end = attribute(ckpt.model, ckpt.tokenizer, labels, text, max_len=3)
    kept_start = attribute(ckpt.model, ckpt.tokenizer, labels, text, max_len=3, truncate="post")
    assert [t.strip() for t in kept_end.tokens] == [",", "dull", "plot"]
    assert [t.strip() for t in kept_start.tokens] == ["a", "good", "film"]
    probs, _ = classify_texts(ckpt.model, ckpt.tokenizer, labels, [text], max_len=3, truncate="pre")
    assert kept_end.probability == pytest.approx(probs[0].max(), abs=1e-6)


def test_cli_on_a_classifier_draws_the_words(classifier, capsys, tmp_path):
    (tmp_path / "texts.txt").write_text("a good film\n\ndull plot , bad ending\n", encoding="utf-8")
    code, out, err = run(["inspect", "--checkpoint", classifier, "--text", tmp_path / "texts.txt",
                          "--out", tmp_path / "views", "--json", "--unknown", "skip"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert [len(t["tokens"]) for t in data["texts"]] == [3, 4]  # "ending" was never seen: skipped
    assert data["files"] == [str(tmp_path / "views" / "words.png")]
    assert (tmp_path / "views" / "words.png").read_bytes().startswith(PNG)
