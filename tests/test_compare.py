"""The ingredients of the d2l sampling experiment, and a short run of it.

Clipping scales the global gradient norm to theta; random batches start from
a zero state while sequential ones carry the previous state, detached; and
:func:`compare_sampling` reports, plots and checks its prefixes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rnnkit.config import ModelConfig, RunConfig
from rnnkit.data.batching import RandomWindows, SequentialStreams
from rnnkit.errors import RnnkitError
from rnnkit.models.language_model import LanguageModel
from rnnkit.training.compare import CompareReporter, compare_sampling, one_line, prepare_data
from rnnkit.training.lm import train_step

CPU = torch.device("cpu")


def model(backend: str = "scratch", cell: str = "rnn", vocab: int = 13) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, hidden=16, layers=1, input="onehot", backend=backend)
    return LanguageModel(config=config, vocab_size=vocab)


def grad_norm(m: nn.Module) -> float:
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in m.parameters()))


# ---------------------------------------------------------------- clipping


@pytest.mark.parametrize("backend", ["fused", "scratch"])
def test_clipping_scales_the_global_norm_to_theta(backend):
    ids = np.random.default_rng(0).integers(0, 13, size=400)
    batch = next(SequentialStreams(ids, seq_len=10, batch_size=4).epoch())
    net = model(backend)
    frozen = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: the step leaves weights and grads as they are

    train_step(net, frozen, batch, None, clip=0.0, device=CPU)  # no clipping
    raw = [p.grad.clone() for p in net.parameters()]
    norm = grad_norm(net)
    theta = norm / 7
    train_step(net, frozen, batch, None, clip=theta, device=CPU)
    assert grad_norm(net) == pytest.approx(theta, rel=1e-5)  # the global norm, over every parameter
    for g, r in zip((p.grad for p in net.parameters()), raw, strict=True):
        assert torch.allclose(g, r * (theta / norm), rtol=1e-4, atol=1e-9)  # direction kept: one common scale

    train_step(net, frozen, batch, None, clip=norm * 2, device=CPU)  # theta above the norm: untouched
    for g, r in zip((p.grad for p in net.parameters()), raw, strict=True):
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- state reset vs carry


class Spy(nn.Module):
    """Wraps a language model and records the state each call receives and returns."""

    def __init__(self, inner: LanguageModel) -> None:
        super().__init__()
        self.inner = inner
        self.received: list[tuple[torch.Tensor, ...] | None] = []
        self.returned: list[tuple[torch.Tensor, ...]] = []

    def forward(self, ids, state=None):
        self.received.append(state)
        logits, new = self.inner(ids, state)
        self.returned.append(new)
        return logits, new


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_random_sampler_resets_state_sequential_carries_it_detached(cell):
    ids = np.arange(600) % 13
    for sampling in ("random", "sequential"):
        spy = Spy(model(cell=cell))
        opt = torch.optim.SGD(spy.parameters(), lr=0.5)
        batcher = (RandomWindows(ids, seq_len=8, batch_size=4, seed=0) if sampling == "random"
                   else SequentialStreams(ids, seq_len=8, batch_size=4))
        state, calls_per_epoch = None, 0
        for _ in range(2):  # two epochs
            calls_per_epoch = 0
            for batch in batcher.epoch():
                state = train_step(spy, opt, batch, state, clip=1.0, device=CPU).state
                calls_per_epoch += 1
        received = spy.received
        if sampling == "random":
            assert all(s is None for s in received)  # every batch from a zero state
            continue
        for k, got in enumerate(received):
            if k % calls_per_epoch == 0:
                assert got is None  # each epoch starts its streams afresh
                continue
            before = spy.returned[k - 1]
            assert all(torch.equal(a, b) for a, b in zip(got, before, strict=True))  # the values carried ...
            assert all(s.grad_fn is None and not s.requires_grad for s in got)  # ... but cut from the graph
            assert before[0].grad_fn is not None  # (what was returned was part of the graph)


def test_carried_state_continues_the_streams_exactly():
    """With the weights fixed, window k with the carried state equals a cold pass over windows 0..k."""
    ids = np.random.default_rng(1).integers(0, 13, size=500)
    batcher = SequentialStreams(ids, seq_len=6, batch_size=3)
    spy = Spy(model())
    frozen = torch.optim.SGD(spy.parameters(), lr=0.0)
    state, windows, logits = None, [], []
    for batch in list(batcher.epoch())[:3]:
        state = train_step(spy, frozen, batch, state, clip=0.0, device=CPU).state
        windows.append(batch.x)
        with torch.no_grad():
            logits.append(spy.inner(batch.x, spy.received[-1])[0])
    with torch.no_grad():
        whole = spy.inner(torch.cat(windows, dim=1))[0]  # (B, 3T, V) from zeros
    assert torch.allclose(torch.cat(logits, dim=1), whole, atol=1e-5)


# ---------------------------------------------------------------- the comparison


def tiny_config(tmp_path, text: str, **train) -> RunConfig:
    path = tmp_path / "lyrics.txt"
    path.write_text(text, encoding="utf-8")
    return RunConfig.from_dict({
        "data": {"text": str(path), "seq_len": 10, "batch_size": 4, "val_fraction": 0.1},
        "model": {"cell": "rnn", "hidden": 32, "layers": 1, "input": "onehot", "backend": "scratch",
                  "init": "normal"},
        "train": {"optimizer": "sgd", "lr": 100.0, "clip": 0.01, "epochs": 4, "seed": 0, **train},
    })


LYRICS = "不分开 我不能再想 我不 我不 我不能 爱情来的太快就像龙卷风 离不开暴风圈来不及逃\n" * 12


class Events(CompareReporter):
    def __init__(self) -> None:
        self.epochs: list[tuple[str, int]] = []
        self.rows = []
        self.ended = None

    def on_epoch(self, sampling, epoch, perplexity, seconds):
        self.epochs.append((sampling, epoch))

    def on_row(self, row):
        self.rows.append(row)

    def on_end(self, result):
        self.ended = result


def test_compare_sampling_short_run(tmp_path):
    config = tiny_config(tmp_path, LYRICS)
    events = Events()
    plot = tmp_path / "plots" / "sampling.png"
    result = compare_sampling(config, every=2, length=8, reporter=events, plot_path=plot)

    assert [(r.epoch, r.sampling) for r in result.rows] == [
        (2, "random"), (2, "sequential"), (4, "random"), (4, "sequential")]
    assert events.rows == result.rows and events.ended is result
    assert events.epochs[:4] == [("random", 1), ("sequential", 1), ("random", 2), ("sequential", 2)]
    for sampling, curve in result.curves.items():
        assert [e for e, _, _ in curve] == [1, 2, 3, 4]
        ppl = [p for _, p, _ in curve]
        assert all(math.isfinite(p) and p >= 1 for p in ppl)
        assert ppl[-1] < ppl[0] < result.vocab_size * 1.5, sampling  # it learns
        seconds = [s for _, _, s in curve]
        assert seconds == sorted(seconds) and seconds[0] > 0
    for row in result.rows:
        assert row.val_perplexity is not None and row.val_perplexity > 1
        assert set(row.continuations) == {"分开", "不分开"}
        assert row.continuations["分开"].startswith("分开") and len(row.continuations["分开"]) == 2 + 8
    assert result.plot_path == plot and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 4 | sequential |" in result.table()
    assert result.to_dict()["rows"][0]["sampling"] == "random"


def test_same_start_for_both_samplings(tmp_path):
    """Both models start from the same weights: at epoch 1 the greedy text from a fresh model agrees."""
    config = tiny_config(tmp_path, LYRICS, epochs=1, lr=1e-9)  # lr ~0: the weights stay the initial ones
    result = compare_sampling(config, every=1, length=5)
    assert result.rows[0].continuations == result.rows[1].continuations


def test_prefix_outside_the_vocabulary_fails_before_training(tmp_path):
    config = tiny_config(tmp_path, LYRICS)

    class NoTraining(CompareReporter):
        def on_epoch(self, *args):
            raise AssertionError("trained before checking the prefixes")

    with pytest.raises(RnnkitError, match="'周'.*'杰'|'杰'.*'周'") as caught:
        compare_sampling(config, prefixes=["分开", "周杰伦"], reporter=NoTraining())
    message = str(caught.value)
    assert "周杰伦" in message and "not in the vocabulary" in message and "\n" not in message


def test_bad_arguments_are_one_line_errors(tmp_path):
    config = tiny_config(tmp_path, LYRICS, epochs=2.5)
    with pytest.raises(RnnkitError, match="whole number of epochs"):
        compare_sampling(config)
    config = tiny_config(tmp_path, LYRICS)
    with pytest.raises(RnnkitError, match="every"):
        compare_sampling(config, every=0)
    with pytest.raises(RnnkitError, match="PNG"):
        compare_sampling(config, every=4, length=1, plot_path=tmp_path / "plot.svg")


def test_max_chars_keeps_the_head_of_the_text(tmp_path):
    config = tiny_config(tmp_path, LYRICS)
    data = prepare_data(config.data, max_chars=300)
    assert len(data.train) + len(data.val) == 300 == data.chars
    assert "first 300 characters" in data.source
    assert data.tokenizer.decode(data.train[:5].tolist()) == LYRICS[:5]
    assert len(prepare_data(config.data).train) + len(prepare_data(config.data).val) == len(LYRICS)


def test_one_line_marks_line_breaks():
    assert one_line("分开\n我\r\n") == "分开↵我↵"
