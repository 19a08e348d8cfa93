import pytest
import torch

from rnnkit.config import ModelConfig
from rnnkit.generation import Stream, filter_logits, generate_ids, sample_next
from rnnkit.models.language_model import LanguageModel

CELLS = ["lstm", "gru", "rnn", "mingru", "minlstm"]


def make(cell="lstm", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(cell=cell, hidden=kw.pop("hidden", 24), layers=kw.pop("layers", 2), **kw)
    return LanguageModel(config=cfg, vocab_size=30).eval()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
def test_forward_contract(cell, input_kind):
    model = make(cell, input=input_kind)
    ids = torch.randint(0, 30, (3, 7))
    logits, state = model(ids)
    assert logits.shape == (3, 7, 30)
    assert isinstance(state, tuple) and len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 24) for s in state)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_single_step_path_matches_the_fused_module(cell, nonlinearity):
    """Generation steps with hand-written cells; they must agree with the fused kernel."""
    model = make(cell, nonlinearity=nonlinearity)
    ids = torch.randint(0, 30, (4, 9))
    with torch.no_grad():
        full, full_state = model(ids)  # fused module over the whole sequence
    with torch.inference_mode():
        step = model.stepper()
        state, steps = None, []
        for t in range(ids.shape[1]):
            logits, state = step(ids[:, t], state)  # one step at a time: (B,) -> (B, V)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-5)
    for a, b in zip(state, full_state, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_weight_tying_shares_one_matrix():
    model = make(tie_weights=True)
    assert model.head.weight is model.embedding.weight
    untied = make()
    assert model.num_parameters() == untied.num_parameters() - 30 * 24


@pytest.mark.parametrize("cell", CELLS)
def test_stateful_generation_equals_rerunning_the_full_prefix(cell):
    """The distribution after each carried-state step equals a fresh pass over prime + output so far."""
    model = make(cell)
    prime = [1, 5, 7, 2]
    new = generate_ids(model, prime, length=12, temperature=0)[0]
    seq = prime + new
    with torch.no_grad():
        for k in range(len(prime), len(seq)):
            logits, _ = model(torch.tensor([seq[:k]]))
            assert logits[0, -1].argmax().item() == seq[k]
    # And the probabilities themselves, not only the argmax:
    with torch.inference_mode():
        _, state = model(torch.tensor([seq[:-1]]))
        stepped, _ = model.step(torch.tensor([seq[-1]]), state)  # (1, V)
        full, _ = model(torch.tensor([seq]))
    assert torch.allclose(torch.softmax(stepped[0], -1), torch.softmax(full[0, -1], -1), atol=1e-6)


def test_generation_is_deterministic_for_a_seed():
    model = make()
    a = generate_ids(model, [3], length=40, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = generate_ids(model, [3], length=40, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = generate_ids(model, [3], length=40, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(5, 30) * 10
    assert torch.equal(sample_next(logits, temperature=1e-40), logits.argmax(-1))


@pytest.mark.parametrize("window", [0, 3])
def test_a_stream_fed_in_parts_continues_like_one_prime(window):
    """Feeding, sampling and feeding again equals generating from the whole text as one prime."""
    model = make()
    stream = Stream(model, window=window)
    stream.feed([1, 5])
    stream.feed([7, 2, 9])
    first = torch.cat(list(stream.sample(length=6, temperature=0))).tolist()
    assert first == generate_ids(model, [1, 5, 7, 2, 9], length=6, temperature=0, window=window)[0]
    stream.feed([4])
    gen = torch.Generator().manual_seed(3)
    more = torch.cat(list(stream.sample(length=8, temperature=1.0, generator=gen))).tolist()
    history = [1, 5, 7, 2, 9, *first, 4]
    assert stream.tokens == len(history) + 8
    assert more == generate_ids(model, history, length=8, temperature=1.0, window=window,
                                generator=torch.Generator().manual_seed(3))[0]


def test_a_stream_must_read_before_it_samples():
    from rnnkit.errors import RnnkitError

    with pytest.raises(RnnkitError, match="read nothing"):
        next(Stream(make()).sample(length=1))


def test_batched_samples_differ_but_share_the_prime():
    model = make()
    out = generate_ids(model, [3, 4], length=30, temperature=1.5, num_samples=4,
                       generator=torch.Generator().manual_seed(0))
    assert len(out) == 4 and all(len(s) == 30 for s in out)
    assert len({tuple(s) for s in out}) > 1


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, top_p=0.7)  # 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7: keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    tiny = filter_logits(logits, top_p=0.01)  # the top token always survives
    assert torch.isfinite(tiny[0, 0]) and torch.isinf(tiny[0, 1:]).all()
    gen = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1, top_k=2, generator=gen).item() for _ in range(200)}
    assert draws == {0, 1}


def test_windowed_generation_rereads_the_last_n_tokens_from_a_zero_state():
    """Many-to-one models generate as they were trained: each step sees only the last N tokens."""
    model = make()
    prime, n = [1, 5, 7, 2, 9], 3
    new = generate_ids(model, prime, length=10, temperature=0, window=n)[0]
    seq = prime + new
    with torch.no_grad():
        for k in range(len(prime), len(seq)):
            logits, _ = model(torch.tensor([seq[k - n : k]]))
            assert logits[0, -1].argmax().item() == seq[k]


def test_single_step_sees_weights_changed_after_an_earlier_step():
    """The bound step caches fused weights; binding again after an optimizer update or a load follows them."""
    model = make("lstm")
    ids = torch.randint(0, 30, (2, 1))
    with torch.inference_mode():
        old_step = model.stepper()  # builds the cache
        before, _ = old_step(ids[:, 0], None)
    with torch.no_grad():
        model.recurrent.rnn.weight_hh_l0.add_(0.5)  # in place, as optimizer.step does
    with torch.inference_mode():
        stepped, _ = model.stepper()(ids[:, 0], None)  # bound again
        kept, _ = old_step(ids[:, 0], None)
    with torch.no_grad():
        full, _ = model(torch.cat([ids, ids], dim=1))  # the fused kernel, T > 1
    assert torch.allclose(stepped, full[:, 0], atol=1e-5)
    # The earlier binding is a copy: it keeps computing with the weights it was bound to.
    assert torch.equal(kept, before)


@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru", "mingru", "minlstm"])
@pytest.mark.parametrize("inp", ["embedding", "onehot"])
def test_one_token_step_from_the_input_table_matches_the_full_forward(cell, inp):
    torch.manual_seed(0)
    model = LanguageModel(config=ModelConfig(cell=cell, input=inp, hidden=16, layers=2), vocab_size=12).eval()
    ids = torch.randint(0, 12, (3, 9))
    with torch.no_grad():
        full, full_state = model(ids)
        _, state = model(ids[:, :-1])
        step, step_state = model.step(ids[:, -1], state)  # the one-token path: (B,) -> (B, V)
    assert model.step_uses_table == (cell != "gru")
    assert (model.stepper().table is not None) == (cell != "gru")
    torch.testing.assert_close(step, full[:, -1], rtol=1e-5, atol=1e-6)
    for a, b in zip(step_state, full_state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Training in between changes the weights: the table follows.
    with torch.no_grad():
        model.recurrent.layer_weights(0)[0].add_(0.1)
        full, _ = model(ids)
        step, _ = model.step(ids[:, -1], model(ids[:, :-1])[1])  # binds again
    torch.testing.assert_close(step, full[:, -1], rtol=1e-5, atol=1e-6)


def test_no_input_table_when_it_would_outweigh_the_input_weights():
    model = LanguageModel(config=ModelConfig(hidden=16, embedding_dim=8, layers=1), vocab_size=500)
    assert not model.step_uses_table
    assert model.stepper().table is None


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_the_softmax_distribution(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    rows = 40_000
    draws = sample_next(logits.expand(rows, -1), temperature=temperature, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=5).double() / rows
    expected = torch.softmax(logits / temperature, dim=-1).double()
    assert counts[4] == 0  # a token of probability 0 is never drawn
    torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


# ---------------------------------------------------------------- the declared one-token step


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("backend", ["fused", "scratch"])
@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_bound_step_equals_forward_one_token_at_a_time(cell, layers, input_kind, backend, table):
    model = make(cell, layers=layers, input=input_kind, backend=backend, hidden=16)
    model.step_uses_table = table  # both paths on every model, whatever the construction chose
    if table and cell == "gru":
        with pytest.raises(ValueError, match="projected"):  # the GRU has no table path
            model.stepper()
        return
    ids = torch.randint(0, 30, (3, 7))
    with torch.inference_mode():
        step = model.stepper()
        assert (step.table is not None) == table
        stepped, step_state = [], None
        windowed, window_state = [], None
        for t in range(ids.shape[1]):
            logits, step_state = step(ids[:, t], step_state)  # (B,) -> (B, V)
            stepped.append(logits)
            logits, window_state = model(ids[:, t : t + 1], window_state)  # (B, 1) -> (B, 1, V)
            windowed.append(logits[:, 0])
        whole, whole_state = model(ids)
    torch.testing.assert_close(torch.stack(stepped, dim=1), torch.stack(windowed, dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack(stepped, dim=1), whole, rtol=0, atol=1e-5)
    assert len(step_state) == len(whole_state) == (2 if cell == "lstm" else 1)
    for a, b, c in zip(step_state, window_state, whole_state, strict=True):
        assert a.shape == (layers, 3, 16)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "scratch"])
def test_forward_runs_the_window_path_for_one_token_too(backend):
    """No hidden branch: a length-1 window in inference mode still runs the backend's module."""
    model = make("lstm", backend=backend)
    calls = []
    model.recurrent.rnn.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    ids = torch.randint(0, 30, (2, 1))
    with torch.inference_mode():
        logits, state = model(ids, model.initial_state(2))
        model.step(ids[:, 0], state)  # the step never calls the module
    assert calls == [(2, 1, 24)] and logits.shape == (2, 1, 30)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_step_equals_its_forward_at_length_one(cell):
    model = make(cell)
    x = torch.randn(3, 24)  # (B, E): the recurrent stack's input
    state = tuple(torch.randn(2, 3, 24) for _ in range(model.recurrent.state_size))
    with torch.inference_mode():
        h, new_state = model.recurrent.step(x, state)  # (B, H)
        out, window_state = model.recurrent(x.unsqueeze(1), state)  # (B, 1, H)
    torch.testing.assert_close(h, out[:, 0], rtol=0, atol=1e-5)
    for a, b in zip(new_state, window_state, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_a_fed_token_and_a_sampled_token_advance_a_stream_alike():
    """Stream reads a single token with the same step that sampling runs: the numbers agree exactly."""
    model = make("lstm")
    sampled, fed = Stream(model), Stream(model)
    sampled.feed([1, 5, 7])
    fed.feed([1, 5, 7])
    (token,) = sampled.sample(length=1, temperature=0)
    fed.feed(token.tolist())
    assert sampled.tokens == fed.tokens == 4
    assert torch.equal(sampled.logits, fed.logits)
    assert all(torch.equal(a, b) for a, b in zip(sampled.state, fed.state, strict=True))


def test_a_stream_binds_the_step_once_per_call_and_follows_new_weights(monkeypatch):
    model = make("lstm")
    binds = []
    stepper = model.stepper
    monkeypatch.setattr(model, "stepper", lambda: (binds.append(1), stepper())[1])
    stream = Stream(model)
    stream.feed([1, 5, 7])  # a run of tokens: forward, nothing bound
    assert binds == []
    first = torch.cat(list(stream.sample(length=3, temperature=0))).tolist()
    assert binds == [1]  # once per call, not per token
    stream.feed([4])  # a lone token: one step, bound for it
    assert binds == [1, 1]
    history = [1, 5, 7, *first, 4]
    old = make("lstm")  # the same seed: the weights before the change
    with torch.no_grad():
        _, state = model(torch.tensor([history]))  # what the stream holds, read under the old weights
        model.recurrent.rnn.weight_hh_l0.add_(0.5)  # in place, as optimizer.step does
    (token,) = stream.sample(length=1, temperature=0)  # the next call binds the new weights
    assert binds == [1, 1, 1]
    with torch.no_grad():
        expected, _ = model(token.view(1, 1), state)  # the last token under the new weights: (1, 1, V)
        old_weights, _ = old(token.view(1, 1), state)
    torch.testing.assert_close(stream.logits, expected[:, 0], rtol=0, atol=1e-5)
    assert (stream.logits - old_weights[:, 0]).abs().max() > 1e-3  # so the change did reach the stream
