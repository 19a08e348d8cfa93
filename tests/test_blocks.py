"""Residual blocks (``--block residual``, ``--mlp-ratio``): the model, its bound step, and every command on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rnnkit.checkpoint import load_checkpoint, write_checkpoint
from rnnkit.cli import main
from rnnkit.config import ModelConfig, RunConfig
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.generation import generate_ids
from rnnkit.models.blocks import ResidualStack
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import CELLS, Recurrent

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 30
TINY = ["--hidden", "16", "--layers", "2", "--seq-len", "12", "--batch-size", "4", "--threads", "1",
        "--sample-length", "5", "--log-every", "1", "--quiet"]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "engine"


def make(cell="lstm", **kw) -> LanguageModel:
    torch.manual_seed(0)
    kw.setdefault("hidden", 16)
    return LanguageModel(config=ModelConfig(cell=cell, block="residual", **kw), vocab_size=30).eval()


def random_state(model: LanguageModel, batch: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn_like(s) for s in model.initial_state(batch))


# ---------------------------------------------------------------- the model


@pytest.mark.parametrize("backend", ["fused", "scratch"])
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])  # onehot: V = 30 != H, so an input projection
@pytest.mark.parametrize("mlp_ratio", [0, 2])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_bound_step_equals_forward_one_token_at_a_time(cell, layers, mlp_ratio, input_kind, backend):
    model = make(cell, layers=layers, mlp_ratio=mlp_ratio, input=input_kind, backend=backend)
    ids = torch.randint(0, 30, (3, 7))
    start = random_state(model, 3)  # a carried, non-zero state
    with torch.inference_mode():
        step = model.stepper()
        assert step.table is None  # layer 0 reads LN(x), not the token alone
        stepped, state = [], start
        for t in range(ids.shape[1]):
            logits, state = step(ids[:, t], state)  # (B,) -> (B, V)
            stepped.append(logits)
        whole, whole_state = model(ids, start)
    torch.testing.assert_close(torch.stack(stepped, dim=1), whole, rtol=0, atol=1e-5)
    assert len(state) == len(whole_state) == (2 if cell == "lstm" else 1)
    for a, b in zip(state, whole_state, strict=True):
        assert a.shape == (layers, 3, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_forward_computes_the_block_equations():
    """x = W_in e + b_in; x += rnn_k(LN_k(x)); x += MLP_k(LN'_k(x)); logits = head(LN_f(x)), by hand."""
    model = make("gru", layers=2, mlp_ratio=3, embedding_dim=10)
    stack = model.recurrent
    ids = torch.randint(0, 30, (2, 5))
    start = random_state(model, 2)
    with torch.no_grad():
        x = stack.input_proj(model.embedding(ids))  # (B, T, H)
        finals = []
        for k, block in enumerate(stack.blocks):
            ln = F.layer_norm(x, (16,), block.norm.weight, block.norm.bias)
            out, (h,) = block.recurrent(ln, (start[0][k : k + 1],))
            x = x + out
            u = F.layer_norm(x, (16,), block.mlp_norm.weight, block.mlp_norm.bias)
            x = x + F.linear(F.gelu(F.linear(u, block.mlp_up.weight, block.mlp_up.bias)),
                             block.mlp_down.weight, block.mlp_down.bias)
            finals.append(h)
        expected = model.head(F.layer_norm(x, (16,), stack.norm.weight, stack.norm.bias))
        logits, (h,) = model(ids, start)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(h, torch.cat(finals), rtol=0, atol=0)


def test_parameters_of_each_mode():
    plain = LanguageModel(config=ModelConfig(cell="lstm", hidden=16, layers=2), vocab_size=30)
    assert isinstance(plain.recurrent, Recurrent)
    assert not any("norm" in n or "mlp" in n or "proj" in n for n in plain.state_dict())
    residual = make("lstm", layers=2, mlp_ratio=4, embedding_dim=8)
    assert isinstance(residual.recurrent, ResidualStack)
    names = set(residual.state_dict())
    assert {"recurrent.input_proj.weight", "recurrent.norm.weight", "recurrent.blocks.1.norm.bias",
            "recurrent.blocks.1.mlp_up.weight", "recurrent.blocks.1.mlp_down.bias",
            "recurrent.blocks.0.recurrent.rnn.weight_hh_l0"} <= names
    assert residual.recurrent.blocks[0].mlp_up.weight.shape == (64, 16)  # 4 x hidden
    # No MLP asked, no projection needed (embedding width = hidden): neither exists.
    bare = set(make("mingru", layers=1).state_dict())
    assert not any("mlp" in n or "input_proj" in n for n in bare)
    assert "recurrent.blocks.0.recurrent.rnn.weight_ih_l0" in bare


def test_dropout_acts_per_block_in_training_only():
    model = make("mingru", layers=2, mlp_ratio=2, dropout=0.5)
    ids = torch.randint(0, 30, (2, 6))
    with torch.no_grad():
        model.train()
        a, _ = model(ids)
        b, _ = model(ids)
        model.eval()
        c, _ = model(ids)
        d, _ = model(ids)
    assert not torch.equal(a, b) and torch.equal(c, d)
    assert all(block.dropout.p == 0.5 for block in model.recurrent.blocks)


def test_gradients_reach_every_parameter():
    model = make("minlstm", layers=2, mlp_ratio=2, input="onehot").train()
    logits, _ = model(torch.randint(0, 30, (2, 6)))
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------- configuration


def test_old_configs_without_the_fields_are_plain():
    config = RunConfig.from_dict({"model": {"cell": "lstm", "hidden": 16}})
    assert config.model.block == "plain" and config.model.mlp_ratio == 0
    if (FIXTURES / "old-checkpoint").is_dir():
        old = json.loads((FIXTURES / "old-checkpoint" / "config.json").read_text(encoding="utf-8"))
        assert "block" not in old["run"]["model"]
        assert load_checkpoint(FIXTURES / "old-checkpoint").run_config.model.block == "plain"


def bad(argv, capsys, match: str, out: Path) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnkit: error: ") and match in lines[0], err
    assert "Traceback" not in err and not out.exists()  # nothing half-written


def test_nonsense_settings_are_one_line_errors(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "run"
    common = ["train", "--text", text, "--out", out, "--max-steps", "2", *TINY]
    for ratio in ("-1", "inf", "nan"):
        bad([*common, "--block", "residual", "--mlp-ratio", ratio], capsys, "must be between 0 and 64", out)
    bad([*common, "--mlp-ratio", "4"], capsys, "add --block residual", out)
    bad([*common, "--block", "residual", "--mlp-ratio", "0.01"], capsys, "no units", out)
    bad([*common, "--block", "sideways"], capsys, "invalid choice", out)
    bad([*common, "--task", "classify", "--block", "residual"], capsys, "the classifier stacks plain layers", out)


# ---------------------------------------------------------------- every command on a residual model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocks")
    text = folder / "play.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = ["--text", text, "--block", "residual", "--mlp-ratio", "2", "--model", "mingru", "--embedding-dim", "8",
            "--dropout", "0.1", "--lr-schedule", "constant", "--eval-every", "3", *TINY]
    assert main([str(a) for a in ["train", "--out", folder / "straight", "--max-steps", "6", *argv]]) == 0
    assert main([str(a) for a in ["train", "--out", folder / "run", "--max-steps", "3", *argv]]) == 0
    return folder


def test_train_then_resume_is_exact(trained, capsys):
    assert main(["train", "--resume", str(trained / "run"), "--block", "plain", "--max-steps", "6"]) == 2
    assert "cannot change model.block" in capsys.readouterr().err
    assert main(["train", "--resume", str(trained / "run"), "--max-steps", "6", "--quiet"]) == 0
    straight = load_checkpoint(trained / "straight", prefer="last")
    resumed = load_checkpoint(trained / "run", prefer="last")
    assert resumed.meta["state"]["step"] == 6 and resumed.run_config.model.block == "residual"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and "recurrent.blocks.1.mlp_up.weight" in a and "recurrent.input_proj.bias" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generate_eval_and_plot(trained, capsys):
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(trained / "straight"), "--prime", "ROMEO:", "--length", "20",
            "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 20 + 1
    # The CLI's text is the bound step's: the library on the loaded checkpoint gives the same ids.
    ckpt = load_checkpoint(trained / "straight")
    prime = ckpt.tokenizer.encode("ROMEO:").tolist()
    ids = generate_ids(ckpt.model, prime, length=20, temperature=0.0)[0]
    assert main(["generate", "--checkpoint", str(trained / "straight"), "--prime", "ROMEO:", "--length", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == ckpt.tokenizer.decode(prime + ids) + "\n"
    assert main(["eval", "--checkpoint", str(trained / "straight"), "--text", str(trained / "play.txt"),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["tokens"] > 1000 and 1 < metrics["perplexity"] < ckpt.tokenizer.vocab_size * 2
    assert main(["plot", str(trained / "straight")]) == 0
    assert (trained / "straight" / "plots" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_sampling_runs_residual_models(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    argv = ["compare-sampling", "--text", str(text), "--block", "residual", "--model", "lstm", "--hidden", "16",
            "--layers", "1", "--seq-len", "12", "--batch-size", "4", "--epochs", "2", "--every", "1",
            "--sample-prefixes", "ROMEO", "--sample-length", "4", "--lr", "0.01", "--threads", "1", "--json",
            "--quiet"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["sampling"] for row in result["rows"]] == ["random", "sequential"] * 2
    assert all(row["continuations"]["ROMEO"].startswith("ROMEO") for row in result["rows"])


def test_a_served_session_steps_a_residual_model(tmp_path):
    pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install 'rnnkit[serve]'")
    from fastapi.testclient import TestClient

    from rnnkit.server import create_app

    config = RunConfig()
    config.model.cell, config.model.hidden, config.model.layers = "lstm", 16, 2
    config.model.block, config.model.mlp_ratio = "residual", 2.0
    tok = CharTokenizer.fit(TEXT)
    torch.manual_seed(0)
    path = write_checkpoint(tmp_path / "lm", model=LanguageModel(config=config.model, vocab_size=tok.vocab_size),
                            tokenizer=tok, task=config.task, run_config=config, state={"step": 1})
    client = TestClient(create_app(load_checkpoint(path)))
    sid = client.post("/sessions", json={"text": "JULIET: Ay"}).json()["id"]
    client.post(f"/sessions/{sid}/feed", json={"text": " me."})
    first = client.post(f"/sessions/{sid}/generate", json={"length": 10, "temperature": 1.0, "seed": 2}).json()
    whole = client.post("/generate", json={"prime": "JULIET: Ay me.", "length": 10, "temperature": 1.0,
                                           "seed": 2}).json()
    assert first["tokens"] == 24 and first["text"] == whole["texts"][0]
