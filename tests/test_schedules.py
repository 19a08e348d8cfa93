"""Learning-rate schedules: warm-up, cosine over the binding budget, plateau; resume continues them exactly."""

import json
import math
from types import SimpleNamespace

import pytest

from rnnkit.cli import main
from rnnkit.errors import RnnkitError
from rnnkit.training.engine import Schedule

TEXT = "a stitch in time saves nine, and a penny saved is a penny earned.\n" * 30
SMALL = ["--hidden", "16", "--layers", "1", "--seq-len", "10", "--batch-size", "4", "--threads", "1",
         "--log-every", "1", "--eval-every", "100", "--sample-length", "4", "--quiet"]


def settings(**kw):
    base = dict(lr_schedule="cosine", warmup=0, lr=1.0, min_lr=0.0, max_time=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_cosine_anneals_over_the_step_budget_to_min_lr():
    s = Schedule(settings(min_lr=0.1), max_steps=100)
    assert s.factor(0, 0.0) == pytest.approx(1.0)
    assert s.factor(50, 0.0) == pytest.approx(0.55)
    assert s.factor(100, 0.0) == pytest.approx(0.1)


def test_cosine_follows_elapsed_time_when_the_time_budget_binds():
    s = Schedule(settings(max_time=60.0), max_steps=10_000)
    assert s.factor(10, 30.0) == pytest.approx(0.5)  # half the time, a tenth of a percent of the steps
    assert s.factor(10, 60.0) == pytest.approx(0.0, abs=1e-12)


def test_warmup_ramps_linearly_then_hands_over():
    s = Schedule(settings(lr_schedule="constant", warmup=4), max_steps=100)
    assert [s.factor(k, 0.0) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    plateau = Schedule(settings(lr_schedule="plateau"), max_steps=100)
    assert plateau.factor(3, 0.0) == 1.0  # the plateau decay alone sets the rate


def lrs(run):
    return [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_cosine_run_logs_its_rates_and_resumes_exactly(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    common = ["train", "--text", str(text), *SMALL, "--lr-schedule", "cosine", "--warmup", "3", "--lr", "0.01",
              "--min-lr", "0.001", "--max-steps", "20"]
    assert main([*common, "--out", str(tmp_path / "straight")]) == 0
    rates = lrs(tmp_path / "straight")
    expected = [min(1, (k + 1) / 3) * (0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * k / 20))) for k in range(20)]
    assert rates == pytest.approx(expected)  # step k+1 ran at the rate of k steps done
    assert main([*common[:-1], "10", "--out", str(tmp_path / "resumed")]) == 0
    # Stopped at 10 of a 10-step budget; resumed with the 20-step budget it follows the 20-step curve.
    assert main(["train", "--resume", str(tmp_path / "resumed"), "--max-steps", "20", "--quiet"]) == 0
    assert lrs(tmp_path / "resumed")[10:] == pytest.approx(rates[10:])


def test_min_lr_above_lr_is_refused():
    from rnnkit.config import RunConfig

    with pytest.raises(RnnkitError, match="min_lr"):
        RunConfig.build(settings={"train.lr_schedule": "cosine", "train.min_lr": 1.0, "train.lr": 0.1})
