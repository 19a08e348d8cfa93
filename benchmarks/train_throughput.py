"""Training throughput: rnnkit's train_step next to a bare hand-written PyTorch loop.

Side A ("rnnkit") is what ``rnnkit train`` runs per step: ``LanguageModel`` +
``build_optimizer("adam")`` + ``train_step(..., clip=5.0)`` on
``SequentialStreams`` batches, state carried between windows.

Side B ("baseline") is the classic loop written out here: ``nn.Embedding`` ->
``nn.LSTM(batch_first=True)`` -> ``nn.Linear``, cross-entropy, ``zero_grad``,
backward, ``clip_grad_norm_(..., 5.0)``, ``Adam.step()``, with the same
shapes, the same data and the same detached state carried between windows.

Each side runs in a worker process of its own, set up as its program would
be: the rnnkit sides as ``rnnkit train`` sets a process up (``MKL_CBWR`` for
exact resume, glibc's allocator told to keep freed memory), the bare loop as a
plain Python process. The workers take turns (A B, B A, ...) over several
repeats, never at once, because the host's speed drifts: only back-to-back
figures compare. ``--malloc no-mmap|system`` gives every side the same
allocator instead, to measure what the setting itself is worth.
Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python benchmarks/train_throughput.py            # full run (~2-3 min on 2 cores)
    .venv/bin/python benchmarks/train_throughput.py --quick    # smoke run (a few seconds)

``--cells lstm,gru,mingru,minlstm`` adds one rnnkit side per further cell
(same shapes, same data, ``--scan`` for minGRU/minLSTM), all alternating in
the same repeats, and reports each cell's tokens/s (``cells_tokens_per_s``)
and each one's ratio to rnnkit's LSTM (``mingru_vs_lstm``, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import _common as common
import numpy as np
import torch
import torch.nn.functional as F
from plain_loop import CharLSTM

from rnnkit.config import ModelConfig
from rnnkit.data.batching import Batch, SequentialStreams
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import CELLS
from rnnkit.runtime import SINGLE
from rnnkit.training.engine import Plan, build_optimizer
from rnnkit.training.lm import train_step

TARGET_RATIO = 1.15
CLIP = 5.0


def bare_windows(ids: np.ndarray, batch: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """The same B parallel streams as SequentialStreams, sliced by hand, forever."""
    data = torch.from_numpy(ids)
    stream_len = (len(ids) - 1) // batch
    streams = torch.stack([data[b * stream_len : (b + 1) * stream_len + 1] for b in range(batch)])  # (B, L+1)
    steps = stream_len // seq_len
    while True:
        for k in range(steps):
            w = streams[:, k * seq_len : k * seq_len + seq_len + 1]
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous(), k == 0


def make_rnnkit_side(args, ids: np.ndarray, cell: str = "lstm") -> tuple[Callable[[], float], int]:
    config = ModelConfig(cell=cell, hidden=args.hidden, layers=args.layers, input="embedding", scan=args.scan)
    model = LanguageModel(config=config, vocab_size=args.vocab)
    optimizer = build_optimizer("adam", model.parameters(), lr=args.lr, weight_decay=0.0)
    batcher = SequentialStreams(ids, seq_len=args.seq_len, batch_size=args.batch)
    batches: Iterator[Batch] = itertools.chain.from_iterable(batcher.epoch() for _ in itertools.count())
    device = torch.device("cpu")
    model.train()
    carried = {"state": None}
    plan = Plan(precision=args.precision, accum=1, device=device, group=SINGLE)

    def step() -> float:
        out = train_step(model, optimizer, next(batches), carried["state"], clip=CLIP, device=device, plan=plan)
        # train_step returns a StepOutput (loss, accuracy counts, state); older versions a (loss, state) tuple.
        loss, carried["state"] = out if isinstance(out, tuple) else (out.loss, out.state)
        return float(loss)

    return step, sum(p.numel() for p in model.parameters())


def make_baseline_side(args, ids: np.ndarray) -> tuple[Callable[[], float], int]:
    model = CharLSTM(args.vocab, args.hidden, args.layers)  # the textbook model: embedding -> nn.LSTM -> linear
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    windows = bare_windows(ids, args.batch, args.seq_len)
    model.train()
    carried = {"state": None}

    def step() -> float:
        x, y, reset = next(windows)
        state = carried["state"]
        state = None if reset else tuple(s.detach() for s in state)  # truncated BPTT
        logits, carried["state"] = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in model.parameters())


def timed(step: Callable[[], float], n: int) -> tuple[float, float, int, float]:
    """Run n steps; return (seconds, last loss, minor page faults, CPU seconds)."""
    f0, c0, t0 = common.minor_faults(), common.cpu_time(), common.now()
    loss = float("nan")
    for _ in range(n):
        loss = step()
    return common.now() - t0, loss, common.minor_faults() - f0, common.cpu_time() - c0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=None, help="A/B repetitions (default 5; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side per repeat (default 8; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side first (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--hidden", type=int, default=None, help="hidden units per layer (default 512; quick 64)")
    p.add_argument("--layers", type=int, default=2, help="stacked LSTM layers")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 64; quick 8)")
    p.add_argument("--seq-len", type=int, default=None, help="window length T (default 100; quick 20)")
    p.add_argument("--vocab", type=int, default=80, help="vocabulary size of the synthetic tokens")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    p.add_argument("--cells", default="lstm",
                   help="comma-separated rnnkit cells to time beside the bare LSTM loop (lstm is always one)")
    p.add_argument("--scan", choices=["auto", "parallel", "sequential"], default="auto",
                   help="the scan of minGRU/minLSTM sides")
    p.add_argument("--malloc", choices=["as-shipped", "no-mmap", "system"], default="as-shipped",
                   help="as-shipped: each side's allocator as its program leaves it (rnnkit keeps freed memory, "
                        "see rnnkit.runtime.keep_freed_memory; the bare loop has glibc's defaults); no-mmap: every "
                        "side serves every block from the heap; system: every side has glibc's defaults")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="the rnnkit sides' --precision (the bare loop is always fp32): bf16 is autocast, as "
                        "`rnnkit train --precision bf16` runs it")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one side, taking orders on stdin
    args = p.parse_args(argv)
    args.cells = ["lstm", *[c for c in dict.fromkeys(args.cells.split(",")) if c and c != "lstm"]]
    unknown = [c for c in args.cells if c not in CELLS]
    if unknown:
        p.error(f"unknown cell(s) {', '.join(unknown)} (choose from {', '.join(CELLS)})")
    defaults = {  # (full, quick)
        "repeats": (5, 2), "steps": (8, 2), "warmup": (2, 1), "hidden": (512, 64), "batch": (64, 8),
        "seq_len": (100, 20),
    }
    return common.fill_defaults(args, defaults)


def worker(args: argparse.Namespace) -> None:
    """One side in a process of its own: build it, then run each ``N`` read on stdin as N timed steps."""
    if args.malloc == "no-mmap":
        common.set_malloc(*common.NO_MMAP_MALLOC)
    elif args.worker != "baseline":  # what `rnnkit train` does once its data is read (RNNKIT_MALLOC=system: not)
        from rnnkit.runtime import keep_freed_memory

        keep_freed_memory()
    common.setup(args.threads, args.seed)
    # Enough text for 20 windows per stream; epochs repeat (state resets at each start).
    ids = common.synthetic_ids(args.batch * args.seq_len * 20 + 1, args.vocab, args.seed)
    torch.manual_seed(args.seed)
    if args.worker == "baseline":
        step, params = make_baseline_side(args, ids)
    else:
        step, params = make_rnnkit_side(args, ids, args.worker.removeprefix("rnnkit_") if "_" in args.worker
                                        else "lstm")
    print(json.dumps({"parameters": params}), flush=True)
    for line in sys.stdin:
        seconds, loss, faults, cpu = timed(step, int(line))
        print(json.dumps({"seconds": seconds, "loss": loss, "faults": faults, "cpu": cpu,
                          "peak_rss_mib": common.peak_rss_mib()}), flush=True)


class Side:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, argv: list[str], malloc: str) -> None:
        env = dict(os.environ)
        if name != "baseline":
            env.setdefault("MKL_CBWR", "AUTO,STRICT")  # as rnnkit.runtime.exact_cpu_math sets it for `rnnkit train`
        if malloc == "system":
            env["RNNKIT_MALLOC"] = "system"
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--worker", name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.parameters = self._reply()["parameters"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"train_throughput: the {self.name} worker exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    common.setup(args.threads, args.seed)
    sides = {name: Side(name, argv, args.malloc)
             for name in ["rnnkit", "baseline", *[f"rnnkit_{cell}" for cell in args.cells[1:]]]}
    rnnkit_params, baseline_params = sides["rnnkit"].parameters, sides["baseline"].parameters
    cell_params = {"lstm": rnnkit_params, **{c: sides[f"rnnkit_{c}"].parameters for c in args.cells[1:]}}
    tokens_per_step = args.batch * args.seq_len

    common.log(f"train_throughput: {args.layers}x{args.hidden} LSTM, B={args.batch} T={args.seq_len} "
               f"V={args.vocab}, {args.threads} threads, {args.repeats} repeats x {args.steps} steps, "
               f"malloc {args.malloc}, one process per side")
    for name, side in sides.items():
        reply = side.run(args.warmup)
        common.log(f"  warm-up {name}: {args.warmup} steps in {reply['seconds']:.2f} s (loss {reply['loss']:.3f})")

    per_repeat: dict[str, list[float]] = {name: [] for name in sides}
    last_loss: dict[str, float] = {}
    faults: dict[str, list[float]] = {name: [] for name in sides}
    shares: dict[str, list[float]] = {name: [] for name in sides}
    load_before = common.load_average()
    peak_rss: dict[str, float] = {}
    for r in range(args.repeats):
        names = list(sides)
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: each side runs in every slot
        if len(names) == 2:
            order = ["rnnkit", "baseline"] if r % 2 == 0 else ["baseline", "rnnkit"]
        for name in order:
            reply = sides[name].run(args.steps)
            seconds, last_loss[name], n_faults, cpu = reply["seconds"], reply["loss"], reply["faults"], reply["cpu"]
            peak_rss[name] = reply["peak_rss_mib"]
            faults[name].append(n_faults / args.steps)
            shares[name].append(common.cpu_share(cpu, seconds, args.threads))
            per_repeat[name].append(round(args.steps * tokens_per_step / seconds, 1))
        common.log(f"  repeat {r + 1}/{args.repeats}: rnnkit {per_repeat['rnnkit'][-1]:,.0f} tok/s, "
                   f"baseline {per_repeat['baseline'][-1]:,.0f} tok/s (cpu share {shares['rnnkit'][-1]:.2f} / "
                   f"{shares['baseline'][-1]:.2f})"
                   + "".join(f", {c} {per_repeat[f'rnnkit_{c}'][-1]:,.0f}" for c in args.cells[1:]))

    clean = common.clean_repeats(shares)
    if len(clean) < args.repeats:
        common.log(f"  warning: {args.repeats - len(clean)} repeat(s) ran while another process took CPU time "
                   f"(cpu share well below the best); see ratio_clean_repeats")
    rnnkit_tps = common.median(per_repeat["rnnkit"])
    baseline_tps = common.median(per_repeat["baseline"])
    ratio = rnnkit_tps / baseline_tps
    # The same pairing per repeat (both sides of one repeat ran back to back).
    paired = [a / b for a, b in zip(per_repeat["rnnkit"], per_repeat["baseline"], strict=True)]
    cells_tps = {c: round(common.median(per_repeat["rnnkit" if c == "lstm" else f"rnnkit_{c}"]), 1)
                 for c in args.cells}
    cell_ratios = {f"{c}_vs_lstm": round(cells_tps[c] / cells_tps["lstm"], 4) for c in args.cells[1:]}
    result = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        **common.environment(args.threads),
        "shapes": {
            "cell": "lstm", "layers": args.layers, "hidden": args.hidden, "embedding_dim": args.hidden,
            "vocab": args.vocab, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": tokens_per_step,
            "rnnkit_parameters": rnnkit_params, "baseline_parameters": baseline_params,
        },
        "optimizer": "adam", "lr": args.lr, "rnnkit_precision": args.precision, "clip": CLIP, "data": "SequentialStreams over uniform random ids",
        "repeats": args.repeats, "steps_per_repeat": args.steps, "warmup_steps": args.warmup,
        "rnnkit_tokens_per_s": round(rnnkit_tps, 1),
        "baseline_tokens_per_s": round(baseline_tps, 1),
        "ratio": round(ratio, 4),
        "paired_ratios": [round(x, 4) for x in paired],
        "clean_repeats": clean,
        "ratio_clean_repeats": round(
            common.median([per_repeat["rnnkit"][i] for i in clean])
            / common.median([per_repeat["baseline"][i] for i in clean]), 4) if clean else None,
        "ratio_of_best": round(max(per_repeat["rnnkit"]) / max(per_repeat["baseline"]), 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio >= TARGET_RATIO),
        "rnnkit_tokens_per_s_per_repeat": per_repeat["rnnkit"],
        "baseline_tokens_per_s_per_repeat": per_repeat["baseline"],
        "cpu_share_per_repeat": shares,
        "load_average_before_after": [load_before, common.load_average()],
        "last_loss": {k: round(v, 4) for k, v in last_loss.items()},
        "malloc": args.malloc, "processes": "one per side, taking turns",
        "minor_page_faults_per_step": {k: round(common.median(v)) for k, v in faults.items()},
        "peak_rss_mib": peak_rss,
    }
    if len(args.cells) > 1:
        result.update({"cells": args.cells, "scan": args.scan, "cells_tokens_per_s": cells_tps,
                       "cells_parameters": cell_params, **cell_ratios,
                       "cells_tokens_per_s_per_repeat": {c: per_repeat["rnnkit" if c == "lstm" else f"rnnkit_{c}"]
                                                         for c in args.cells}})
    for side in sides.values():
        side.close()
    common.emit(result)


if __name__ == "__main__":
    main()
