import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnkit.config import ModelConfig
from rnnkit.data.batching import RandomWindows, SequentialStreams
from rnnkit.errors import RnnkitError
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import detach_state


def ids(n=1000, vocab=50):
    return np.random.default_rng(0).integers(0, vocab, size=n).astype(np.uint8)


def test_random_targets_are_inputs_shifted_by_one():
    data = np.arange(500, dtype=np.uint16)  # id == position, so windows are easy to check
    batch = RandomWindows(data, seq_len=10, batch_size=8, seed=1).batch()
    assert batch.x.shape == (8, 10) and batch.y.shape == (8, 10)
    assert torch.equal(batch.y, batch.x + 1)
    assert batch.reset


def test_random_windows_stay_in_range_and_cover_the_end():
    data = np.arange(30, dtype=np.uint8)
    sampler = RandomWindows(data, seq_len=5, batch_size=200, seed=0)
    ys = torch.cat([sampler.batch().y for _ in range(20)])
    assert ys.max().item() == 29 and ys.min().item() >= 1


def test_target_last_is_the_next_token_after_the_window():
    data = np.arange(100, dtype=np.uint8)
    batch = RandomWindows(data, seq_len=3, batch_size=4, target="last", seed=0).batch()
    assert batch.y.shape == (4,)
    assert torch.equal(batch.y, batch.x[:, -1] + 1)


def test_sequential_streams_continue_each_other():
    data = np.arange(1001, dtype=np.uint16)
    streams = SequentialStreams(data, seq_len=10, batch_size=4)
    batches = list(streams.epoch())
    assert streams.stream_len == 250 and len(batches) == 25
    assert batches[0].reset and not any(b.reset for b in batches[1:])
    for a, b in zip(batches, batches[1:], strict=False):
        assert torch.equal(b.x[:, 0], a.x[:, -1] + 1)  # window k+1 starts where k stopped
    for b in batches:
        assert torch.equal(b.y, b.x + 1)
    # Row r is stream r: it starts at r * stream_len.
    assert batches[0].x[:, 0].tolist() == [0, 250, 500, 750]


def test_too_short_text_is_a_clear_error():
    with pytest.raises(RnnkitError, match="seq-len"):
        RandomWindows(np.arange(5, dtype=np.uint8), seq_len=10, batch_size=2)
    with pytest.raises(RnnkitError, match="batch-size"):
        SequentialStreams(np.arange(50, dtype=np.uint8), seq_len=10, batch_size=8)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_carried_state_equals_one_pass_over_the_long_sequence(cell):
    torch.manual_seed(0)
    model = LanguageModel(config=ModelConfig(cell=cell, hidden=16, layers=2), vocab_size=50).eval()
    data = ids(4 * 60 + 1)
    streams = SequentialStreams(data, seq_len=12, batch_size=4)
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for batch in streams.epoch():
            state = None if batch.reset else detach_state(state)
            logits, state = model(batch.x, state)
            total += F.cross_entropy(logits.reshape(-1, 50), batch.y.reshape(-1), reduction="sum").item()
            count += batch.y.numel()
        whole = torch.from_numpy(data[: 4 * 60 + 1].astype(np.int64))
        rows = torch.stack([whole[r * 60 : (r + 1) * 60 + 1] for r in range(4)])
        logits, _ = model(rows[:, :-1])
        full = F.cross_entropy(logits.reshape(-1, 50), rows[:, 1:].reshape(-1)).item()
    assert count == 240
    assert total / count == pytest.approx(full, abs=1e-5)
