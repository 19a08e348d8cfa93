"""Exact resume, periodic checkpoints, stop signals and the NaN guard, for every task."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rnnkit.checkpoint import load_checkpoint, read_index
from rnnkit.cli import main
from rnnkit.config import RunConfig
from rnnkit.data.classification import EncodedSet
from rnnkit.data.lm_data import prepare_lm_data
from rnnkit.errors import RnnkitError
from rnnkit.training.classify import ClassifyData, train_classifier
from rnnkit.training.echo import train_echo
from rnnkit.training.events import Reporter
from rnnkit.training.lm import train_language_model
from rnnkit.training.session import Resume, StopFlag, Stopped

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40


class StopAt(Reporter):
    """Asks the run to stop once it has logged step ``at`` (as a signal handler would)."""

    def __init__(self, flag: StopFlag, at: int) -> None:
        self.flag, self.at = flag, at

    def on_step(self, event):
        if event.step == self.at:
            self.flag.request(signal.SIGTERM)


def lm_config(tmp_path: Path, sampling: str) -> RunConfig:
    config = RunConfig()
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    config.data.text = str(text)
    config.data.sampling = sampling
    config.data.seq_len, config.data.batch_size = 12, 4
    config.model.hidden, config.model.layers, config.model.dropout = 24, 2, 0.1  # dropout: the torch RNG matters
    config.train.max_steps, config.train.eval_every, config.train.log_every = 24, 8, 1
    config.train.sample_length, config.train.threads = 5, 1
    return config


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run, prefer="last").model.state_dict()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def train_lm(config, out, **kwargs):
    data = prepare_lm_data(config.data, cache_dir=out / "data")
    return train_language_model(config, data, out_dir=out, **kwargs)


@pytest.mark.parametrize("sampling", ["sequential", "random"])
@pytest.mark.parametrize("stop_at", [5, 8, 13])  # mid-epoch, right after an evaluation, and later
def test_language_model_resume_is_bitwise_identical(tmp_path, sampling, stop_at):
    config = lm_config(tmp_path, sampling)
    straight = tmp_path / "straight"
    train_lm(config, straight)

    resumed = tmp_path / "resumed"
    flag = StopFlag()
    with pytest.raises(Stopped) as stopped:
        train_lm(config, resumed, reporter=StopAt(flag, stop_at), stop=flag)
    assert stopped.value.step == stop_at and stopped.value.exit_code == 143
    result = train_lm(config, resumed, resume=Resume.from_run(resumed))
    assert result.steps == 24
    assert_identical(weights(straight), weights(resumed))
    # The metric history continues where it stopped: one record per step, none twice.
    history = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == list(range(1, 25))


def test_echo_resume_is_bitwise_identical(tmp_path):
    config = RunConfig(task="echo")
    config.data.series_length, config.data.batch_size, config.data.seq_len = 600, 5, 15  # 8 windows per series
    config.model.cell, config.model.input, config.model.hidden, config.model.layers = "rnn", "onehot", 4, 1
    config.train.optimizer, config.train.lr, config.train.max_steps = "adagrad", 0.3, 20
    config.train.eval_every, config.train.log_every, config.train.threads = 10, 1, 1
    train_echo(config, out_dir=tmp_path / "straight")
    flag = StopFlag()
    with pytest.raises(Stopped):
        train_echo(config, out_dir=tmp_path / "resumed", reporter=StopAt(flag, 11), stop=flag)
    train_echo(config, out_dir=tmp_path / "resumed", resume=Resume.from_run(tmp_path / "resumed"))
    assert_identical(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    with pytest.raises(RnnkitError, match="already finished at step 20"):  # nothing left to do
        train_echo(config, out_dir=tmp_path / "resumed", resume=Resume.from_run(tmp_path / "resumed"))


def classify_data() -> ClassifyData:
    from rnnkit.data.tokenizers import WordTokenizer

    rng = np.random.default_rng(0)
    words = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "very"]
    tok = WordTokenizer.fit(" ".join(words))

    def make(n):
        ids, labels = [], []
        for _ in range(n):
            label = int(rng.integers(0, 2))
            sentiment = rng.choice(words[:3] if label else words[3:6], size=2)
            text = " ".join(["the", "film", "was", *sentiment])
            ids.append(np.asarray(tok.encode(text), dtype=np.int64))
            labels.append(label)
        return EncodedSet(ids=ids, labels=np.asarray(labels, dtype=np.int64))

    return ClassifyData(tokenizer=tok, labels=["neg", "pos"], train=make(64), val=make(16), test=make(0),
                        source="generated")


def test_classifier_resume_is_bitwise_identical(tmp_path):
    config = RunConfig(task="classify")
    config.data.batch_size = 8  # 8 steps per epoch
    config.model.hidden, config.model.layers, config.model.dropout = 16, 1, 0.2
    config.train.epochs, config.train.log_every, config.train.threads = 3, 1, 1
    data = classify_data()
    train_classifier(config, data, out_dir=tmp_path / "straight")
    for stop_at in (5, 8):  # mid-epoch, and at an epoch's end
        out = tmp_path / f"resumed-{stop_at}"
        flag = StopFlag()
        with pytest.raises(Stopped):
            train_classifier(config, data, out_dir=out, reporter=StopAt(flag, stop_at), stop=flag)
        result = train_classifier(config, data, out_dir=out, resume=Resume.from_run(out))
        assert result.epochs == 3
        assert_identical(weights(tmp_path / "straight"), weights(out))


def test_periodic_checkpoints_by_steps(tmp_path):
    config = lm_config(tmp_path, "sequential")
    config.train.save_every, config.train.eval_every = 5, 100
    saved = []

    class Saves(Reporter):
        def on_save(self, event):
            saved.append((int(event.path.name.split("-")[1]), event.names))

    train_lm(config, tmp_path / "run", reporter=Saves())
    assert saved == [(5, ("last",)), (10, ("last",)), (15, ("last",)), (20, ("last",)), (24, ("best", "last"))]
    # Only the checkpoints the index names are kept.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["index.json", "step-000000024"]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from rnnkit.training import lm as loop

    config = lm_config(tmp_path, "sequential")
    config.train.eval_every = 4
    real = loop.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 7 else loss  # step 7 goes bad

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    with pytest.raises(RnnkitError, match="NaN/inf at step 7"):
        train_lm(config, tmp_path / "run")
    assert read_index(tmp_path / "run") == {"best": "step-000000004", "last": "step-000000004"}
    ckpt = load_checkpoint(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_on_nan_skip_leaves_the_weights_alone_and_counts(tmp_path, monkeypatch):
    from rnnkit.training import lm as loop

    config = lm_config(tmp_path, "sequential")
    config.train.on_nan = "skip"
    real = loop.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("inf") if calls["n"] in (3, 9) else loss

    monkeypatch.setattr(loop, "lm_loss", poisoned)
    result = train_lm(config, tmp_path / "run")
    assert result.steps == 24
    ckpt = load_checkpoint(tmp_path / "run", prefer="last")
    assert ckpt.meta["state"]["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("skipped", 0) for r in records) == 2


def test_resume_refuses_changes_to_what_the_run_computes(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    run = tmp_path / "run"
    base = ["--hidden", "16", "--layers", "1", "--seq-len", "10", "--batch-size", "4", "--threads", "1", "--quiet"]
    assert main(["train", "--text", str(text), "--out", str(run), "--max-steps", "4", *base]) == 0
    assert main(["train", "--resume", str(run), "--hidden", "32"]) == 2
    err = capsys.readouterr().err
    assert "cannot change model.hidden" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    folder = next((run / "checkpoints").glob("step-*"))
    assert main(["train", "--resume", str(folder)]) == 2  # a checkpoint folder, not the run
    assert f"not a checkpoint folder: pass {run}" in capsys.readouterr().err
    # Longer, with more steps: allowed, and it continues from step 4.
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--quiet"]) == 0
    assert load_checkpoint(run, prefer="last").meta["state"]["step"] == 6
    assert main(["train", "--resume", str(run)]) == 2  # finished: nothing left to do
    assert "already at step 6" in capsys.readouterr().err
    # A changed text cannot be resumed on.
    (run / "data").rename(tmp_path / "old-data")
    text.write_text(TEXT.upper(), encoding="utf-8")
    assert main(["train", "--resume", str(run), "--max-steps", "8"]) == 2
    assert "training text changed" in capsys.readouterr().err


def _spawn(argv):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "rnnkit", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(run: Path, step: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and any(json.loads(line).get("step", 0) >= step
                                 for line in path.read_text().splitlines() if line.endswith("}")):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run did not get going")


@pytest.mark.parametrize("signum,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signals_save_and_exit_with_the_shell_codes(tmp_path, signum, code, word):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 5, encoding="utf-8")
    run = tmp_path / "run"
    proc = _spawn(["train", "--text", str(text), "--out", str(run), "--hidden", "64", "--seq-len", "32",
                   "--batch-size", "8", "--max-steps", "100000", "--log-every", "1", "--threads", "1"])
    _wait_for_step(run, 3, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"{word} at step ") and f"rnnkit train --resume {run}" in last
    assert "Traceback" not in err
    step = int(last.split("at step ")[1].split(";")[0])
    assert load_checkpoint(run, prefer="last").meta["state"]["step"] == step
    assert main(["train", "--resume", str(run), "--max-steps", str(step + 2), "--quiet"]) == 0


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, sampling):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 5, encoding="utf-8")
    argv = ["--text", str(text), "--hidden", "48", "--seq-len", "32", "--batch-size", "8", "--dropout", "0.1",
            "--layers", "2", "--sampling", sampling, "--max-steps", "40", "--save-every", "4", "--log-every", "1",
            "--eval-every", "15", "--threads", "1", "--quiet"]
    straight = subprocess.run([sys.executable, "-m", "rnnkit", "train", "--out", str(tmp_path / "straight"), *argv],
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "run"
    proc = _spawn(["train", "--out", str(run), *argv])
    _wait_for_step(run, 21, proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
    proc.communicate()
    step = load_checkpoint(run, prefer="last").meta["state"]["step"]
    assert 20 <= step < 40 and step % 4 == 0 or step == 30  # a periodic save (or the evaluation at 30)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert_identical(weights(tmp_path / "straight"), weights(run))


def test_periodic_checkpoints_by_wall_clock(tmp_path, monkeypatch):
    from rnnkit.training import session as session_module

    config = lm_config(tmp_path, "sequential")
    config.train.max_steps, config.train.eval_every, config.train.save_every_seconds = 6, 100, 30
    clock = {"now": 1000.0}
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: clock["now"])

    class Tick(Reporter):  # every step takes 20 "seconds"
        saved: list = []

        def on_step(self, info):
            clock["now"] += 20

        def on_save(self, event):
            self.saved.append(int(event.path.name.split("-")[1]))

    reporter = Tick()
    train_lm(config, tmp_path / "run", reporter=reporter)
    # 30 s without a checkpoint is reached after steps 2, 4 (40 s each), then the end saves step 6.
    assert reporter.saved == [2, 4, 6]
