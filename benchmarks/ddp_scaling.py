"""Data-parallel scaling on this machine: 1 process x 2 threads against 2 processes x 1 thread.

Both sides run rnnkit's engine step (``engine.train_step`` with the language-model loss
and a :class:`~rnnkit.training.engine.Plan`) on the same global batch of sequential
streams; the two-process side is started with torchrun (gloo on 127.0.0.1). Each side
reports tokens/s of the global batch, and the two-process side also the share of a step
spent in the gradient all-reduce. The sides alternate over ``--repeats``; the headline
figures are medians. Prints one JSON object on stdout.

    .venv/bin/python benchmarks/ddp_scaling.py            # ~2-4 min on 2 cores
    .venv/bin/python benchmarks/ddp_scaling.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import _common as common


def worker(args: argparse.Namespace) -> None:
    """One side's timed steps (alone, or as one rank under torchrun); rank 0 prints a JSON line."""
    import torch

    from rnnkit.config import ModelConfig
    from rnnkit.data.batching import SequentialStreams
    from rnnkit.models.language_model import LanguageModel
    from rnnkit.runtime import init_distributed
    from rnnkit.training import engine
    from rnnkit.training.lm import lm_forward

    group = init_distributed("cpu")
    common.setup(args.threads, args.seed)
    ids = common.synthetic_ids(args.batch * args.seq_len * (args.steps + args.warmup + 2) + 1, args.vocab, args.seed)
    model = LanguageModel(config=ModelConfig(hidden=args.hidden, layers=args.layers), vocab_size=args.vocab)
    optimizer = engine.build_optimizer("adam", model.parameters(), lr=2e-3, weight_decay=0.0)
    plan = engine.Plan(precision="fp32", accum=1, device=torch.device("cpu"), group=group)
    reduce_seconds = [0.0]
    all_reduce = plan.all_reduce

    def timed_all_reduce(model, loss):
        start = time.perf_counter()
        result = all_reduce(model, loss)
        reduce_seconds[0] += time.perf_counter() - start
        return result

    plan.all_reduce = timed_all_reduce
    batches = SequentialStreams(ids, seq_len=args.seq_len, batch_size=args.batch).epoch()
    carry = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            reduce_seconds[0] = 0.0
            group.barrier()
            start = time.perf_counter()
        forward, _ = engine.train_step(model, optimizer, next(batches), carry, loss_fn=lm_forward, clip=5.0,
                                       device=torch.device("cpu"), plan=plan)
        carry = forward.state
    seconds = time.perf_counter() - start
    if group.main:
        print(json.dumps({"tokens_per_s": args.batch * args.seq_len * args.steps / seconds,
                          "all_reduce_share": reduce_seconds[0] / seconds, "seconds": seconds}), flush=True)


def run_side(args: argparse.Namespace, processes: int) -> dict:
    script = [os.path.abspath(__file__), "--worker", "--threads", str(2 // processes), "--hidden", str(args.hidden),
              "--layers", str(args.layers), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
              "--steps", str(args.steps), "--warmup", str(args.warmup), "--vocab", str(args.vocab)]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes)}
    if processes == 1:
        command = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"ddp_scaling: a side failed:\n{done.stdout}\n{done.stderr}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few steps")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="the global batch (each of 2 processes takes half)")
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--vocab", type=int, default=80)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.worker:
        worker(args)
        from rnnkit.runtime import exit_process

        exit_process(0)  # a group member leaves it before the interpreter's teardown
    if args.quick:
        args.hidden, args.layers, args.batch, args.seq_len, args.steps, args.repeats = 32, 1, 8, 16, 5, 1
    rows: dict[str, list[dict]] = {"1x2": [], "2x1": []}
    for repeat in range(args.repeats):
        order = ["1x2", "2x1"] if repeat % 2 == 0 else ["2x1", "1x2"]
        for side in order:
            rows[side].append(run_side(args, 1 if side == "1x2" else 2))
            common.log(f"  repeat {repeat + 1} {side}: {rows[side][-1]['tokens_per_s']:,.0f} tok/s")
    one = common.median([r["tokens_per_s"] for r in rows["1x2"]])
    two = common.median([r["tokens_per_s"] for r in rows["2x1"]])
    print(json.dumps({
        "benchmark": "ddp_scaling", "shape": f"LSTM {args.layers}x{args.hidden}, B={args.batch} T={args.seq_len}",
        "one_process_two_threads_tokens_per_s": round(one, 1), "two_processes_one_thread_tokens_per_s": round(two, 1),
        "ratio_two_processes_vs_one": round(two / one, 3),
        "all_reduce_share_of_step": round(common.median([r["all_reduce_share"] for r in rows["2x1"]]), 4),
        "repeats": rows, "environment": common.environment(2),
    }, indent=2))


if __name__ == "__main__":
    main()
