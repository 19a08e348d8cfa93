"""Generation throughput: rnnkit's stateful generate() next to the tutorial "re-feed the window" loop.

* stateful: ``rnnkit.generation.generate`` from a 40-token prime, one
  sequence, temperature 1.0: the prime is read once, then one recurrent step
  per new token with carried state.
* refeed: the way many tutorials (and the Keras text-generation example) do
  it: for every new character, run the same ``LanguageModel`` (eval mode,
  ``torch.inference_mode``) over the last 40 tokens from a zero state and
  sample from the last position's logits.
* batched64: ``generate(..., num_samples=64)``; characters counted over all 64.
* bind_ms: what each ``generate()`` call (each ``Stream.sample``) pays once before its
  first step: ``model.stepper()`` lays the weights out for the one-token step
  (``[W_ih|W_hh]^T`` per layer, summed biases, the input table). Included in
  the stateful and batched64 figures; reported apart to show its share.
* refeed_warm_malloc: the refeed loop again with glibc told to keep big
  blocks. Each fused ``nn.LSTM`` call on CPU allocates ~16 MB of scratch (the
  weights re-laid out for oneDNN) and, with a fresh process's malloc settings,
  page-faults all of it in again on every call; how often that happens
  depends on what the process did before, so the script pins the malloc
  thresholds (``--malloc dynamic`` leaves them alone) and reports both.

Same model, same process; the runs alternate (rotating order) over several
repeats because the host's speed drifts. Prints one JSON object on stdout;
progress goes to stderr.

    .venv/bin/python benchmarks/generate_throughput.py            # full run (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/generate_throughput.py --quick    # smoke run (a few seconds)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import _common as common
import torch

from rnnkit.config import ModelConfig
from rnnkit.generation import generate
from rnnkit.models.language_model import LanguageModel

TARGET_SPEEDUP = 20.0


def stateful(model: LanguageModel, prime: list[int], *, length: int, temperature: float,
             num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """rnnkit's way: consume generate() to the end; returns (num_samples, length) ids."""
    steps = list(generate(model, prime, length=length, temperature=temperature,
                          num_samples=num_samples, generator=generator))
    return torch.stack(steps, dim=1)


@torch.inference_mode()
def refeed(model: LanguageModel, prime: list[int], *, length: int, temperature: float, window: int,
           generator: torch.Generator) -> list[int]:
    """The tutorial way: re-run the model over the last `window` tokens for every new token."""
    model.eval()
    seq = list(prime)
    for _ in range(length):
        x = torch.tensor(seq[-window:], dtype=torch.long).unsqueeze(0)  # (1, W)
        logits, _ = model(x)  # (1, W, V), from a zero state every time
        probs = torch.softmax(logits[0, -1].float() / temperature, dim=-1)  # (V,)
        seq.append(int(torch.multinomial(probs, 1, generator=generator)))
    return seq[len(prime):]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and short runs: a smoke run of a few seconds")
    p.add_argument("--repeats", type=int, default=None, help="A/B repetitions (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--hidden", type=int, default=None, help="hidden units per layer (default 512; quick 64)")
    p.add_argument("--layers", type=int, default=2, help="stacked LSTM layers")
    p.add_argument("--vocab", type=int, default=80, help="vocabulary size")
    p.add_argument("--prime-len", type=int, default=40, help="prime length, also the refeed window")
    p.add_argument("--length", type=int, default=None, help="new characters per timed run (default 300; quick 20)")
    p.add_argument("--batch", type=int, default=64, help="num_samples of the batched run")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, prime and sampling")
    p.add_argument("--malloc", choices=["pinned", "dynamic"], default="pinned",
                   help="pinned: fix glibc's malloc thresholds (a fresh process's defaults) so the refeed figure "
                        "does not depend on what ran before, and also time refeed with big blocks kept; "
                        "dynamic: leave glibc alone")
    args = p.parse_args(argv)
    defaults = {"repeats": (5, 2), "hidden": (512, 64), "length": (300, 20)}  # (full, quick)
    return common.fill_defaults(args, defaults)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.setup(args.threads, args.seed)
    pinned = args.malloc == "pinned" and common.set_malloc(*common.GLIBC_DEFAULT_MALLOC)
    config = ModelConfig(cell="lstm", hidden=args.hidden, layers=args.layers, input="embedding")
    model = LanguageModel(config=config, vocab_size=args.vocab)
    model.eval()
    prime = torch.randint(0, args.vocab, (args.prime_len,), generator=torch.Generator().manual_seed(args.seed))
    prime = prime.tolist()
    gen = torch.Generator().manual_seed(args.seed)
    L, T, W = args.length, args.temperature, args.prime_len

    def run_stateful(length: int, n: int) -> object:
        return stateful(model, prime, length=length, temperature=T, num_samples=n, generator=gen)

    def run_refeed(length: int) -> object:
        return refeed(model, prime, length=length, temperature=T, window=W, generator=gen)

    # name -> (run(length), characters per new token, glibc malloc setting or None to leave it)
    cases: dict[str, tuple[Callable[[int], object], int, tuple[int, int, int] | None]] = {
        "stateful": (lambda n: run_stateful(n, 1), 1, common.GLIBC_DEFAULT_MALLOC if pinned else None),
        "refeed": (run_refeed, 1, common.GLIBC_DEFAULT_MALLOC if pinned else None),
        "batched64": (lambda n: run_stateful(n, args.batch), args.batch,
                      common.GLIBC_DEFAULT_MALLOC if pinned else None),
    }
    if pinned:
        # The same refeed loop once glibc keeps big blocks: no page faults (see _common.set_malloc).
        cases["refeed_warm_malloc"] = (run_refeed, 1, common.WARM_MALLOC)
    common.log(f"generate_throughput: {args.layers}x{args.hidden} LSTM, V={args.vocab}, prime {args.prime_len}, "
               f"{L} chars per run, {args.threads} threads, {args.repeats} repeats, malloc "
               f"{'pinned' if pinned else 'left alone'}")

    # Warm-up: a short run of each (first calls allocate, pick kernels, fill caches).
    for name, (run, _, malloc) in cases.items():
        if malloc:
            common.set_malloc(*malloc)
        t0 = common.now()
        run(min(L, 10 if name.startswith("refeed") else 50))
        common.log(f"  warm-up {name}: {common.now() - t0:.2f} s")

    bind_ms = []
    with torch.inference_mode():
        for _ in range(7):
            t0 = common.now()
            model.stepper()
            bind_ms.append((common.now() - t0) * 1e3)
    common.log(f"  binding the one-token step: {common.median(bind_ms):.2f} ms (median of 7)")

    names = list(cases)
    per_repeat: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    shares: dict[str, list[float]] = {name: [] for name in names}
    load_before = common.load_average()
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so no side always goes first
        for name in order:
            run, per_token, malloc = cases[name]
            if malloc:
                common.set_malloc(*malloc)
            f0, c0, t0 = common.minor_faults(), common.cpu_time(), common.now()
            run(L)
            seconds = common.now() - t0
            shares[name].append(common.cpu_share(common.cpu_time() - c0, seconds, args.threads))
            per_repeat[name].append(round(L * per_token / seconds, 1))
            faults[name].append((common.minor_faults() - f0) / (L * per_token))
        common.log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {per_repeat[n][-1]:,.0f} chars/s (cpu {shares[n][-1]:.2f})" for n in names))
    if pinned:
        common.set_malloc(*common.GLIBC_DEFAULT_MALLOC)

    clean = common.clean_repeats(shares)
    if len(clean) < args.repeats:
        common.log(f"  warning: {args.repeats - len(clean)} repeat(s) ran while another process took CPU time "
                   f"(cpu share well below the best); see speedup_clean_repeats")
    med = {name: common.median(v) for name, v in per_repeat.items()}
    speedup = med["stateful"] / med["refeed"]
    paired = [a / b for a, b in zip(per_repeat["stateful"], per_repeat["refeed"], strict=True)]
    result = {
        "benchmark": "generate_throughput",
        "quick": args.quick,
        **common.environment(args.threads),
        "malloc": ("glibc thresholds pinned to a fresh process's defaults (mmap 128 KiB, trim 128 KiB); "
                   "refeed_warm_malloc: mmap 32 MiB, trim 64 MiB") if pinned else "left to the C library",
        "shapes": {
            "cell": "lstm", "layers": args.layers, "hidden": args.hidden, "embedding_dim": args.hidden,
            "vocab": args.vocab, "prime_len": args.prime_len, "refeed_window": W,
            "chars_per_run": L, "batch": args.batch,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "temperature": T, "repeats": args.repeats,
        "stateful_chars_per_s": round(med["stateful"], 1),
        "refeed_chars_per_s": round(med["refeed"], 1),
        "speedup": round(speedup, 2),
        "paired_speedups": [round(x, 2) for x in paired],
        "clean_repeats": clean,
        "speedup_clean_repeats": round(
            common.median([per_repeat["stateful"][i] for i in clean])
            / common.median([per_repeat["refeed"][i] for i in clean]), 2) if clean else None,
        "speedup_of_best": round(max(per_repeat["stateful"]) / max(per_repeat["refeed"]), 2),
        "batched64_chars_per_s": round(med["batched64"], 1),
        "batched64_vs_stateful": round(med["batched64"] / med["stateful"], 2),
        "bind_ms": round(common.median(bind_ms), 2),
        "bind_share_of_stateful_run": round(common.median(bind_ms) / 1e3 * med["stateful"] / L, 4),
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": bool(speedup >= TARGET_SPEEDUP),
    }
    if "refeed_warm_malloc" in med:
        result["refeed_warm_malloc_chars_per_s"] = round(med["refeed_warm_malloc"], 1)
        result["speedup_vs_refeed_warm_malloc"] = round(med["stateful"] / med["refeed_warm_malloc"], 2)
    result.update({f"{name}_chars_per_s_per_repeat": per_repeat[name] for name in names})
    result["cpu_share_per_repeat"] = shares
    result["load_average_before_after"] = [load_before, common.load_average()]
    result["minor_page_faults_per_char"] = {name: round(common.median(v), 1) for name, v in faults.items()}
    result["peak_rss_mib"] = common.peak_rss_mib()
    common.emit(result)


if __name__ == "__main__":
    main()
