"""Full vs adaptive softmax on a ~30k-word vocabulary: tokens/s and held-out perplexity after equal wall-clock.

The text is ../shared/corpora/shakespeare.txt at word level, case kept (32,456
words with <unk>; 1.17M tokens), split as ``rnnkit train`` splits it (the last
5% validate). Two 1x256 LSTM language models start from the same seed, one
with ``--softmax full``, one with ``--softmax adaptive`` (default cut-offs
V/16 and V/4, div_value 4); each trains with Adam 2e-3, clip 5, sequential
streams of 64 x 35 tokens, through rnnkit's ``train_step`` (what ``rnnkit
train`` runs per step). They take turns in ``--slices`` slices of
``--seconds / --slices`` each (full, adaptive, adaptive, full, ...), because the
host's speed drifts; only training time is counted. Then both are scored on
the same held-out tokens (``evaluate_lm``, carried state). Prints one JSON
object: tokens/s of each, their ratio, held-out perplexity of each, steps.

    .venv/bin/python benchmarks/adaptive_softmax.py                 # 2 x 120 s of training
    .venv/bin/python benchmarks/adaptive_softmax.py --quick         # 2 x 10 s smoke run
    .venv/bin/python benchmarks/adaptive_softmax.py --quick --synthetic   # no ../shared: Zipfian made-up words

Without ../shared (and without ``--synthetic``) it prints ``{"skipped": ...}``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import _common as common
import numpy as np
import torch

from rnnkit.config import DataConfig, ModelConfig
from rnnkit.data.batching import SequentialStreams
from rnnkit.data.lm_data import LMData, prepare_lm_data
from rnnkit.evaluation import evaluate_lm, lm_metrics
from rnnkit.models.language_model import LanguageModel
from rnnkit.training.engine import build_optimizer
from rnnkit.training.lm import train_step

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "shakespeare.txt"
TARGET_RATIO = 3.0


def zipf_text(words: int, vocab: int, seed: int) -> str:
    """Made-up words drawn from a Zipf law (s = 1.1) over ``vocab`` ranks, 12 to a line."""
    ranks = np.random.default_rng(seed).zipf(1.1, 3 * words)
    ranks = ranks[ranks <= vocab][:words] - 1  # the law cut at ``vocab`` ranks, not piled onto the last one
    pieces = [f"w{r}" for r in ranks]
    return "\n".join(" ".join(pieces[i : i + 12]) for i in range(0, len(pieces), 12)) + "\n"


def load_data(args, folder: Path) -> LMData:
    path = SHARED
    if args.synthetic:
        path = folder / "zipf.txt"
        path.write_text(zipf_text(200_000, 20_000, args.seed), encoding="utf-8")
    return prepare_lm_data(DataConfig(text=str(path), level="word", val_fraction=0.05), log=common.log)


class Side:
    """One model, its optimizer and its endless sequential batches; ``run(seconds)`` trains that long."""

    def __init__(self, softmax: str, data: LMData, args) -> None:
        torch.manual_seed(args.seed)  # the same recurrent weights and embedding for both
        config = ModelConfig(cell="lstm", hidden=args.hidden, layers=1, softmax=softmax)
        self.model = LanguageModel(config=config, vocab_size=data.tokenizer.vocab_size).train()
        self.optimizer = build_optimizer("adam", self.model.parameters(), lr=2e-3, weight_decay=0.0)
        batcher = SequentialStreams(data.train, seq_len=args.seq_len, batch_size=args.batch)
        self.batches = itertools.chain.from_iterable(batcher.epoch() for _ in itertools.count())
        self.state, self.seconds, self.steps, self.tokens = None, 0.0, 0, 0
        self.per_step = args.batch * args.seq_len
        self.last_loss = float("nan")

    def run(self, seconds: float) -> None:
        start = common.now()
        while common.now() - start < seconds:
            out = train_step(self.model, self.optimizer, next(self.batches), self.state, clip=5.0,
                             device=torch.device("cpu"))
            self.state, self.steps, self.tokens = out.state, self.steps + 1, self.tokens + self.per_step
            self.last_loss = out.loss.item()
        self.seconds += common.now() - start

    def head_parameters(self) -> int:
        return sum(p.numel() for p in self.model.head.parameters())


def compare(args, data: LMData) -> dict:
    """Train both sides in alternating slices, then score both on the same held-out tokens."""
    sides = {name: Side(name, data, args) for name in ("full", "adaptive")}
    order = ["full", "adaptive"]
    for turn in range(args.slices):
        for name in order if turn % 2 == 0 else order[::-1]:
            sides[name].run(args.seconds / args.slices)
            common.log(f"{name}: {sides[name].steps} steps, loss {sides[name].last_loss:.3f}")
    result = {"source": "synthetic Zipf words" if args.synthetic else str(SHARED.name) + " (word level, case kept)",
              "vocab_size": data.tokenizer.vocab_size, "train_tokens": len(data.train),
              "cutoffs": sides["adaptive"].model.head.cutoffs[:-1], "seconds_each": args.seconds}
    for name, side in sides.items():
        loss, count, accuracy = evaluate_lm(side.model, data.val, batch_size=args.batch, seq_len=args.seq_len,
                                            max_tokens=args.eval_tokens)
        result[name] = {"steps": side.steps, "tokens_per_s": round(side.tokens / side.seconds, 1),
                        "held_out_perplexity": round(lm_metrics(loss, tokens=count)["perplexity"], 2),
                        "held_out_accuracy": round(accuracy, 4), "held_out_tokens": count,
                        "head_parameters": side.head_parameters(), "parameters": side.model.num_parameters()}
    full, adaptive = result["full"], result["adaptive"]
    result["ratio"] = round(adaptive["tokens_per_s"] / full["tokens_per_s"], 2)
    result["target_ratio"] = TARGET_RATIO
    result["perplexity_equal_or_better"] = adaptive["held_out_perplexity"] <= full["held_out_perplexity"]
    result["environment"] = common.environment(args.threads)
    result["load_average"] = common.load_average()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: 10 s of training each, 2,000 held-out tokens")
    p.add_argument("--synthetic", action="store_true", help="Zipfian made-up words instead of ../shared's text")
    p.add_argument("--seconds", type=float, default=None, help="training seconds of each side (default 120)")
    p.add_argument("--slices", type=int, default=4, help="turns each side takes (default 4)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored (default 20,000)")
    p.add_argument("--hidden", type=int, default=256, help="LSTM width (default 256)")
    p.add_argument("--batch", type=int, default=64, help="streams per batch (default 64)")
    p.add_argument("--seq-len", type=int, default=35, help="window length (default 35)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    args = common.fill_defaults(p.parse_args(), {"seconds": (120.0, 10.0), "eval_tokens": (20_000, 2_000)})
    if not args.synthetic and not SHARED.is_file():
        common.emit({"skipped": f"{SHARED} not found (use --synthetic for made-up words)"})
        return
    common.setup(args.threads, args.seed)
    with tempfile.TemporaryDirectory() as folder:  # the synthetic text, if any, lives as long as its ids
        common.emit(compare(args, load_data(args, Path(folder))))


if __name__ == "__main__":
    main()
