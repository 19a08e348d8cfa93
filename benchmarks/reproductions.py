"""The five classic tutorials, rerun from their recipes: the figures of docs/reproductions.md as JSON.

Each tutorial runs its recipe through the `rnnkit` command line, exactly as a user would,
on the data that can be had here: the stand-ins of ``../shared/corpora`` when that folder
exists (shakespeare.txt for nietzsche.txt, song-ci.txt for the Jay Chou lyrics,
movie-review-sentences.tsv for IMDB), else the recipe's own corpus, fetched. Per tutorial it
prints the result the table reports, the wall-clock of the whole command and, where the
tutorial shows generated text, the samples.

    .venv/bin/python benchmarks/reproductions.py                  # the full runs: ~20-30 min on 2 shared cores
    .venv/bin/python benchmarks/reproductions.py --only imdb-simple-rnn
    .venv/bin/python benchmarks/reproductions.py --quick          # a few steps of each (a CI smoke test)

``--quick`` shrinks every run to seconds (few steps, short series, short samples); its
figures say only that the recipes run. The sentiment target (>= 65% test accuracy in the
recipe's 4 epochs) is checked on the full run: ``meets_target``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHARED = ROOT.parent / "shared" / "corpora"
SENTIMENT_TARGET = 0.65

# tutorial -> (recipe, stand-in file in ../shared/corpora or None when the recipe's corpus ships with rnnkit)
TUTORIALS: dict[str, tuple[str, str | None]] = {
    "nietzsche-tf2": ("nietzsche-tf2.toml", "shakespeare.txt"),
    "belling-the-cat": ("belling-the-cat.toml", None),
    "imdb-simple-rnn": ("imdb-simple-rnn.toml", "movie-review-sentences.tsv"),
    "lyrics-scratch-rnn": ("lyrics-scratch-rnn.toml", "song-ci.txt"),
    "echo": ("echo.toml", None),
}

# Overrides that make each run take seconds in --quick mode.
QUICK: dict[str, list[str]] = {
    "nietzsche-tf2": ["--max-steps", "20", "--eval-every", "20", "--eval-max-tokens", "400", "--sample-length", "20"],
    "belling-the-cat": ["--max-steps", "20", "--eval-every", "20"],
    "imdb-simple-rnn": ["--epochs", "1", "--max-steps", "5"],
    "lyrics-scratch-rnn": ["--set", "train.epochs=2", "--every", "1", "--max-chars", "2000"],
    "echo": ["--series-length", "1500", "--epochs", "2", "--eval-every", "20", "--log-every", "10"],
}


def rnnkit(*args: str, threads: int) -> tuple[str, float]:
    """Run ``python -m rnnkit ARGS``; return its stdout and wall-clock seconds (one line of stderr on failure)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rnnkit", *args, "--threads", str(threads)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"reproductions: `rnnkit {' '.join(args)}` failed: {tail[0]}")
    return proc.stdout, seconds


def data_args(name: str, stand_in: str | None) -> tuple[list[str], str]:
    """The --text of the stand-in when ../shared/corpora holds it, else nothing (the recipe's own corpus)."""
    if stand_in is not None and (SHARED / stand_in).is_file():
        return ["--text", str(SHARED / stand_in)], f"{stand_in} (stand-in, ../shared/corpora)"
    return [], "the recipe's corpus"


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]


def last_with(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return next(r for r in reversed(rows) if key in r)


def train(name: str, extra: list[str], work: Path, threads: int) -> tuple[Path, float]:
    run = work / name
    _, seconds = rnnkit("train", "--config", str(RECIPES / TUTORIALS[name][0]), "--out", str(run), "--quiet",
                        *extra, threads=threads)
    return run, seconds


def generate(run: Path, prime: str, length: int, temperatures: list[float], threads: int) -> dict[str, str]:
    """One `rnnkit generate` call (seed 0) for all temperatures: {temperature: prime + sample}."""
    out, _ = rnnkit("generate", "--checkpoint", str(run), "--prime", prime, "--length", str(length),
                    "--temperature", *(f"{t:g}" for t in temperatures), "--seed", "0", threads=threads)
    if len(temperatures) == 1:
        return {f"{temperatures[0]:g}": out.strip("\n")}
    samples: dict[str, str] = {}
    current = None
    for line in out.split("\n"):
        header = re.fullmatch(r"----- temperature (\S+) -----", line)
        if header:
            current = header.group(1)
            samples[current] = ""
        elif current is not None:
            samples[current] += ("\n" if samples[current] else "") + line
    return {t: text.strip("\n") for t, text in samples.items()}


def nietzsche_tf2(extra: list[str], work: Path, threads: int, quick: bool) -> dict[str, Any]:
    run, seconds = train("nietzsche-tf2", extra, work, threads)
    rows = metrics(run)
    steps = [r for r in rows if "loss" in r]
    val = last_with(rows, "val_loss")
    return {"steps": steps[-1]["step"], "train_loss_last_log": steps[-1]["loss"], "val_loss": val["val_loss"],
            "val_bits_per_char": val["val_bits_per_char"], "val_accuracy": val.get("val_accuracy"),
            "seconds": round(seconds, 1),
            "samples": generate(run, "supposing that truth is a woman--what then? ", 40 if quick else 400,
                                [0.2, 0.5, 1.0, 1.2], threads)}


def belling_the_cat(extra: list[str], work: Path, threads: int, quick: bool) -> dict[str, Any]:
    run, seconds = train("belling-the-cat", extra, work, threads)
    steps = [r for r in metrics(run) if "loss" in r]
    return {"steps": steps[-1]["step"], "train_loss_last_log": steps[-1]["loss"],
            "train_accuracy_last_log": steps[-1]["accuracy"], "seconds": round(seconds, 1),
            "story": generate(run, "had a general", 32, [0.0], threads)["0"]}


def imdb_simple_rnn(extra: list[str], work: Path, threads: int, quick: bool) -> dict[str, Any]:
    run, seconds = train("imdb-simple-rnn", extra, work, threads)
    test = json.loads((run / "test_metrics.json").read_text(encoding="utf-8"))
    epochs = [r for r in metrics(run) if "train_accuracy" in r]
    result = {"test_accuracy": test["accuracy"], "test_examples": test["examples"],
              "train_accuracy_last_epoch": epochs[-1]["train_accuracy"] if epochs else None,
              "epochs": epochs[-1]["epoch"] if epochs else 0, "seconds": round(seconds, 1)}
    if not quick:
        result.update(target_test_accuracy=SENTIMENT_TARGET, meets_target=test["accuracy"] >= SENTIMENT_TARGET)
    return result


def lyrics_scratch_rnn(extra: list[str], work: Path, threads: int, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    out, _ = rnnkit("compare-sampling", "--config", str(RECIPES / "lyrics-scratch-rnn.toml"), "--json", "--quiet",
                    *extra, threads=threads)
    seconds = time.perf_counter() - start
    rows = json.loads(out)["rows"]
    last = max(r["epoch"] for r in rows)
    return {"epochs": last, "seconds": round(seconds, 1),
            **{r["sampling"]: {"perplexity": r["perplexity"], "val_perplexity": r["val_perplexity"],
                               "training_seconds": round(r["seconds"], 1), "continuations": r["continuations"]}
               for r in rows if r["epoch"] == last}}


def echo(extra: list[str], work: Path, threads: int, quick: bool) -> dict[str, Any]:
    run, seconds = train("echo", extra, work, threads)
    rows = metrics(run)
    val = last_with(rows, "val_accuracy")
    return {"steps": val["step"], "val_accuracy": val["val_accuracy"], "val_loss": val.get("val_loss"),
            "seconds": round(seconds, 1)}


RUNNERS = {"nietzsche-tf2": nietzsche_tf2, "belling-the-cat": belling_the_cat, "imdb-simple-rnn": imdb_simple_rnn,
           "lyrics-scratch-rnn": lyrics_scratch_rnn, "echo": echo}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps of each recipe (a smoke test, seconds each)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    p.add_argument("--only", nargs="+", choices=list(TUTORIALS), help="run only these tutorials")
    args = p.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rnnkit-repro-") as tmp:
        for name in args.only or list(TUTORIALS):
            extra, data = data_args(name, TUTORIALS[name][1])
            if args.quick:
                extra += QUICK[name]
            results[name] = {"recipe": f"recipes/{TUTORIALS[name][0]}", "data": data,
                             **RUNNERS[name](extra, Path(tmp), args.threads, args.quick)}
            print(f"{name}: {json.dumps(results[name], ensure_ascii=False)}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "reproductions", "quick": args.quick, "threads": args.threads,
                      "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), **results},
                     indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
