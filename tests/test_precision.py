"""--precision (autocast) and its gradient scaler; the CUDA cases run only where there is a GPU."""

import pytest
import torch

from rnnkit.checkpoint import load_checkpoint
from rnnkit.cli import main

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
SMALL = ["--hidden", "24", "--layers", "1", "--seq-len", "12", "--batch-size", "4", "--eval-every", "10",
         "--threads", "1", "--sample-length", "5", "--quiet"]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("model", ["lstm", "gru", "rnn", "mingru", "minlstm"])
def test_bf16_on_the_cpu_trains_like_fp32_and_keeps_fp32_weights(tmp_path, text, model):
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        assert main(["train", "--text", str(text), "--model", model, "--max-steps", "40", "--precision", precision,
                     "--device", "cpu", "--out", str(run), *SMALL]) == 0
        ckpt = load_checkpoint(run)
        assert {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
        losses[precision] = ckpt.meta["state"]["best_val_loss"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.1, losses  # bf16 rounds the products, not the training


def test_fp16_without_cuda_is_a_one_line_error_before_reading_anything(tmp_path, capsys):
    code = main(["train", "--text", str(tmp_path / "missing.txt"), "--precision", "fp16", "--device", "cpu",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--precision fp16 needs a CUDA GPU" in err
    assert not (tmp_path / "run").exists()


def test_auto_is_fp32_on_the_cpu():
    from rnnkit.training.engine import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_precisions_train_and_resume_with_the_scaler(tmp_path, text, precision):
    run = tmp_path / "run"
    assert main(["train", "--text", str(text), "--max-steps", "10", "--precision", precision, "--device", "cuda",
                 "--out", str(run), *SMALL]) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "20", "--quiet"]) == 0
    ckpt = load_checkpoint(run, prefer="last")
    assert ckpt.meta["state"]["step"] == 20 and {p.dtype for p in ckpt.model.parameters()} == {torch.float32}
    if precision == "fp16":
        import json

        trainer = json.loads((ckpt.path / "trainer.json").read_text())
        assert trainer["scaler"] is not None and trainer["scaler"]["scale"] > 0


def test_the_start_line_names_the_autocast_and_warns_when_the_cpu_emulates_bf16(monkeypatch):
    from rnnkit.training import engine

    cpu = torch.device("cpu")
    assert engine.describe_device(cpu, "auto") == "cpu" and engine.describe_device(cpu, "fp32") == "cpu"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert engine.describe_device(cpu, "bf16") == "cpu, bf16 autocast"
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert "emulated" in engine.describe_device(cpu, "bf16") and "slower than fp32" in engine.describe_device(cpu, "bf16")
