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


def test_dropout_at_input_leaves_the_pooled_state_to_the_head_untouched():
    """Keras's SimpleRNNCell(dropout=...) drops each cell's input only; input+head also drops before the head."""
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    for placement, head_sees_encode in (("input", True), ("input+head", False)):
        model = make(dropout=0.5, dropout_at=placement).train()
        torch.manual_seed(1)
        logits, _ = model(ids)
        torch.manual_seed(1)
        z = model.head(model.encode(ids))  # the same input masks, and nothing after them
        assert torch.equal(logits[:, 1:], z) is head_sees_encode, placement


def test_dropout_placement_does_not_matter_in_eval_mode():
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = make(dropout=0.5, dropout_at="input")(ids)[0]
        b = make(dropout=0.5, dropout_at="input+head")(ids)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("mask, same_every_step", [("sequence", True), ("element", False)])
def test_a_sequence_mask_drops_the_same_features_at_every_time_step(mask, same_every_step):
    model = make(dropout=0.5, dropout_mask=mask).train()
    torch.manual_seed(0)
    x = torch.ones(3, 50, 8)  # (B, T, D)
    dropped = model._drop_input(x) == 0  # (B, T, D)
    assert dropped.any() and not dropped.all()
    assert bool((dropped == dropped[:, :1]).all()) is same_every_step
    kept = model._drop_input(x)
    assert set(kept.unique().tolist()) <= {0.0, 2.0}  # inverted dropout: kept values scaled by 1 / (1 - p)
    assert torch.equal(model.eval()._drop_input(x), x)


def test_the_default_dropout_settings_compute_what_a_config_without_them_computed():
    """Defaults reproduce the classifier as it was (checkpoints without the keys load into it)."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    plain = make(dropout=0.3).train()
    explicit = make(dropout=0.3, dropout_at="input+head", dropout_mask="element").train()
    torch.manual_seed(3)
    a = plain(ids)[0]
    torch.manual_seed(3)
    assert torch.equal(a, explicit(ids)[0])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_keras_init_starts_from_keras_defaults(cell):
    model = make(cell=cell, init="keras", hidden=16)
    emb = model.embedding.weight
    assert emb[: model.pad_id].abs().max() <= 0.05 and emb[: model.pad_id].std() > 0.02
    assert torch.equal(emb[model.pad_id], torch.zeros_like(emb[model.pad_id]))
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))
    for layer in model.forward_layers:
        w_ih, w_hh, b_ih, b_hh = layer.layer_weights(0)
        gates, fan_in = w_ih.shape
        assert w_ih.abs().max() <= (6 / (fan_in + gates)) ** 0.5  # Glorot uniform's bound
        assert torch.allclose(w_hh.T @ w_hh, torch.eye(16), atol=1e-5)  # orthonormal columns
        forget = torch.zeros_like(b_ih)
        if cell == "lstm":
            forget[16:32] = 1.0  # unit_forget_bias: gate order i, f, g, o
        assert torch.equal(b_ih, forget) and torch.equal(b_hh, torch.zeros_like(b_hh))
