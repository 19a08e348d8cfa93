"""The echo task: generated data, carried state, learning the recipe, and the plots."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnkit.cli import main
from rnnkit.config import ModelConfig, load_config
from rnnkit.data.synthetic import EchoStreams, echo_series, scored_mask
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_echo
from rnnkit.models.language_model import LanguageModel
from rnnkit.training.echo import train_echo

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "echo.toml"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("symbols,echo_step", [(2, 3), (5, 1), (3, 20)])
def test_targets_are_the_inputs_shifted_right(symbols, echo_step):
    x, y = echo_series(1000, echo_step=echo_step, symbols=symbols, rng=np.random.default_rng(0))
    assert (y[:echo_step] == 0).all()
    assert (y[echo_step:] == x[:-echo_step]).all()
    assert set(np.unique(x)) == set(range(symbols))


def test_windows_cover_rows_in_order_and_reset_only_at_a_new_series():
    streams = EchoStreams(series_length=1000, echo_step=3, symbols=2, batch_size=5, bptt=15, seed=1)
    assert streams.steps_per_epoch == 200 // 15
    x, y = streams.series()
    batches = list(streams.windows(x, y))
    assert [b.reset for b in batches] == [True] + [False] * (len(batches) - 1)
    assert torch.equal(torch.cat([b.x for b in batches], dim=1), x)
    # Row r continues the series where row r-1 stopped (the classic reshape).
    full_x, full_y = echo_series(1000, echo_step=3, symbols=2, rng=np.random.default_rng(1))
    assert torch.equal(x[2], torch.from_numpy(full_x[400:400 + x.shape[1]]))
    assert torch.equal(y[2], torch.from_numpy(full_y[400:400 + x.shape[1]]))
    # The first echo_step steps of every row echo what the row never showed: not scored.
    mask = scored_mask(batches[0], 3)
    assert not mask[:, :3].any() and mask[:, 3:].all() and scored_mask(batches[1], 3).all()
    # A new epoch draws a new series.
    assert not torch.equal(next(iter(streams.epoch())).x, batches[0].x)


def test_rows_too_short_for_one_window_is_a_clear_error():
    with pytest.raises(RnnkitError, match="shorter than one window"):
        EchoStreams(series_length=50, echo_step=3, symbols=2, batch_size=5, bptt=15)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_windowed_loss_with_carried_state_equals_one_pass(cell):
    torch.manual_seed(0)
    model = LanguageModel(config=ModelConfig(cell=cell, hidden=6, layers=2, input="onehot"), vocab_size=3).eval()
    streams = EchoStreams(series_length=3 * 90, echo_step=2, symbols=3, batch_size=3, bptt=9, seed=0)
    x, y = streams.series()
    with torch.no_grad():
        logits, _ = model(x)
        whole = F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="sum")
        windowed, state = torch.zeros(()), None
        for batch in streams.windows(x, y):
            logits, state = model(batch.x, None if batch.reset else state)
            windowed += F.cross_entropy(logits.reshape(-1, 3), batch.y.reshape(-1), reduction="sum")
    torch.testing.assert_close(windowed, whole, rtol=1e-5, atol=1e-5)


def test_the_recipe_learns_the_echo(tmp_path):
    """The classic settings, on 4 series of 20,000 steps instead of 100 of 50,000."""
    config = load_config(RECIPE)
    config.data.series_length = 20_000
    config.train.epochs = 4
    config.train.eval_every = 1000
    config.train.threads = 1
    result = train_echo(config, out_dir=tmp_path / "run")
    assert result.steps == 4 * (20_000 // 5 // 15)
    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.data.synthetic import streams_for

    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.task == "echo" and ckpt.tokenizer.vocab_size == 2
    fresh = streams_for(ckpt.run_config, seed=12345)
    evaluation = evaluate_echo(ckpt.model, fresh, fresh.series(), device=torch.device("cpu"))
    assert evaluation.accuracy >= 0.999, evaluation.accuracy
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert {"step", "time", "loss", "lr", "tokens_per_s", "accuracy"} <= set(train_records[0])
    assert any("val_accuracy" in r and "val_loss" in r for r in records)


def fake_run(folder: Path) -> Path:
    folder.mkdir()
    lines = []
    for step in range(10, 210, 10):
        lines.append({"step": step, "time": step / 10, "loss": 2.0 / step ** 0.3, "accuracy": 1 - 1 / step,
                      "lr": 0.01 if step < 100 else 0.005, "tokens_per_s": 1000.0})
        if step % 50 == 0:
            lines.append({"step": step, "time": step / 10, "lr": 0.01, "val_loss": 2.2 / step ** 0.3,
                          "val_accuracy": 1 - 2 / step})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 2'  # a torn last line, as after kill -9
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")
    return folder


def test_plot_writes_a_png_of_the_expected_size_for_any_run(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(run / "plots" / "curves.png")]
    assert png_size(run / "plots" / "curves.png") == (1280, 460)  # 12.8 x 4.6 inches at 100 dpi
    assert (run / "plots" / "curves.png").stat().st_size > 10_000


def test_plot_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    run = fake_run(tmp_path / "run")
    assert main(["plot", str(run), "--out", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert "ending in .png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.jpg").exists()


def test_echo_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "echo"
    argv = ["train", "--config", str(RECIPE), "--out", str(run), "--series-length", "3000", "--epochs", "2",
            "--eval-every", "40", "--log-every", "10", "--plot-every", "20", "--live-plot", str(run / "live.png"),
            "--threads", "1", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert png_size(run / "live.png")[0] == 1100
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(run / "plots" / "curves.png"), str(run / "plots" / "echo.png")]
    width, height = png_size(run / "plots" / "echo.png")
    assert (width, height) == (1100, round(100 * (3.0 + 1.35 * 5)))
    assert main(["eval", "--checkpoint", str(run), "--json", "--seed", "4"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["scored_steps"] == 5 * (600 // 15 * 15) - 5 * 3
    # An echo checkpoint does not generate text, and takes no text.
    assert main(["generate", "--checkpoint", str(run)]) == 2
    assert "needs a language model" in capsys.readouterr().err
    assert main(["train", "--task", "echo", "--text", str(RECIPE), "--out", str(tmp_path / "x")]) == 2
    assert "generates its own series" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_live_plot_needs_a_png_name(tmp_path, capsys):
    assert main(["train", "--config", str(RECIPE), "--out", str(tmp_path / "r"), "--live-plot", "live.svg"]) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
