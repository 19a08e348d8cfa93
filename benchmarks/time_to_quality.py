"""Time to quality: rnnkit's recipes beside nanoGPT and a plain PyTorch loop, at equal wall-clock.

Part 1, tiny-shakespeare with nanoGPT's 90/10 split (first 1,003,854 characters
train, last 111,540 validate), every validation character scored:

* nanoGPT's published CPU configuration (``../shared/peers/README.md``), run
  unmodified as a subprocess in a temporary copy; its checkpoint is scored on
  every position of ``val.bin`` in windows of its block size (64);
* rnnkit's LSTM recipe (``recipes/shakespeare-char.toml``) and its fastest
  recipe (``recipes/tiny-shakespeare-fast.toml``), each trained on the same
  training characters for nanoGPT's measured wall-clock and for 300 s, then
  scored by ``rnnkit eval`` on the validation characters (state carried).

Part 2, shakespeare.txt, 300 s each: ``rnnkit train --config
recipes/shakespeare-char.toml`` against ``benchmarks/plain_loop.py`` (the same
2 x 256 LSTM written as a plain loop), both holding out the last 5%: held-out
bits/char and trained tokens/s of each, and their ratios.

Every side is its own process (rnnkit sets its allocator and MKL as ``rnnkit
train`` does; the peers run as a normal Python process), one at a time, back
to back. Prints one JSON object on stdout with the targets of issue 15;
progress goes to stderr. Skips cleanly (a JSON object saying why) without
``../shared``.

    .venv/bin/python benchmarks/time_to_quality.py            # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/time_to_quality.py --quick    # smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import _common as common

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TINY = SHARED / "corpora" / "tiny-shakespeare.txt"
SHAKESPEARE = SHARED / "corpora" / "shakespeare.txt"
NANOGPT = SHARED / "peers" / "nanoGPT"
RECIPES = {"lstm": ROOT / "recipes" / "shakespeare-char.toml", "fast": ROOT / "recipes" / "tiny-shakespeare-fast.toml"}
# nanoGPT's CPU configuration as its README publishes it (see ../shared/peers/README.md).
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--dropout=0.0"]
TARGETS = {"fast_at_nanogpt_time": 1.62, "fast_at_long": 1.50, "plain_loop_bits_ratio": 0.95,
           "plain_loop_tokens_ratio": 1.15}


def run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run one side to the end; return its stdout and its wall-clock seconds (fail loudly)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"time_to_quality: {' '.join(cmd[:4])}... exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc.stdout, seconds


def split_tiny(work: Path) -> tuple[Path, Path]:
    """nanoGPT's split of tiny-shakespeare: the first 90% of the characters train, the rest validate."""
    text = TINY.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    (work / "train.txt").write_text(text[:cut], encoding="utf-8")
    (work / "val.txt").write_text(text[cut:], encoding="utf-8")
    return work / "train.txt", work / "val.txt"


def nanogpt(work: Path, iters: int, threads: int) -> dict[str, Any]:
    """Train nanoGPT's CPU configuration in a temporary copy; score its checkpoint on all of val.bin."""
    peer = work / "nanoGPT"
    shutil.copytree(NANOGPT, peer)
    for path in peer.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # shared/ is read-only: the copy must be writable
    data = peer / "data" / "shakespeare_char"
    shutil.copyfile(TINY, data / "input.txt")
    prepare = data / "prepare.py"  # it imports requests only to download input.txt, which is in place
    prepare.write_text(prepare.read_text().replace("import requests", "# import requests", 1))
    run([sys.executable, "prepare.py"], cwd=data)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    extra = [f"--max_iters={iters}", f"--lr_decay_iters={iters}"]
    if iters < 250:  # a smoke run: evaluate (and so save) at its last iteration
        extra.append(f"--eval_interval={iters}")
    common.log(f"  nanoGPT: {iters} iterations ...")
    _, seconds = run([sys.executable, "train.py", *NANOGPT_ARGS, *extra], cwd=peer, env=env)
    nats, count = score_nanogpt(peer, threads)
    return {"wall_s": round(seconds, 1), "iters": iters, "val_nats_per_char": round(nats, 4), "val_chars": count}


def score_nanogpt(peer: Path, threads: int) -> tuple[float, int]:
    """Mean nats over every position of val.bin, in consecutive windows of the block size (64)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    sys.path.insert(0, str(peer))
    try:
        from model import GPT, GPTConfig  # the peer's own model code, run as it is
    finally:
        sys.path.remove(str(peer))
    # A pickle nanoGPT wrote itself in this run: the trusted peer file the peers' README allows.
    ckpt = torch.load(peer / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=False)
    with contextlib.redirect_stdout(sys.stderr):  # the peer prints its parameter count; stdout is the JSON's
        model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    val = np.memmap(peer / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16, mode="r").astype(np.int64)
    block = ckpt["model_args"]["block_size"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val) - 1, block * 64):  # 64 windows per forward
            chunk = torch.from_numpy(val[start : start + block * 64 + 1])
            n = (len(chunk) - 1) // block * block
            pieces = [(chunk[:n].view(-1, block), chunk[1 : n + 1].view(-1, block))] if n else []
            if len(chunk) - 1 > n:  # the last, shorter window
                pieces.append((chunk[n:-1].view(1, -1), chunk[n + 1 :].view(1, -1)))
            for x, y in pieces:
                logits, _ = model(x, y)
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
                count += y.numel()
    return total / count, count


def rnnkit_run(work: Path, name: str, recipe: Path, text: Path, held_out: Path, seconds: float, threads: int,
               extra: list[str]) -> dict[str, Any]:
    """``rnnkit train`` for ``seconds`` of wall-clock in all (start-up included), then ``rnnkit eval``."""
    out = work / "runs" / name
    rnnkit = [sys.executable, "-m", "rnnkit"]
    start_up = 4.0  # measured: interpreter, torch, the data and the model before the first step
    cmd = [*rnnkit, "train", "--config", str(recipe), "--text", str(text), "--out", str(out), "--threads",
           str(threads), "--max-time", f"{max(1.0, seconds - start_up):.1f}", *extra]
    common.log(f"  rnnkit {name}: {seconds:.0f} s ...")
    _, wall = run(cmd, cwd=work)
    scored, _ = run([*rnnkit, "eval", "--checkpoint", str(out), "--text", str(held_out), "--json", "--threads",
                     str(threads)], cwd=work)
    report = json.loads(scored)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "step" in row and "time" in row][-1]  # the run's final step and its clock
    data = tomllib.loads((out / "config.toml").read_text())["data"]
    tokens = last["step"] * data["batch_size"] * data["seq_len"]  # every step trains B x T tokens
    train_s = last["time"]
    return {"wall_s": round(wall, 1), "tokens": tokens, "train_s": train_s,
            "tokens_per_s": round(tokens / train_s, 1) if tokens and train_s else None,
            "val_nats_per_char": round(report["bits_per_char"] * math.log(2), 4),
            "val_bits_per_char": round(report["bits_per_char"], 4), "val_tokens": report["tokens"]}


def part_tiny(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    train, val = split_tiny(work)
    result: dict[str, Any] = {"nanogpt": nanogpt(work, args.nanogpt_iters, args.threads)}
    budget = result["nanogpt"]["wall_s"]
    common.log(f"  nanoGPT: {result['nanogpt']}")
    for seconds, label in ((budget, "at_nanogpt_time"), (args.long_seconds, "at_long")):
        for recipe in ("lstm", "fast"):
            side = rnnkit_run(work, f"{recipe}-{label}", RECIPES[recipe], train, val, seconds, args.threads,
                              ["--val-fraction", "0"])
            common.log(f"  rnnkit {recipe} {label}: {side}")
            result[f"{recipe}_{label}"] = side
    return result


def part_shakespeare(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    held_out = work / "shakespeare-tail.txt"  # the last 5%, as both sides split it
    held_out.write_text(text[len(text) - int(round(len(text) * 0.05)) :], encoding="utf-8")
    rnnkit = rnnkit_run(work, "shakespeare", RECIPES["lstm"], SHAKESPEARE, held_out, args.long_seconds,
                        args.threads, ["--val-fraction", "0.05"])
    common.log(f"  rnnkit shakespeare: {rnnkit}")
    common.log(f"  plain loop: {args.long_seconds:.0f} s ...")
    out, wall = run([sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), "--text", str(SHAKESPEARE),
                     "--seconds", str(args.long_seconds - 2), "--threads", str(args.threads)], cwd=work)
    plain = {**json.loads(out), "wall_s": round(wall, 1)}
    common.log(f"  plain loop: {plain}")
    return {"rnnkit": rnnkit, "plain_loop": plain,
            "bits_ratio": round(rnnkit["val_bits_per_char"] / plain["val_bits_per_char"], 4),
            "tokens_ratio": round(rnnkit["tokens_per_s"] / plain["tokens_per_s"], 4)
            if rnnkit["tokens_per_s"] else None}


def targets(tiny: dict[str, Any], shakes: dict[str, Any]) -> dict[str, Any]:
    figures = {"fast_at_nanogpt_time": tiny["fast_at_nanogpt_time"]["val_nats_per_char"],
               "fast_at_long": tiny["fast_at_long"]["val_nats_per_char"],
               "plain_loop_bits_ratio": shakes["bits_ratio"], "plain_loop_tokens_ratio": shakes["tokens_ratio"]}
    met = {k: (v is not None and (v >= TARGETS[k] if k == "plain_loop_tokens_ratio" else v <= TARGETS[k]))
           for k, v in figures.items()}
    return {k: {"value": figures[k], "target": TARGETS[k], "met": met[k]} for k in figures}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: nanoGPT 30 iterations, 12 s budgets")
    p.add_argument("--threads", type=int, default=2, help="threads of every side")
    p.add_argument("--long-seconds", type=float, default=None, help="the long budget (default 300; quick 12)")
    p.add_argument("--nanogpt-iters", type=int, default=None, help="nanoGPT iterations (default 2000; quick 30)")
    args = common.fill_defaults(p.parse_args(argv), {"long_seconds": (300.0, 12.0), "nanogpt_iters": (2000, 30)})
    missing = [str(p) for p in (TINY, SHAKESPEARE, NANOGPT) if not p.exists()]
    if missing:
        common.emit({"benchmark": "time_to_quality", "skipped": f"needs {', '.join(missing)}"})
        return
    with tempfile.TemporaryDirectory(prefix="rnnkit-ttq-") as tmp:
        work = Path(tmp)
        common.log("time_to_quality: tiny-shakespeare, nanoGPT's split")
        tiny = part_tiny(work, args)
        common.log("time_to_quality: shakespeare.txt against the plain loop")
        shakes = part_shakespeare(work, args)
    common.emit({"benchmark": "time_to_quality", "quick": args.quick, "threads": args.threads,
                 "environment": common.environment(args.threads), "tiny_shakespeare": tiny,
                 "shakespeare_300s": shakes, "targets": targets(tiny, shakes)})


if __name__ == "__main__":
    main()
