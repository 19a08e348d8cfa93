"""The classifier network: padding never changes a prediction; heads and pooling."""

import pytest
import torch

from rnnkit.config import ModelConfig
from rnnkit.models.classifier import Classifier


def make(**kw):
    torch.manual_seed(0)
    num_classes = kw.pop("num_classes", 2)
    cfg = ModelConfig(hidden=kw.pop("hidden", 12), layers=kw.pop("layers", 2), embedding_dim=8, **kw)
    return Classifier(config=cfg, vocab_size=20, num_classes=num_classes).eval()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mingru", "minlstm"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_padding_does_not_change_the_probability(cell, bidirectional, pooling):
    model = make(cell=cell, bidirectional=bidirectional, pooling=pooling)
    text = torch.tensor([[3, 7, 1, 9, 4]])
    pad = model.pad_id
    padded = torch.tensor([[3, 7, 1, 9, 4, pad, pad, pad, pad]])
    batch = torch.tensor([[3, 7, 1, 9, 4, pad, pad], [5, 6, 7, 8, 9, 10, 11]])  # next to a longer text
    with torch.no_grad():
        alone = torch.softmax(model(text)[0], -1)
        assert torch.allclose(alone, torch.softmax(model(padded)[0], -1), atol=1e-6)
        assert torch.allclose(alone[0], torch.softmax(model(batch)[0], -1)[0], atol=1e-6)


def test_two_classes_use_a_sigmoid_head():
    model = make()
    assert model.head.out_features == 1
    with torch.no_grad():
        logits, state = model(torch.tensor([[1, 2, 3]]))
        z = model.head(model.encode(torch.tensor([[1, 2, 3]])))
    assert logits.shape == (1, 2) and state is None
    assert torch.allclose(torch.softmax(logits, -1)[0, 1], torch.sigmoid(z)[0, 0])


def test_more_classes_use_a_softmax_head():
    model = make(num_classes=5)
    assert model.head.out_features == 5
    assert model(torch.tensor([[1, 2]]))[0].shape == (1, 5)


def test_bidirectional_last_pooling_sees_both_ends():
    """The backward direction's summary depends on the first token, the forward one's on the last."""
    model = make(bidirectional=True, pooling="last", layers=1)
    with torch.no_grad():
        a = model.encode(torch.tensor([[1, 2, 3, 4]]))
        b = model.encode(torch.tensor([[9, 2, 3, 4]]))  # only the first token differs
    h = model.config.hidden
    assert not torch.allclose(a[:, h:], b[:, h:])  # backward half changed
