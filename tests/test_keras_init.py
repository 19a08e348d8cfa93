"""--init keras: the language model starts from Keras's defaults too, on either backend."""

import pytest
import torch

from rnnkit.config import ModelConfig
from rnnkit.models.language_model import LanguageModel


@pytest.mark.parametrize("backend", ["fused", "scratch"])
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_language_model_keras_init(backend, input_kind):
    torch.manual_seed(0)
    hidden = 24
    model = LanguageModel(config=ModelConfig(cell="lstm", hidden=hidden, layers=2, input=input_kind,
                                             backend=backend, init="keras"), vocab_size=30)
    if input_kind == "embedding":
        assert model.embedding.weight.abs().max() <= 0.05
    assert torch.equal(model.head.bias, torch.zeros(30))
    assert model.head.weight.abs().max() <= (6 / (hidden + 30)) ** 0.5
    for k in range(2):
        w_ih, w_hh, b_ih, b_hh = model.recurrent.layer_weights(k)
        assert torch.allclose(w_hh.T @ w_hh, torch.eye(hidden), atol=1e-5)
        assert torch.equal(b_ih[hidden:2 * hidden], torch.ones(hidden))  # the forget gate's bias
        assert b_ih.sum() == hidden and torch.equal(b_hh, torch.zeros_like(b_hh))
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 30) and torch.isfinite(logits).all()


def test_keras_init_differs_from_the_default():
    torch.manual_seed(0)
    keras = LanguageModel(config=ModelConfig(hidden=8, layers=1, init="keras"), vocab_size=10)
    torch.manual_seed(0)
    default = LanguageModel(config=ModelConfig(hidden=8, layers=1), vocab_size=10)
    assert default.embedding.weight.abs().max() > 0.05  # PyTorch's N(0, 1)
    assert not torch.equal(keras.recurrent.layer_weights(0)[1], default.recurrent.layer_weights(0)[1])
