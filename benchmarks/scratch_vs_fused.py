"""Scratch backend vs fused backend: forward + backward time of the same recurrent stack.

Both sides are ``rnnkit.models.recurrent.Recurrent`` with the same weights
(built from one seed): ``backend="fused"`` runs ``nn.LSTM`` (oneDNN on CPU),
``backend="scratch"`` the hand-written cells of ``rnnkit.models.cells`` (input
projection hoisted into one matrix product per layer, then a time loop over
``unbind(1)``). One timed call is a forward pass over a (B, T, I) batch from a
carried (detached) state plus the backward pass of a loss on every output
and on the final state, as in truncated-BPTT training.

The two sides alternate (A B, B A, ...) in one process because the host's
speed drifts; the figure is the median of the per-repeat time ratios
scratch / fused. The default shape is the issue's: a 2-layer 256-unit LSTM,
batch 32, length 64 (input size 256); target ratio <= 1.5. Also checks that
both sides agree (outputs and gradients) before timing. Prints one JSON
object on stdout; progress goes to stderr.

    .venv/bin/python benchmarks/scratch_vs_fused.py            # full run (~1 min on 2 cores)
    .venv/bin/python benchmarks/scratch_vs_fused.py --quick    # smoke run (a few seconds)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _common as common
import torch

from rnnkit.models.recurrent import Recurrent

TARGET_RATIO = 1.5


def make_side(args: argparse.Namespace, backend: str) -> Recurrent:
    torch.manual_seed(args.seed)  # same seed: the scratch stack draws the same default weights
    model = Recurrent(cell=args.cell, input_size=args.input_size, hidden=args.hidden, layers=args.layers,
                      backend=backend)
    return model.train()


def make_step(model: Recurrent, x: torch.Tensor, state: tuple[torch.Tensor, ...],
              weights: torch.Tensor) -> Callable[[], float]:
    def step() -> float:
        for p in model.parameters():
            p.grad = None
        out, final = model(x, state)  # (B, T, H)
        loss = (out * weights).mean() + sum(s.mean() for s in final)
        loss.backward()
        return loss.item()

    return step


def check_agreement(fused: Recurrent, scratch: Recurrent, step_f: Callable[[], float],
                    step_s: Callable[[], float]) -> float:
    """Max abs difference of the loss and every gradient after one step of each."""
    loss_f, loss_s = step_f(), step_s()
    diffs = [abs(loss_f - loss_s)]
    for a, b in zip(fused.parameters(), scratch.parameters(), strict=True):
        diffs.append((a.grad - b.grad).abs().max().item())
    return max(diffs)


def timed(step: Callable[[], float], n: int) -> float:
    t0 = common.now()
    for _ in range(n):
        step()
    return (common.now() - t0) / n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=None, help="A/B repetitions (default 9; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed forward+backward calls per side per repeat "
                                                           "(default 5; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side first (default 3; quick 1)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--cell", choices=["lstm", "gru", "rnn"], default="lstm", help="recurrent cell")
    p.add_argument("--hidden", type=int, default=256, help="hidden units per layer")
    p.add_argument("--layers", type=int, default=2, help="stacked layers")
    p.add_argument("--input-size", type=int, default=256, help="input features per step")
    p.add_argument("--batch", type=int, default=32, help="batch size B")
    p.add_argument("--seq-len", type=int, default=64, help="sequence length T")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    args = p.parse_args(argv)
    defaults = {"repeats": (9, 2), "steps": (5, 1), "warmup": (3, 1)}  # (full, quick)
    return common.fill_defaults(args, defaults)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    fused, scratch = make_side(args, "fused"), make_side(args, "scratch")
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.seq_len, args.input_size, generator=gen)
    state = tuple(torch.randn(args.layers, args.batch, args.hidden, generator=gen) * 0.1
                  for _ in range(fused.state_size))  # a carried, detached state
    weights = torch.randn(args.batch, args.seq_len, args.hidden, generator=gen)
    steps = {"fused": make_step(fused, x, state, weights), "scratch": make_step(scratch, x, state, weights)}

    common.log(f"scratch_vs_fused: {args.layers}x{args.hidden} {args.cell.upper()}, input {args.input_size}, "
               f"B={args.batch} T={args.seq_len}, {args.threads} threads, {args.repeats} repeats x "
               f"{args.steps} steps")
    max_abs_diff = check_agreement(fused, scratch, steps["fused"], steps["scratch"])
    common.log(f"  agreement: max abs diff of loss and gradients {max_abs_diff:.2e}")
    for name, step in steps.items():
        seconds = timed(step, args.warmup)
        common.log(f"  warm-up {name}: {args.warmup} calls, {seconds * 1e3:.1f} ms each")

    per_repeat: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        order = ["fused", "scratch"] if r % 2 == 0 else ["scratch", "fused"]
        for name in order:
            per_repeat[name].append(timed(steps[name], args.steps))
        common.log(f"  repeat {r + 1}/{args.repeats}: fused {per_repeat['fused'][-1] * 1e3:.1f} ms, "
                   f"scratch {per_repeat['scratch'][-1] * 1e3:.1f} ms")

    paired = [s / f for s, f in zip(per_repeat["scratch"], per_repeat["fused"], strict=True)]
    ratio = common.median(paired)
    tokens = args.batch * args.seq_len
    result = {
        "benchmark": "scratch_vs_fused",
        "quick": args.quick,
        **common.environment(args.threads),
        "shapes": {"cell": args.cell, "layers": args.layers, "hidden": args.hidden, "input_size": args.input_size,
                   "batch": args.batch, "seq_len": args.seq_len,
                   "parameters": sum(p.numel() for p in fused.parameters())},
        "work": "forward + backward of Recurrent from a carried state; loss on every output and the final state",
        "repeats": args.repeats, "steps_per_repeat": args.steps, "warmup_steps": args.warmup,
        "fused_ms": round(common.median(per_repeat["fused"]) * 1e3, 2),
        "scratch_ms": round(common.median(per_repeat["scratch"]) * 1e3, 2),
        "fused_tokens_per_s": round(tokens / common.median(per_repeat["fused"]), 1),
        "scratch_tokens_per_s": round(tokens / common.median(per_repeat["scratch"]), 1),
        "ratio": round(ratio, 3),
        "paired_ratios": [round(v, 3) for v in paired],
        "target_ratio": TARGET_RATIO,
        "meets_target": bool(ratio <= TARGET_RATIO),
        "max_abs_diff": max_abs_diff,
        "peak_rss_mib": common.peak_rss_mib(),
    }
    common.emit(result)


if __name__ == "__main__":
    main()
