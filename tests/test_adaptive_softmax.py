"""--softmax adaptive: the head's log-probabilities and loss, training to serving on a word-level run, bad input."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from rnnkit.checkpoint import load_checkpoint
from rnnkit.cli import main
from rnnkit.config import ModelConfig, RunConfig
from rnnkit.data.tokenizers import WordTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_lm
from rnnkit.generation import generate_ids
from rnnkit.models import eval_mode
from rnnkit.models.adaptive import default_cutoffs
from rnnkit.models.language_model import LanguageModel
from rnnkit.training.compare import compare_sampling
from rnnkit.training.session import Resume, StopFlag, Stopped
from test_resume import StopAt, assert_identical, train_lm, weights

# A Zipfian-ish text: a few words very often, many words rarely.
WORDS = [f"w{i}" for i in range(60)]
TEXT = " ".join(WORDS[min(int(r) - 1, 59)] for r in np.random.default_rng(0).zipf(1.3, 3000)) + "\n"
FAST = ["--level", "word", "--softmax", "adaptive", "--cutoffs", "8,24", "--hidden", "32", "--layers", "1",
        "--seq-len", "12", "--batch-size", "4", "--eval-every", "10", "--log-every", "5", "--threads", "1",
        "--sample-length", "5"]


def adaptive_model(vocab: int = 50, **kwargs) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(softmax="adaptive", hidden=32, layers=1, cutoffs=[5, 20], **kwargs)
    return LanguageModel(config=config, vocab_size=vocab).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru", "minlstm"])
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_scores_are_log_probabilities_and_the_step_agrees(cell, input_kind):
    model = adaptive_model(cell=cell, input=input_kind)
    ids = torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores, state = model(ids)  # (B, T, V)
    assert scores.shape == (3, 9, 50)
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(3, 9))
    step, carried = model.stepper(), None
    for t in range(9):
        out, carried = step(ids[:, t], carried)
        torch.testing.assert_close(out, scores[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last", [False, True])
def test_loss_is_minus_the_gathered_log_probability(last):
    model = adaptive_model().train()
    g = torch.Generator().manual_seed(2)
    ids, targets = torch.randint(0, 50, (4, 7), generator=g), torch.randint(0, 50, (4, 7), generator=g)
    targets[0, :4] = torch.tensor([0, 5, 20, 49])  # the edges of the shortlist and of each cluster
    if last:
        targets = targets[:, -1]
    with eval_mode(model), torch.no_grad():
        scores, _ = model(ids)
        nll, predicted, _ = model.nll(ids, targets)
    scores = scores[:, -1] if last else scores
    assert nll.shape == predicted.shape == targets.shape
    torch.testing.assert_close(nll, -scores.gather(-1, targets[..., None])[..., 0])
    assert torch.equal(predicted, scores.argmax(-1))
    # and it trains: the loss has gradients for the head's clusters too
    loss = model.nll(ids, targets)[0].mean()
    loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_loss_matches_torch_and_runs_under_autocast():
    model = adaptive_model().train()
    g = torch.Generator().manual_seed(4)
    h, targets = torch.randn(40, 32, generator=g), torch.randint(0, 50, (40,), generator=g)
    reference = torch.nn.AdaptiveLogSoftmaxWithLoss.forward(model.head, h, targets).output
    nll, predicted = model.head.nll(h, targets)
    torch.testing.assert_close(nll, -reference)
    assert (model.head.head(h).argmax(-1) >= model.head.shortlist_size).any()  # some rows need their clusters
    assert torch.equal(predicted, model.head.predict(h))  # torch's argmax over the full log-probabilities
    ids = torch.randint(0, 50, (4, 10), generator=g)
    exact = model.nll(ids, ids)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 projections, float log-softmax
        nll, _, _ = model.nll(ids, ids)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, exact, atol=0.1, rtol=0.02)
    nll.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.head.parameters())


def test_full_softmax_nll_is_the_cross_entropy():
    torch.manual_seed(0)
    model = LanguageModel(config=ModelConfig(hidden=16, layers=1), vocab_size=30).eval()
    ids, targets = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 5))
    with torch.no_grad():
        logits, _ = model(ids)
        nll, predicted, _ = model.nll(ids, targets)
    torch.testing.assert_close(nll, F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
    assert torch.equal(predicted, logits.argmax(-1))


@pytest.mark.parametrize("window", [0, 4])
def test_evaluation_uses_the_cheap_loss_with_the_same_numbers(window):
    model = adaptive_model()
    ids = np.random.default_rng(3).integers(0, 50, 400).astype(np.uint16)
    loss, count, accuracy = evaluate_lm(model, ids, batch_size=4, seq_len=10, window=window)
    model.adaptive = False  # the same model read through its (B, T, V) log-probabilities instead
    reference = evaluate_lm(model, ids, batch_size=4, seq_len=10, window=window)
    assert count == reference[1] and accuracy == reference[2]
    assert loss == pytest.approx(reference[0], rel=1e-5)


def test_default_cutoffs_split_the_frequency_ranked_word_ids():
    assert default_cutoffs(31_925) == [1995, 7981]
    assert default_cutoffs(20) == [1, 5] and default_cutoffs(3) == []
    tok = WordTokenizer.fit(TEXT)
    counts = np.bincount(tok.encode(TEXT), minlength=tok.vocab_size)
    words = counts[: tok.vocab_size - 1]  # <unk> comes last
    assert (np.diff(words) <= 0).all()  # word ids are in frequency order: id 0 is the most frequent
    model = LanguageModel(config=ModelConfig(softmax="adaptive", hidden=32, layers=1), vocab_size=tok.vocab_size)
    shortlist = model.head.shortlist_size
    assert 0 < shortlist < tok.vocab_size and counts[:shortlist].min() >= counts[shortlist:].max()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adaptive")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    argv = ["train", "--text", folder / "text.txt", "--out", folder / "run", "--max-steps", "30", "--quiet", *FAST]
    assert main([str(a) for a in argv]) == 0
    return folder


def test_cli_train_generate_eval(run, capsys):
    capsys.readouterr()
    ckpt = load_checkpoint(run / "run")
    assert ckpt.model.adaptive and ckpt.model.head.cutoffs == [8, 24, ckpt.tokenizer.vocab_size]
    with safe_open(str(ckpt.path / "model.safetensors"), "pt") as f:
        assert {"head.head.weight", "head.head.bias", "head.tail.1.1.weight"} <= set(f.keys())
    history = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if "loss" in r]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    assert losses[-1] < losses[0] and val[-1] < math.log(ckpt.tokenizer.vocab_size)  # it learns
    argv = ["generate", "--checkpoint", run / "run", "--prime", "w0 w1", "--length", "6", "--seed", "1"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("w0 w1 ") and len(out.split()) == 8
    assert main([str(a) for a in [*argv[:-2], "--temperature", "0"]]) == 0  # greedy: the argmax of the log-probs
    greedy = capsys.readouterr().out.split()[2:]
    prime = ckpt.tokenizer.encode("w0 w1").tolist()
    expected = generate_ids(ckpt.model, prime, length=6, temperature=0.0, generator=torch.Generator())[0]
    assert greedy == [ckpt.tokenizer.token(i) for i in expected]
    assert main(["eval", "--checkpoint", str(run / "run"), "--text", str(run / "text.txt"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 1 < metrics["perplexity"] < ckpt.tokenizer.vocab_size and metrics["tokens"] > 2000
    assert main(["vocab", "--checkpoint", str(run / "run"), "--top", "3"]) == 0 and "w0" in capsys.readouterr().out
    assert main(["inspect", "--checkpoint", str(run / "run"), "--text", str(run / "text.txt"), "--max-tokens", "200",
                 "--no-png", "--json"]) == 0  # it reads the recurrent units, whatever the head
    assert json.loads(capsys.readouterr().out)
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run / "run"), "--out", str(run / "curves.png")]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_beam_search_scores_are_the_heads_log_probabilities(run, capsys):
    capsys.readouterr()
    argv = ["generate", "--checkpoint", run / "run", "--prime", "w0 w1", "--length", "4", "--beam", "3",
            "--num-samples", "2", "--json"]
    assert main([str(a) for a in argv]) == 0
    hypotheses = json.loads(capsys.readouterr().out)["hypotheses"]
    ckpt = load_checkpoint(run / "run")
    prime = ckpt.tokenizer.encode("w0 w1").tolist()
    assert len(hypotheses) == 2 and hypotheses[0]["log_prob"] >= hypotheses[1]["log_prob"]
    for h in hypotheses:
        ids = ckpt.tokenizer.encode(h["text"]).tolist()
        assert ids[:2] == prime and len(ids) == 6
        with torch.no_grad():
            scores, _ = ckpt.model(torch.tensor([ids[:-1]]))  # (1, 5, V) log-probabilities
        teacher = scores[0, 1:].gather(-1, torch.tensor(ids[2:])[:, None]).sum().item()
        assert h["log_prob"] == pytest.approx(teacher, abs=1e-4)


def test_served_adaptive_model_generates(run):
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    from fastapi.testclient import TestClient

    from rnnkit.server import create_app

    ckpt = load_checkpoint(run / "run")
    client = TestClient(create_app(ckpt))
    response = client.post("/generate", json={"prime": "w0", "length": 5, "temperature": 0})
    assert response.status_code == 200, response.text
    expected = generate_ids(ckpt.model, [ckpt.tokenizer.encode("w0")[0]], length=5, temperature=0.0,
                            generator=torch.Generator())[0]
    assert response.json()["texts"][0].split() == [ckpt.tokenizer.token(i) for i in expected]


@pytest.mark.parametrize("stop_at", [4, 10])
def test_resume_is_bitwise_identical(tmp_path, stop_at):
    config = RunConfig.from_dict({"data": {"level": "word", "seq_len": 12, "batch_size": 4},
                                  "model": {"softmax": "adaptive", "cutoffs": [6], "hidden": 24, "layers": 1,
                                            "dropout": 0.1},
                                  "train": {"max_steps": 16, "eval_every": 5, "log_every": 1, "sample_length": 4,
                                            "threads": 1}})
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    config.data.text = str(tmp_path / "text.txt")
    train_lm(config, tmp_path / "straight")
    flag = StopFlag()
    with pytest.raises(Stopped):
        train_lm(config, tmp_path / "resumed", reporter=StopAt(flag, stop_at), stop=flag)
    assert train_lm(config, tmp_path / "resumed", resume=Resume.from_run(tmp_path / "resumed")).steps == 16
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_compare_sampling_runs_with_an_adaptive_head(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    config = RunConfig.from_dict({"data": {"text": str(tmp_path / "text.txt"), "level": "word", "seq_len": 10,
                                           "batch_size": 4, "val_fraction": 0.1},
                                  "model": {"softmax": "adaptive", "hidden": 16, "layers": 1},
                                  "train": {"epochs": 2, "seed": 0, "threads": 1}})
    result = compare_sampling(config, every=1, length=3, prefixes=["w0"])
    assert all(row.val_perplexity is not None and 1 < row.val_perplexity < result.vocab_size for row in result.rows)


def test_old_configs_keep_the_full_softmax():
    config = RunConfig.from_dict({"model": {"hidden": 8}})
    assert (config.model.softmax, config.model.cutoffs, config.model.div_value) == ("full", [], 4.0)
    assert isinstance(LanguageModel(config=config.model, vocab_size=10).head, torch.nn.Linear)


@pytest.mark.parametrize(("flags", "message"), [
    (["--level", "char", "--softmax", "adaptive"], "--softmax adaptive needs --level word"),
    (["--level", "bpe", "--softmax", "adaptive"], "--softmax adaptive needs --level word"),
    (["--level", "word", "--softmax", "adaptive", "--tie-weights"], "cannot --tie-weights"),
    (["--level", "word", "--softmax", "adaptive", "--div-value", "1"], "'model.div_value' must be greater than 1"),
    (["--level", "word", "--softmax", "adaptive", "--cutoffs", "9,4"], "--cutoffs must be increasing ids"),
    (["--level", "word", "--softmax", "adaptive", "--cutoffs", "9", "x"], "must be an integer"),
    (["--level", "word", "--softmax", "adaptive", "--cutoffs", "5", "900"], "--cutoffs must be increasing ids"),
    (["--level", "word", "--softmax", "adaptive", "--cutoffs", "2", "4", "8", "--hidden", "16"], "too narrow"),
    (["--task", "echo", "--softmax", "adaptive"], "--softmax adaptive is for the language model"),
])
def test_bad_input_is_one_line_and_leaves_no_run(tmp_path, capsys, flags, message):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", "--text", str(tmp_path / "text.txt"), "--out", str(out), "--max-steps", "2", "--quiet",
                 "--hidden", "32", "--layers", "1", "--threads", "1", "--seq-len", "12", "--batch-size", "4", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "checkpoints").exists()


def test_a_checkpoint_whose_cutoffs_were_edited_is_refused_in_one_line(run, tmp_path, capsys):
    ckpt = shutil.copytree(load_checkpoint(run / "run").path, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["run"]["model"]["cutoffs"] = [4, 24]  # the weights have a shortlist of 8
    (ckpt / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ckpt), "--length", "3"]) == 2
    err = capsys.readouterr().err
    assert "do not match its config.json" in err and len(err.strip().splitlines()) == 1, err


def test_library_refuses_cutoffs_past_the_vocabulary():
    with pytest.raises(RnnkitError, match="between 1 and 9"):
        LanguageModel(config=ModelConfig(softmax="adaptive", hidden=8, cutoffs=[3, 10]), vocab_size=10)


def test_default_cutoffs_are_recorded_in_the_run(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    flags = [a for a in FAST if a not in ("--cutoffs", "8,24")]
    assert main(["train", "--text", str(tmp_path / "text.txt"), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--quiet", *flags]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    expected = default_cutoffs(ckpt.tokenizer.vocab_size)
    assert ckpt.model.head.cutoffs[:-1] == expected
    config = json.loads((ckpt.path / "config.json").read_text())
    assert config["model"]["cutoffs"] == expected
    assert f"cutoffs = [{expected[0]}, {expected[1]}]" in (tmp_path / "run" / "config.toml").read_text()
