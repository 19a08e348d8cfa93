"""The classic sentiment recipe, as shipped, reaches the issue's target in its 4 epochs on the stand-in data."""

import json
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "imdb-simple-rnn.toml"


@pytest.mark.slow
def test_the_tf2_simple_rnn_recipe_reaches_65_percent_in_4_epochs(tmp_path, shared_corpora):
    """Seeded 85/15 split of movie-review-sentences (10 points validating); measured 70.1-74.7% over seeds 0-2."""
    from rnnkit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--config", str(RECIPE), "--out", str(out), "--quiet", "--threads", "1",
                 "--text", str(shared_corpora / "movie-review-sentences.tsv")]) == 0
    test = json.loads((out / "test_metrics.json").read_text(encoding="utf-8"))
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train_accuracy" in line]
    assert len(epochs) == 4 and test["examples"] == 1585
    assert test["accuracy"] >= 0.65, test["accuracy"]
