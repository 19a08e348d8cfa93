"""Sentiment accuracy and wall-clock of the two classification recipes on movie-review-sentences.

Runs recipes/imdb-simple-rnn.toml (the TF2 SimpleRNN tutorial's network and its 4 epochs) and
recipes/sentiment-bilstm.toml as they are, each on the seeded split its own fractions give
(75/10/15 and 80/10/10), one after the other in one process, and prints one JSON object: test
accuracy, best validation accuracy, epochs and seconds of each, next to the targets (65% and 78%).

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
RECIPES = {"classic": ("imdb-simple-rnn.toml", 0.65), "best": ("sentiment-bilstm.toml", 0.78)}


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
    for name, (recipe, target) in RECIPES.items():
        config = load_config(ROOT / "recipes" / recipe)
        config.data.corpus, config.data.text = None, str(path)
        config.train.seed = args.seed
        config.train.threads = args.threads
        if args.quick:
            config.train.epochs = 1
        d = config.data
        splits = split_examples(sets, val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=args.seed)
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
