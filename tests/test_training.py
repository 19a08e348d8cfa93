import json

import pytest
import torch

from rnnkit import RunConfig, load_checkpoint, prepare_lm_data, train_language_model
from rnnkit.training.events import Reporter


def small_config(tmp_path, text, **train):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    config = RunConfig()
    config.out = str(tmp_path / "run")
    config.data.text = str(path)
    config.data.seq_len, config.data.batch_size, config.data.val_fraction = 16, 8, 0.1
    config.model.hidden, config.model.layers = 64, 1
    config.train.eval_every, config.train.log_every, config.train.sample_length = 100, 20, 20
    for k, v in train.items():
        setattr(config.train, k, v)
    return config


class Recorder(Reporter):
    def __init__(self):
        self.events = []

    def on_eval(self, event):
        self.events.append(("eval", event.record))

    def on_sample(self, event):
        self.events.append(("sample", event.text))


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_overfits_a_short_text(tmp_path, sampling):
    text = "abcdefghij klmnop qrstuv wxyz. " * 40
    config = small_config(tmp_path, text, max_steps=300, lr=1e-2, seed=1)
    config.data.sampling = sampling
    data = prepare_lm_data(config.data)
    result = train_language_model(config, data, out_dir=config.out)
    assert result.train_loss < 0.05
    assert result.best_val_loss < 0.1  # the held-out tail starts from a cold state
    assert load_checkpoint(config.out, prefer="last").meta["state"]["step"] == 300
    best = load_checkpoint(config.out).meta["state"]
    assert best["val_loss"] == best["best_val_loss"] == result.best_val_loss


def test_same_seed_same_weights(tmp_path):
    text = "to be or not to be, that is the question. " * 30
    weights = []
    for i in range(2):
        config = small_config(tmp_path / str(i), text, max_steps=30, seed=3)
        config.data.sampling = "random"
        train_language_model(config, prepare_lm_data(config.data), out_dir=config.out)
        weights.append(load_checkpoint(config.out, prefer="last").model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_metrics_log_samples_and_data_cache(tmp_path, tiny_text):
    config = small_config(tmp_path, tiny_text, max_steps=40, eval_every=20, sample_prefixes=["the "])
    recorder = Recorder()
    data = prepare_lm_data(config.data, cache_dir=tmp_path / "run" / "data")
    assert not data.from_cache
    train_language_model(config, data, out_dir=config.out, reporter=recorder)
    evals = [e for kind, e in recorder.events if kind == "eval"]
    samples = [e for kind, e in recorder.events if kind == "sample"]
    assert [e["step"] for e in evals] == [20, 40] and len(samples) == 2
    assert all(s.startswith("the ") and len(s) == len("the ") + 20 for s in samples)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "tokens_per_s", "lr"} <= set(records[0])
    assert any("val_perplexity" in r for r in records)
    again = prepare_lm_data(config.data, cache_dir=tmp_path / "run" / "data")
    assert again.from_cache and (again.train == data.train).all() and again.train.dtype == data.train.dtype


def test_target_last_trains_many_to_one(tmp_path):
    text = "abcabcabdabcabcabd" * 20
    config = small_config(tmp_path, text, max_steps=150, lr=1e-2)
    config.data.target, config.data.sampling, config.data.seq_len = "last", "random", 6
    result = train_language_model(config, prepare_lm_data(config.data), out_dir=config.out)
    assert result.train_loss < 0.1
    assert result.tokens == 150 * config.data.batch_size  # one target per window
