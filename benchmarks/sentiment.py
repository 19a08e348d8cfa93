"""Sentiment accuracy and wall-clock of the two classification recipes on movie-review-sentences.

Runs recipes/imdb-simple-rnn.toml (the classic architecture; more epochs on this smaller data
set) and recipes/sentiment-bilstm.toml on the same seeded 80/10/10 split, one after the other
in one process, and prints one JSON object: test accuracy, best validation accuracy, epochs and
seconds of each, next to the issue's targets (65% and 75%).

    .venv/bin/python benchmarks/sentiment.py            # a few minutes per recipe on 2 cores
    .venv/bin/python benchmarks/sentiment.py --quick    # one epoch each on 2,000 sentences
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from rnnkit.config import load_config
from rnnkit.data import corpora
from rnnkit.data.classification import read_labelled, split_examples
from rnnkit.training.classify import prepare_classify_data, train_classifier

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "corpora" / "movie-review-sentences.tsv"
RECIPES = {"classic": ("imdb-simple-rnn.toml", 0.65, 20), "best": ("sentiment-bilstm.toml", 0.75, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one epoch each on a 2,000-sentence subset")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = SHARED if SHARED.is_file() else corpora.fetch("movie-review-sentences")
    sets = read_labelled(path)
    if args.quick:
        sets = {"all": sets["all"][:1000] + sets["all"][-1000:]}
    results = {}
    for name, (recipe, target, epochs) in RECIPES.items():
        config = load_config(ROOT / "recipes" / recipe)
        config.data.corpus, config.data.text = None, str(path)
        config.data.val_fraction = config.data.test_fraction = 0.1
        config.train.seed = args.seed
        config.train.threads = args.threads
        if epochs:
            config.train.epochs = epochs  # MR is smaller than IMDB: the classic network needs more passes
        if args.quick:
            config.train.epochs = 1
        splits = split_examples(sets, val_fraction=0.1, test_fraction=0.1, seed=args.seed)
        data = prepare_classify_data(config, splits, source=str(path))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = train_classifier(config, data, out_dir=out)
            seconds = time.perf_counter() - start
        results[name] = {
            "recipe": recipe, "test_accuracy": result.test["accuracy"], "best_val_accuracy": result.best_val_accuracy,
            "epochs": result.epochs, "stopped_by": result.stopped_by, "seconds": round(seconds, 1),
            "target_test_accuracy": target, "meets_target": result.test["accuracy"] >= target,
            "test_examples": result.test["examples"],
        }
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "sentiment", "data": str(path), "quick": args.quick, "threads": args.threads,
                      "torch": torch.__version__, **results}, indent=2))


if __name__ == "__main__":
    main()
