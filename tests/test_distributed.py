"""Data-parallel training under torchrun on this one machine: gloo, one thread per process, 127.0.0.1 only."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.checkpoint import load_checkpoint
from rnnkit.cli import main

pytestmark = pytest.mark.slow

LINE = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of folly.\n"
REVIEWS = [("pos", "a wonderful warm film"), ("neg", "a dull and boring mess"), ("pos", "great acting, a fine story"),
           ("neg", "the plot is awful"), ("pos", "i loved every minute"), ("neg", "i hated the ending")] * 7
RUNS = {  # no dropout: each process draws its own masks, so dropout cannot match one process
    "lm-sequential": ["--model", "lstm", "--hidden", "16", "--layers", "2", "--seq-len", "12", "--batch-size", "4"],
    "lm-random": ["--model", "gru", "--hidden", "16", "--layers", "1", "--sampling", "random", "--seq-len", "10",
                  "--batch-size", "6", "--optimizer", "rmsprop", "--lr", "0.003"],
    "classify": ["--task", "classify", "--model", "rnn", "--hidden", "8", "--layers", "2", "--bidirectional",
                 "--pooling", "max", "--batch-size", "7", "--val-fraction", "0.2", "--test-fraction", "0.1"],
}
COMMON = ["--threads", "1", "--seed", "3", "--log-every", "10", "--sample-length", "5", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(args, *, nproc=2, nodes=None, port=None, restarts=0, background=False):
    """``torchrun ... -m rnnkit ARGS`` with a c10d rendezvous on 127.0.0.1."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port or free_port()}",
              "--max-restarts", str(restarts)]
    if nodes is not None:
        launch += ["--nnodes", "2", "--node-rank", str(nodes)]
    command = [*launch, "-m", "rnnkit", *map(str, args)]
    if background:
        return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run, prefer="last").model.state_dict()


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    text, tsv = tmp_path / "text.txt", tmp_path / "reviews.tsv"
    text.write_text(LINE * 30, encoding="utf-8")
    tsv.write_text("label\ttext\n" + "".join(f"{a}\t{b}\n" for a, b in REVIEWS), encoding="utf-8")
    return {"text": text, "tsv": tsv}


def argv(name: str, data: dict[str, Path], out: Path, *extra) -> list[str]:
    source = ["--data", data["tsv"], "--epochs", "4"] if name == "classify" else ["--text", data["text"],
                                                                                  "--max-steps", "30"]
    return ["train", *RUNS[name], *source, "--eval-every", "10", *COMMON, "--out", out, *extra]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_train_what_one_does(tmp_path, data, name):
    assert main([str(a) for a in argv(name, data, tmp_path / "one")]) == 0
    done = torchrun(argv(name, data, tmp_path / "two"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert max_difference(tmp_path / "one", tmp_path / "two") <= 1e-5
    if name == "classify":  # rank 0 alone wrote the files, the test split scored once
        one, two = (json.loads((tmp_path / r / "test_metrics.json").read_text()) for r in ("one", "two"))
        assert one["accuracy"] == two["accuracy"]
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines())


def test_gradient_accumulation_equals_one_large_batch(tmp_path, data):
    assert main([str(a) for a in argv("lm-random", data, tmp_path / "whole")]) == 0
    assert main([str(a) for a in argv("lm-random", data, tmp_path / "parts", "--grad-accum", "3")]) == 0
    assert max_difference(tmp_path / "whole", tmp_path / "parts") <= 1e-5


def test_two_nodes_rendezvous_on_loopback(tmp_path, data):
    assert main([str(a) for a in argv("lm-sequential", data, tmp_path / "one")]) == 0
    port = free_port()
    nodes = [torchrun(argv("lm-sequential", data, tmp_path / "nodes"), nproc=1, nodes=rank, port=port,
                      background=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert max_difference(tmp_path / "one", tmp_path / "nodes") <= 1e-5


def long_run(folder: Path, out: Path, *extra) -> list[str]:
    text = folder / "long.txt"
    if not text.exists():
        text.write_text(LINE * 600, encoding="utf-8")
    return ["train", "--text", text, "--hidden", "48", "--layers", "1", "--seq-len", "24", "--batch-size", "8",
            "--sampling", "random", "--max-steps", "300", "--eval-every", "100", "--save-every", "25",
            "--threads", "1", "--log-every", "25", "--out", out, *extra]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted two-process run: what the interrupted ones must end with."""
    folder = tmp_path_factory.mktemp("straight")
    done = torchrun(long_run(folder, folder / "run"))
    assert done.returncode == 0, done.stdout + done.stderr
    return folder / "run"


def wait_for_step(run: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(line).get("step", 0) >= step for line in lines if line.strip().endswith("}")):
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never reached step {step}")


def worker_pids(process: subprocess.Popen) -> list[int]:
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_killed_worker_restarted_by_torchrun_ends_bitwise_like_an_uninterrupted_run(tmp_path, straight):
    job = torchrun(long_run(tmp_path, tmp_path / "killed"), restarts=1, background=True)
    wait_for_step(tmp_path / "killed", 100, job)
    os.kill(worker_pids(job)[-1], signal.SIGKILL)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output
    assert "restarted by torchrun: resuming" in output
    assert max_difference(straight, tmp_path / "killed") == 0.0


def test_sigterm_to_the_group_saves_once_and_resumes_bitwise(tmp_path, straight):
    job = torchrun(long_run(tmp_path, tmp_path / "stopped"), background=True)
    wait_for_step(tmp_path / "stopped", 100, job)
    job.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker
    output = job.communicate(timeout=120)[0]
    notices = [line for line in output.splitlines() if "the run is saved: continue it" in line]
    assert len(notices) == 1 and notices[0].startswith("terminated at step"), output
    step = int(notices[0].split()[3].rstrip(";"))
    index = json.loads((tmp_path / "stopped" / "checkpoints" / "index.json").read_text())
    assert index["last"] == f"step-{step:09d}"
    resumed = torchrun(["train", "--resume", tmp_path / "stopped", "--quiet"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert max_difference(straight, tmp_path / "stopped") == 0.0


def test_another_world_size_continues_a_run(tmp_path, straight):
    half = torchrun(long_run(tmp_path, tmp_path / "run", "--max-steps", "150"))
    assert half.returncode == 0, half.stdout + half.stderr
    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "300", "--quiet"]) == 0
    assert max_difference(straight, tmp_path / "run") <= 1e-4  # the same run, up to the order of additions


def test_a_batch_the_world_size_does_not_divide_is_a_one_line_error(tmp_path, data):
    done = torchrun(["train", "--text", data["text"], "--batch-size", "5", "--max-steps", "3", "--threads", "1",
                     "--out", tmp_path / "run"])
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("rnnkit: error:")]
    assert errors and "--batch-size 5 does not divide into 2 processes" in errors[0]
    # torchrun reports the failed workers with a traceback of its own; none runs through rnnkit's code.
    assert not [line for line in (done.stdout + done.stderr).splitlines() if 'File "' in line and "rnnkit" in line]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_rendezvous_is_a_one_line_error(tmp_path, data):
    run = subprocess.run([sys.executable, "-m", "rnnkit", "train", "--text", str(data["text"]), "--max-steps", "2",
                          "--out", str(tmp_path / "run")], env={**env(), "WORLD_SIZE": "2", "RANK": "0"},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "MASTER_ADDR and MASTER_PORT" in run.stderr
    assert not (tmp_path / "run").exists()
