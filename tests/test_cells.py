"""The hand-written cells and the scratch backend against PyTorch's fused kernels.

Same parameters in, same numbers out: outputs, final states and gradients
agree to 1e-5 (float32) for every cell type, one to three layers, batch-first
input and a carried state; state_dicts, checkpoints and optimizer parameter
order are interchangeable between the backends. The fused-gate step that
generation runs (``FusedStep``) agrees with ``torch.nn.*Cell`` too, on every
path it has.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rnnkit.checkpoint import load_checkpoint, write_checkpoint
from rnnkit.config import ModelConfig, RunConfig
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.generation import generate_ids
from rnnkit.models.cells import CELL_MODULES, FusedStep, GRUCell, LSTMCell, RNNCell
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import Recurrent, ScratchStack

ATOL = 1e-5
# (cell, nonlinearity): every cell type, both activations of the vanilla RNN.
KINDS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
TORCH_CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


def pair(cell: str, nonlinearity: str = "tanh", *, layers: int = 2, input_size: int = 7, hidden: int = 12,
         dropout: float = 0.0) -> tuple[Recurrent, Recurrent]:
    """A fused and a scratch stack built from the same seed (hence the same weights)."""
    kw = dict(cell=cell, input_size=input_size, hidden=hidden, layers=layers, nonlinearity=nonlinearity,
              dropout=dropout)
    torch.manual_seed(0)
    fused = Recurrent(**kw, backend="fused")
    torch.manual_seed(0)
    scratch = Recurrent(**kw, backend="scratch")
    return fused, scratch


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- cells vs torch.nn.*Cell


@pytest.mark.parametrize("cell,nonlinearity", KINDS)
def test_cell_matches_torch_cell_with_copied_weights(cell, nonlinearity):
    kw = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    torch.manual_seed(1)
    theirs = TORCH_CELLS[cell](5, 9, **kw)
    ours = CELL_MODULES[cell](5, 9, **kw)
    ours.load_state_dict(theirs.state_dict())  # same names and shapes: loads as is
    x = torch.randn(3, 5, requires_grad=True)
    state = tuple(torch.randn(3, 9) for _ in range(2 if cell == "lstm" else 1))

    expected = theirs(x, state if cell == "lstm" else state[0])
    expected = expected if cell == "lstm" else (expected,)
    got = ours(x, state)
    assert max_diff(got, expected) <= 1e-6

    # Gradients too, through a random projection of the new state.
    weights = [torch.randn(s.shape) for s in got]
    sum((s * w).sum() for s, w in zip(expected, weights, strict=True)).backward()
    grads_theirs = [p.grad.clone() for p in theirs.parameters()] + [x.grad.clone()]
    x.grad = None
    sum((s * w).sum() for s, w in zip(got, weights, strict=True)).backward()
    grads_ours = [p.grad for p in ours.parameters()] + [x.grad]
    assert max_diff(grads_ours, grads_theirs) <= ATOL

    # ... and back: our weights drive torch's cell.
    theirs.load_state_dict(ours.state_dict())


def test_cells_start_from_a_zero_state_and_keep_torch_init_bounds():
    x = torch.randn(2, 4)
    h, c = LSTMCell(4, 6)(x)
    assert h.shape == c.shape == (2, 6)
    (h,) = GRUCell(4, 6)(x)
    assert h.shape == (2, 6)
    cell = RNNCell(4, 100, nonlinearity="relu")
    assert all(p.abs().max() <= 0.1 for p in cell.parameters())  # uniform(-1/sqrt(H), 1/sqrt(H))
    normal = LSTMCell(4, 100, init="normal")
    assert normal.bias_ih.abs().max() == 0 and 0.008 < normal.weight_hh.std() < 0.012
    with pytest.raises(ValueError, match="nonlinearity"):
        RNNCell(4, 6, nonlinearity="sigmoid")


# ---------------------------------------------------------------- the fused-gate step vs torch.nn.*Cell

# float32 to 1e-5 as everywhere; float64 shows the step is the same function, not a close one.
TOLERANCES = {torch.float32: 1e-5, torch.float64: 1e-12}


def torch_cell_stack(cell: str, nonlinearity: str, *, layers: int, input_size: int, hidden: int,
                     dtype: torch.dtype) -> list[nn.Module]:
    kw = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
    return [TORCH_CELLS[cell](input_size if k == 0 else hidden, hidden, **kw).to(dtype) for k in range(layers)]


def run_torch_cells(cells: list[nn.Module], x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
    """One time step through stacked torch cells; state as the stack's: tuple of (L, B, H)."""
    hs, cs = [], []
    for k, cell in enumerate(cells):
        if isinstance(cell, nn.LSTMCell):
            x, c = cell(x, (state[0][k], state[1][k]))
            cs.append(c)
        else:
            x = cell(x, state[0][k])
        hs.append(x)
    return x, ((torch.stack(hs), torch.stack(cs)) if cs else (torch.stack(hs),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlinearity", KINDS)
def test_fused_step_equals_torch_cells(cell, nonlinearity, layers, dtype):
    torch.manual_seed(3)
    cells = torch_cell_stack(cell, nonlinearity, layers=layers, input_size=5, hidden=9, dtype=dtype)
    weights = [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in cells]
    step = FusedStep(cell, weights, nonlinearity=nonlinearity)
    assert step.num_layers == layers and step.hidden == 9
    x = torch.randn(3, 5, dtype=dtype)
    state = tuple(torch.randn(layers, 3, 9, dtype=dtype) for _ in range(2 if cell == "lstm" else 1))
    with torch.no_grad():
        expected, expected_state = run_torch_cells(cells, x, state)
        got, got_state = step(x, state)
        # A zero state is what None means.
        zeros = tuple(torch.zeros_like(s) for s in state)
        from_none = step(x, None)
        from_zeros = run_torch_cells(cells, x, zeros)
    tol = TOLERANCES[dtype]
    assert got.dtype == dtype and got.shape == (3, 9)
    assert (got - expected).abs().max() <= tol
    assert max_diff(got_state, expected_state) <= tol
    assert (from_none[0] - from_zeros[0]).abs().max() <= tol and max_diff(from_none[1], from_zeros[1]) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell,nonlinearity", [k for k in KINDS if k[0] != "gru"])
def test_fused_step_from_a_projected_input_equals_torch_cells(cell, nonlinearity, dtype):
    """``projected``: layer 0 gets W_ih x + b_ih + b_hh instead of x, as from a language model's table."""
    torch.manual_seed(4)
    cells = torch_cell_stack(cell, nonlinearity, layers=2, input_size=6, hidden=8, dtype=dtype)
    weights = [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in cells]
    step = FusedStep(cell, weights, nonlinearity=nonlinearity, projected=True)
    x = torch.randn(4, 6, dtype=dtype)
    state = tuple(torch.randn(2, 4, 8, dtype=dtype) for _ in range(2 if cell == "lstm" else 1))
    with torch.no_grad():
        projected = torch.nn.functional.linear(x, cells[0].weight_ih, cells[0].bias_ih + cells[0].bias_hh)
        got, got_state = step(projected, state)  # (4, G*H) in
        expected, expected_state = run_torch_cells(cells, x, state)
    tol = TOLERANCES[dtype]
    assert (got - expected).abs().max() <= tol
    assert max_diff(got_state, expected_state) <= tol


def test_fused_step_binds_a_copy_of_the_weights():
    """Binding lays the weights out once; an in-place change reaches a step bound after it, not before."""
    torch.manual_seed(5)
    cells = torch_cell_stack("lstm", "tanh", layers=1, input_size=4, hidden=6, dtype=torch.float32)
    weights = [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in cells]
    x, state = torch.randn(2, 4), (torch.randn(1, 2, 6), torch.randn(1, 2, 6))
    with torch.no_grad():
        old = FusedStep("lstm", weights)
        before = old(x, state)[0]
        cells[0].weight_hh.mul_(2.0)  # as optimizer.step or load_state_dict would, in place
        new = FusedStep("lstm", weights)
        expected = run_torch_cells(cells, x, state)[0]
        assert torch.equal(old(x, state)[0], before)
        assert (new(x, state)[0] - expected).abs().max() <= ATOL
        assert (before - expected).abs().max() > 1e-3


def test_fused_step_rejects_what_it_cannot_compute():
    cells = torch_cell_stack("gru", "tanh", layers=1, input_size=4, hidden=6, dtype=torch.float32)
    weights = [(c.weight_ih, c.weight_hh, c.bias_ih, c.bias_hh) for c in cells]
    with pytest.raises(ValueError, match="projected"):  # r gates W_hn h + b_hn alone: no summed product
        FusedStep("gru", weights, projected=True)
    with pytest.raises(ValueError, match="unknown cell"):
        FusedStep("mingru", weights)
    with pytest.raises(ValueError, match="nonlinearity"):
        FusedStep("rnn", weights, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="at least one layer"):
        FusedStep("lstm", [])


# ---------------------------------------------------------------- scratch stack vs fused module


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell,nonlinearity", KINDS)
def test_scratch_equals_fused_outputs_states_and_gradients(cell, nonlinearity, layers):
    fused, scratch = pair(cell, nonlinearity, layers=layers)
    # The same seed gives the same weights: the scratch stack draws its default init in fused order.
    for (name_a, a), (name_b, b) in zip(fused.state_dict().items(), scratch.state_dict().items(), strict=True):
        assert name_a == name_b and torch.equal(a, b)

    x = torch.randn(4, 9, 7)  # batch-first (B, T, I)
    carried = tuple(torch.randn(layers, 4, 12) * 0.5 for _ in range(fused.state_size))
    results = []
    for model in (fused, scratch):
        xi = x.clone().requires_grad_()
        state = tuple(s.clone().requires_grad_() for s in carried)
        out, final = model(xi, state)
        assert out.shape == (4, 9, 12) and all(s.shape == (layers, 4, 12) for s in final)
        # A loss that touches every output and every final state, with O(1) gradients.
        # (randn(shape), not randn_like: the fused output is a strided view, and *_like keeps strides.)
        torch.manual_seed(2)
        loss = (out * torch.randn(out.shape)).sum() + sum((s * torch.randn(s.shape)).sum() for s in final)
        loss.backward()
        grads = [p.grad for p in model.parameters()] + [xi.grad] + [s.grad for s in state]
        results.append((out.detach(), [s.detach() for s in final], grads))

    (out_f, final_f, grads_f), (out_s, final_s, grads_s) = results
    assert (out_f - out_s).abs().max() <= ATOL
    assert max_diff(final_f, final_s) <= ATOL
    assert max_diff(grads_f, grads_s) <= ATOL


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_scratch_carries_state_across_calls_like_fused(cell):
    """Two windows with the state carried equal one pass over both, on either backend."""
    fused, scratch = pair(cell, layers=2)
    x = torch.randn(3, 10, 7)
    with torch.no_grad():
        whole, whole_state = fused(x)
        for model in (fused, scratch):
            first, state = model(x[:, :6])
            second, state = model(x[:, 6:], state)
            assert (torch.cat([first, second], dim=1) - whole).abs().max() <= ATOL
            assert max_diff(state, whole_state) <= ATOL


def test_scratch_has_the_fused_parameter_names_shapes_and_order():
    fused, scratch = pair("lstm", layers=3)
    names = [(n, tuple(p.shape)) for n, p in fused.named_parameters()]
    assert names == [(n, tuple(p.shape)) for n, p in scratch.named_parameters()]
    assert names[:4] == [("rnn.weight_ih_l0", (48, 7)), ("rnn.weight_hh_l0", (48, 12)),
                         ("rnn.bias_ih_l0", (48,)), ("rnn.bias_hh_l0", (48,))]
    # Same order: an optimizer's state dict (keyed by position) moves between backends too.
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_s = torch.optim.SGD(scratch.parameters(), lr=0.1, momentum=0.9)
    fused(torch.randn(2, 3, 7))[0].sum().backward()
    opt_f.step()
    opt_s.load_state_dict(opt_f.state_dict())
    assert torch.equal(opt_s.state[scratch.rnn.weight_hh_l1]["momentum_buffer"], fused.rnn.weight_hh_l1.grad)
    assert isinstance(scratch.rnn, ScratchStack)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_weight_transfer_round_trip(cell):
    """fused -> scratch -> fused via state_dict, with other weights than the seed's."""
    fused, scratch = pair(cell, layers=2)
    torch.manual_seed(5)
    other = Recurrent(cell=cell, input_size=7, hidden=12, layers=2)  # different numbers
    scratch.load_state_dict(other.state_dict())
    fused.load_state_dict(scratch.state_dict())
    for key, value in other.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value)
    x = torch.randn(2, 5, 7)
    with torch.no_grad():
        assert (scratch(x)[0] - other(x)[0]).abs().max() <= ATOL


def test_dropout_between_layers_in_training_only():
    _, scratch = pair("lstm", layers=2, dropout=0.5)
    x = torch.randn(4, 6, 7)
    scratch.eval()
    with torch.no_grad():
        ref = scratch(x)[0]
        scratch.train()
        torch.manual_seed(0)
        a = scratch(x)[0]
        torch.manual_seed(0)
        b = scratch(x)[0]
    assert not torch.allclose(a, ref)  # dropped units change the top layer
    assert torch.equal(a, b)  # ... reproducibly for a seed
    _, single = pair("lstm", layers=1, dropout=0.5)
    with torch.no_grad():
        trained = single.train()(x)[0]
        assert torch.equal(trained, single.eval()(x)[0])  # one layer: nothing between layers


# ---------------------------------------------------------------- language model level


def lm(backend: str, **kw) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(cell=kw.pop("cell", "lstm"), hidden=kw.pop("hidden", 16), layers=kw.pop("layers", 2),
                         backend=backend, **kw)
    return LanguageModel(config=config, vocab_size=11).eval()


@pytest.mark.parametrize("backend", ["fused", "scratch"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_onehot_equals_an_identity_embedding(backend, cell):
    onehot = lm(backend, cell=cell, input="onehot")
    embedded = lm(backend, cell=cell, input="embedding", embedding_dim=11)
    state = onehot.state_dict()
    state["embedding.weight"] = torch.eye(11)
    embedded.load_state_dict(state)
    ids = torch.randint(0, 11, (3, 8))
    with torch.no_grad():
        a, sa = onehot(ids)
        b, sb = embedded(ids)
    assert (a - b).abs().max() <= 1e-6 and max_diff(sa, sb) <= 1e-6


def test_lm_backends_agree_and_generation_steps_match_the_full_pass():
    fused, scratch = lm("fused", input="onehot"), lm("scratch", input="onehot")
    ids = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        assert (fused(ids)[0] - scratch(ids)[0]).abs().max() <= ATOL
    # Generation primes once, then steps one token at a time on the weights.
    prime = [1, 4, 2]
    new = generate_ids(scratch, prime, length=10, temperature=0)[0]
    assert new == generate_ids(fused, prime, length=10, temperature=0)[0]
    with torch.no_grad():
        full = scratch(torch.tensor([prime + new]))[0]
    assert full[0, len(prime) - 1 : -1].argmax(-1).tolist() == new


def test_normal_init_for_recurrent_and_head_weights():
    model = lm("scratch", cell="rnn", hidden=200, layers=1, input="onehot", init="normal")
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".bias_" in name:
            assert p.abs().max() == 0, name
        else:
            assert 0.008 < p.std().item() < 0.012, name
    default = lm("fused", cell="rnn", hidden=200, layers=1, input="onehot")
    assert default.recurrent.rnn.bias_ih_l0.abs().max() > 0


# ---------------------------------------------------------------- checkpoints


def save(tmp_path, model: LanguageModel, backend: str):
    config = RunConfig()
    config.model = model.config
    config.model.backend = backend
    tok = CharTokenizer(chars=list("abcdefghijk"))
    return write_checkpoint(tmp_path / f"ckpt-{backend}", model=model, tokenizer=tok, task="language_model",
                            run_config=config, state={})


def test_scratch_checkpoint_round_trip(tmp_path):
    model = lm("scratch")
    path = save(tmp_path, model, "scratch")
    loaded = load_checkpoint(path)
    assert loaded.model.recurrent.backend == "scratch"
    assert json.loads((path / "config.json").read_text())["model"]["backend"] == "scratch"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_fused_checkpoint_loads_into_scratch_by_changing_only_the_config(tmp_path):
    model = lm("fused", cell="gru")
    path = save(tmp_path, model, "fused")
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["backend"] = meta["run"]["model"]["backend"] = "scratch"
    (path / "config.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(path)
    assert loaded.model.recurrent.backend == "scratch"
    ids = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        assert (loaded.model(ids)[0] - model(ids)[0]).abs().max() <= ATOL


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        Recurrent(cell="lstm", input_size=3, hidden=4, backend="cuda")
    with pytest.raises(RnnkitError, match="backend"):
        RunConfig.from_dict({"model": {"backend": "magic"}})
