"""Crash and resume: kill a training run with SIGKILL at random moments, resume it, compare the weights.

One uninterrupted run trains a char LSTM (dropout on, sequential batching with
carried state, random or sequential sampling) for ``--steps`` steps. A second
run of the same command is killed with SIGKILL ``--kills`` times at random
moments (at a random step, plus a random fraction of a step, so some kills land
while it writes a checkpoint) and continued each time with
``rnnkit train --resume``; when no checkpoint exists yet it is started again.
Its final weights are compared with the uninterrupted run's, tensor by tensor.

Prints one JSON object: kills, resumes, restarts, steps lost per kill (the
step reached when killed minus the step of the checkpoint it resumed from),
and whether the final weights are bitwise identical.

    .venv/bin/python benchmarks/crash_resume.py            # 10 kills (~2-4 min on 2 cores)
    .venv/bin/python benchmarks/crash_resume.py --quick    # 3 kills on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch
from safetensors.torch import load_file

from rnnkit.checkpoint import read_index
from rnnkit.data.corpora import fetch, read_text


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            steps.append(int(json.loads(line).get("step", 0)))
        except ValueError:
            continue  # the line being written when the process died
    return max(steps)


def checkpoint_step(run: Path) -> int | None:
    index = read_index(run)
    return int(index["last"].split("-")[1]) if "last" in index else None


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / read_index(run)["last"] / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--sampling", choices=["sequential", "random"], default="sequential")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--quick", action="store_true", help="3 kills, 200 steps, 32 units")
    args = parser.parse_args()
    if args.quick:
        args.kills, args.steps, args.hidden, args.save_every = 3, 200, 32, 5
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="rnnkit-crash-"))
    text = work / "fable.txt"
    text.write_text(read_text(fetch("belling-the-cat")) * 20, encoding="utf-8")  # ships with rnnkit
    common_args = ["--text", str(text), "--hidden", str(args.hidden), "--layers", "2", "--dropout", "0.2",
                   "--seq-len", "32", "--batch-size", "8", "--sampling", args.sampling, "--max-steps", str(args.steps),
                   "--eval-every", "50", "--save-every", str(args.save_every), "--log-every", "1",
                   "--threads", str(args.threads), "--seed", "3", "--quiet"]
    rnnkit = [sys.executable, "-m", "rnnkit", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    common.log(f"uninterrupted run of {args.steps} steps ...")
    start = time.perf_counter()
    subprocess.run([*rnnkit, "--out", str(work / "straight"), *common_args], check=True, env=env)
    straight_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "straight" / "metrics.jsonl").read_text().splitlines()]
    train_times = [r["time"] for r in records if "loss" in r]
    step_seconds = (train_times[-1] - train_times[0]) / max(len(train_times) - 1, 1)

    run = work / "crashed"
    kills = resumes = restarts = 0
    lost: list[int] = []
    while True:
        ckpt = checkpoint_step(run) if run.exists() else None
        if ckpt is None:
            argv = [*rnnkit, "--out", str(run), "--overwrite", *common_args]
            restarts += run.exists()
        else:
            argv = [*rnnkit, "--resume", str(run)]
            resumes += 1
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        if kills >= args.kills:
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"the last resume failed: {err[-2000:]}")
            break
        # A random moment while it trains: once it logs a randomly chosen step still ahead of it,
        # plus a random fraction of a step (so some kills land inside a checkpoint write).
        target = rng.randint((ckpt or 0) + 1, args.steps - 1)
        while proc.poll() is None and last_logged_step(run) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.5 * step_seconds))
        if proc.poll() is not None:
            if proc.returncode != 0:
                raise SystemExit(f"rnnkit exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            break  # finished before the kill: nothing left to interrupt
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        reached, saved = last_logged_step(run), checkpoint_step(run)
        lost.append(reached - (saved or 0))
        common.log(f"kill {kills}: reached step {reached}, last checkpoint at step {saved}")

    a, b = final_weights(work / "straight"), final_weights(run)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    result = {
        "kills": kills,
        "resumes": resumes,
        "restarts": restarts,
        "steps": args.steps,
        "save_every": args.save_every,
        "steps_lost_per_kill": lost,
        "max_steps_lost": max(lost, default=0),
        "final_step": checkpoint_step(run),
        "weights_identical": identical,
        "uninterrupted_seconds": round(straight_seconds, 1),
        "sampling": args.sampling,
        "environment": common.environment(args.threads),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
