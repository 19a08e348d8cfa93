"""minGRU and minLSTM: the paper's equations, and three algorithms that compute one function.

The reference is the scratch backend's plain loop over ``mingru_cell`` /
``minlstm_cell``; the fused backend's sequential loop and log-space parallel
scan must agree with it in outputs, final states and gradients.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from rnnkit.config import ModelConfig, RunConfig
from rnnkit.models.cells import (
    COEFFICIENTS,
    LOG_COEFFICIENTS,
    MinStep,
    log_positive,
    mingru_cell,
    mingru_coefficients,
    mingru_coefficients_autograd,
    minlstm_cell,
    positive,
)
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import Recurrent, ScanStack, ScratchStack, detach_state
from rnnkit.models.scan import (
    choose_scan,
    mingru_scan_time_major,
    parallel_scan,
    sequential_scan,
    sequential_scan_autograd,
    sequential_scan_time_major,
)

MIN = ["mingru", "minlstm"]
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def g_by_definition(x: float) -> float:
    return x + 0.5 if x >= 0 else 1.0 / (1.0 + torch.exp(torch.tensor(-x, dtype=torch.float64)).item())


def test_positive_is_the_papers_g_and_log_positive_its_log():
    x = torch.tensor([-30.0, -3.0, -1e-3, 0.0, 1e-3, 0.7, 25.0], dtype=torch.float64, requires_grad=True)
    expected = torch.tensor([g_by_definition(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(positive(x), expected, rtol=1e-12, atol=0)
    assert (positive(x) > 0).all()
    torch.testing.assert_close(log_positive(x), torch.log(expected), rtol=1e-12, atol=1e-12)
    # Gradients of log g agree with those of log(g(x)) and are finite on both branches.
    (grad,) = torch.autograd.grad(log_positive(x).sum(), x)
    (direct,) = torch.autograd.grad(torch.log(positive(x)).sum(), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, direct, rtol=1e-10, atol=1e-12)


def test_cells_follow_the_papers_equations_written_out():
    torch.manual_seed(0)
    h = torch.randn(3, 4, dtype=torch.float64)
    gx = torch.randn(3, 12, dtype=torch.float64) * 2
    # minGRU: z = sigma(k_z), h~ = g(k_h), h' = (1 - z) h + z h~.
    k_z, k_h = gx[:, :4], gx[:, 4:8]
    z = 1 / (1 + torch.exp(-k_z))
    h_tilde = torch.where(k_h >= 0, k_h + 0.5, 1 / (1 + torch.exp(-k_h)))
    torch.testing.assert_close(mingru_cell(gx[:, :8], h), (1 - z) * h + z * h_tilde)
    # minLSTM: f, i sigmoids, normalised to f' + i' = 1; h' = f' h + i' h~.
    k_f, k_i, k_h = gx[:, :4], gx[:, 4:8], gx[:, 8:]
    f, i = 1 / (1 + torch.exp(-k_f)), 1 / (1 + torch.exp(-k_i))
    h_tilde = torch.where(k_h >= 0, k_h + 0.5, 1 / (1 + torch.exp(-k_h)))
    torch.testing.assert_close(minlstm_cell(gx, h), f / (f + i) * h + i / (f + i) * h_tilde)


@pytest.mark.parametrize("cell", MIN)
def test_log_coefficients_are_the_logs_of_the_coefficients(cell):
    torch.manual_seed(1)
    gx = torch.randn(2, 5, (2 if cell == "mingru" else 3) * 6, dtype=torch.float64) * 4
    a, b = COEFFICIENTS[cell](gx)
    log_a, log_b = LOG_COEFFICIENTS[cell](gx)
    assert ((a > 0) & (a < 1) & (b > 0)).all()
    torch.testing.assert_close(log_a, torch.log(a), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(log_b, torch.log(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_both_scans_compute_the_recurrence_from_any_initial_state(dtype):
    torch.manual_seed(2)
    a = torch.rand(3, 9, 4, dtype=dtype) * 0.98 + 0.01
    b = torch.rand(3, 9, 4, dtype=dtype) + 0.01
    for h0 in (torch.zeros(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype) * 3):  # zero, and of either sign
        expected, h = [], h0
        for t in range(9):
            h = a[:, t] * h + b[:, t]
            expected.append(h)
        expected = torch.stack(expected, 1)
        torch.testing.assert_close(sequential_scan(a, b, h0), expected, rtol=0, atol=TOL[dtype] / 10)
        torch.testing.assert_close(parallel_scan(a.log(), b.log(), h0), expected, rtol=0, atol=TOL[dtype])


def test_the_hand_written_backwards_pass_gradcheck_and_equal_autograds():
    torch.manual_seed(5)
    a = (torch.rand(2, 6, 3, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    b = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    before = (a.detach().clone(), b.detach().clone())
    assert torch.autograd.gradcheck(sequential_scan, (a, b, h0))
    torch.testing.assert_close((a.detach(), b.detach()), before, rtol=0, atol=0)  # the inputs are not written to
    gx = (torch.randn(2, 6, 8, dtype=torch.float64) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(mingru_coefficients, (gx,))
    # Through one loss, against autograd's own backward of the same loops; h0 without a gradient too.
    weights = torch.randn(2, 6, 3, dtype=torch.float64)
    for needs_h0 in (True, False):
        got = []
        for coefficients, scan in ((mingru_coefficients, sequential_scan),
                                   (mingru_coefficients_autograd, sequential_scan_autograd)):
            start = h0.detach().clone().requires_grad_(needs_h0)
            loss = (scan(*coefficients(gx[..., :6]), start) * weights).sum()
            inputs = [gx, start] if needs_h0 else [gx]
            got.append(torch.autograd.grad(loss, inputs))
        torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-12)


def _stacks(cell, layers, dtype):
    torch.manual_seed(3)
    reference = Recurrent(cell=cell, input_size=5, hidden=6, layers=layers, backend="scratch").to(dtype)
    fast = {}
    for scan in ("sequential", "parallel"):
        fast[scan] = Recurrent(cell=cell, input_size=5, hidden=6, layers=layers, scan=scan).to(dtype)
        fast[scan].load_state_dict(reference.state_dict())  # same names and shapes: loads as is
    return reference, fast


def _run(model, x, h0):
    x = x.clone().requires_grad_(True)
    h0 = h0.clone().requires_grad_(True)
    out, (h,) = model(x, (h0,))
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + (h ** 2).sum()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, [x, h0, *params])
    return out.detach(), h.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", MIN)
def test_parallel_and_sequential_equal_the_reference_loop(cell, layers, dtype):
    reference, fast = _stacks(cell, layers, dtype)
    assert isinstance(reference.rnn, ScratchStack) and not isinstance(reference.rnn, ScanStack)
    torch.manual_seed(4)
    x = torch.randn(3, 11, 5, dtype=dtype) * 2
    h0 = torch.randn(layers, 3, 6, dtype=dtype)  # a non-zero carried state, of either sign
    want_out, want_h, want_grads = _run(reference, x, h0)
    for scan, model in fast.items():
        assert model.rnn.scan == scan
        out, h, grads = _run(model, x, h0)
        tol = TOL[dtype]
        torch.testing.assert_close(out, want_out, rtol=0, atol=tol, msg=f"{scan}: outputs")
        torch.testing.assert_close(h, want_h, rtol=0, atol=tol, msg=f"{scan}: final state")
        torch.testing.assert_close(h[-1], out[:, -1], rtol=0, atol=0)  # the top layer's last output
        for name, got, want in zip(["x", "h0", *dict(model.named_parameters())], grads, want_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=tol, msg=f"{scan}: gradient of {name}")


@pytest.mark.parametrize("cell", MIN)
def test_a_window_split_in_two_with_the_state_carried_equals_the_whole(cell):
    _, fast = _stacks(cell, 2, torch.float64)
    x = torch.randn(2, 10, 5, dtype=torch.float64)
    for model in fast.values():
        with torch.no_grad():
            whole, whole_state = model(x)
            first, state = model(x[:, :4])
            second, state = model(x[:, 4:], detach_state(state))
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-12)
        torch.testing.assert_close(state[0], whole_state[0], rtol=0, atol=1e-12)


def test_parameters_have_clear_names_and_move_between_backends():
    scratch = Recurrent(cell="minlstm", input_size=5, hidden=6, layers=2, backend="scratch")
    fused = Recurrent(cell="minlstm", input_size=5, hidden=6, layers=2)
    names = [(n, tuple(p.shape)) for n, p in scratch.named_parameters()]
    assert names == [("rnn.weight_ih_l0", (18, 5)), ("rnn.bias_ih_l0", (18,)),
                     ("rnn.weight_ih_l1", (18, 6)), ("rnn.bias_ih_l1", (18,))]  # f, i, h~ stacked
    assert [(n, tuple(p.shape)) for n, p in fused.named_parameters()] == names
    torch.manual_seed(0)
    a = Recurrent(cell="mingru", input_size=5, hidden=6, layers=2, backend="scratch")
    torch.manual_seed(0)
    b = Recurrent(cell="mingru", input_size=5, hidden=6, layers=2)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):  # the same seed draws the same weights
        assert p.shape[0] == 12 and torch.equal(p, q)


def test_auto_chooses_by_device_as_measured():
    assert choose_scan("auto", torch.device("cpu")) == "sequential"
    assert choose_scan("auto", torch.device("cuda")) == "parallel"
    assert choose_scan("parallel", torch.device("cpu")) == "parallel"
    with pytest.raises(ValueError, match="unknown scan"):
        choose_scan("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown scan"):
        Recurrent(cell="mingru", input_size=3, hidden=4, scan="fast")


def test_the_step_is_one_layer_product_per_token_from_the_carried_state():
    """O(1) per token: the step reads the (L, B, H) state only, never the tokens before it."""
    torch.manual_seed(5)
    model = Recurrent(cell="mingru", input_size=4, hidden=5, layers=2).double()
    step = model.stepper()
    assert isinstance(step, MinStep) and len(step.cache) == 2
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    state = (torch.randn(2, 3, 5, dtype=torch.float64),)
    with torch.no_grad():
        out, _ = model(x, state)
        # Layer by layer by hand: h' = (1 - z) h + z g(k_h), from x_t and the carried h only.
        h0, h1 = state[0][0], state[0][1]
        for t in range(6):
            y, state = step(x[:, t], state)
            h0 = mingru_cell(F.linear(x[:, t], model.rnn.weight_ih_l0, model.rnn.bias_ih_l0), h0)
            h1 = mingru_cell(F.linear(h0, model.rnn.weight_ih_l1, model.rnn.bias_ih_l1), h1)
            torch.testing.assert_close(y, h1, rtol=0, atol=1e-12)
            torch.testing.assert_close(y, out[:, t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", MIN)
def test_language_model_trains_and_its_table_step_matches(cell):
    torch.manual_seed(6)
    model = LanguageModel(config=ModelConfig(cell=cell, hidden=8, layers=2, input="onehot", dropout=0.1),
                          vocab_size=7)
    assert model.step_uses_table  # layer 0's gates read the token only: a (V, G*H) row lookup
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ids = (torch.arange(13) * 3 + torch.arange(4).unsqueeze(1)) % 7  # (4, 13): a learnable cycle
    losses = []
    for _ in range(40):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 7), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6  # it learns
    model.eval()
    step = model.stepper()
    assert step.table is not None and step.table.shape == (7, (2 if cell == "mingru" else 3) * 8)
    with torch.no_grad():
        full, full_state = model(ids)
        state, rows = None, []
        for t in range(ids.shape[1]):
            logits, state = step(ids[:, t], state)
            rows.append(logits)
    torch.testing.assert_close(torch.stack(rows, 1), full, rtol=0, atol=1e-5)
    torch.testing.assert_close(state[0], full_state[0], rtol=0, atol=1e-5)


def test_an_old_config_without_scan_loads_with_auto():
    data = json.loads(json.dumps(RunConfig().to_dict()))  # as a checkpoint's config.json holds it
    del data["model"]["scan"]  # written before the knob existed
    data["model"]["cell"] = "mingru"
    config = RunConfig.from_dict(data)
    assert config.model.cell == "mingru" and config.model.scan == "auto"


def test_the_fused_mingru_layer_gradchecks_and_equals_its_two_parts():
    torch.manual_seed(8)
    gx = (torch.randn(6, 2, 8, dtype=torch.float64) * 2).requires_grad_(True)  # (T, B, 2H), time-major
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    before = gx.detach().clone()
    assert torch.autograd.gradcheck(mingru_scan_time_major, (gx, h0))
    torch.testing.assert_close(gx.detach(), before, rtol=0, atol=0)  # the input is not written to
    weights = torch.randn(6, 2, 4, dtype=torch.float64)
    for needs_h0 in (True, False):
        got = []
        for run in (mingru_scan_time_major,
                    lambda g, h: sequential_scan_time_major(*mingru_coefficients_autograd(g), h)):
            start = h0.detach().clone().requires_grad_(needs_h0)
            out = run(gx, start)
            loss = (out * weights).sum()
            got.append((out.detach(), *torch.autograd.grad(loss, [gx, start] if needs_h0 else [gx])))
        torch.testing.assert_close(got[0], got[1], rtol=0, atol=1e-12)
    # Time-major and batch-first scans are one function.
    a, b = (torch.rand(6, 2, 4, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(sequential_scan_time_major(a, b, h0.detach()),
                               sequential_scan(a.transpose(0, 1), b.transpose(0, 1), h0.detach()).transpose(0, 1),
                               rtol=0, atol=0)


@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
@pytest.mark.parametrize("cell", MIN)
def test_a_window_gathered_from_the_input_table_equals_the_layer_product(cell, input_kind):
    """Plain minGRU/minLSTM language models gather layer 0's input product per token when it is cheaper."""
    torch.manual_seed(9)
    model = LanguageModel(config=ModelConfig(cell=cell, hidden=8, layers=2, input=input_kind), vocab_size=5)
    model.double()
    ids = torch.randint(0, 5, (3, 7))  # 21 tokens >= twice the vocabulary: the table applies
    state = tuple(torch.randn(2, 3, 8, dtype=torch.float64) for _ in range(1))
    assert model.window_table(ids) is not None
    assert model.window_table(ids[:1, :9 // 2]) is None  # 4 tokens < 10: the product is cheaper

    def run(gathered: bool):
        model.zero_grad()
        if gathered:
            out, final = model.features(ids, state)
        else:  # the stack on the embedded window, as every other model runs
            out, final = model.recurrent(model.embed(ids), state)
        ((out * torch.linspace(-1, 1, 8, dtype=out.dtype)).sum() + final[0].pow(2).sum()).backward()
        return out.detach(), final[0].detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.grad is not None}

    out, final, grads = run(True)
    want_out, want_final, want_grads = run(False)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=0, atol=1e-12)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=1e-12, msg=name)


def test_the_input_table_is_skipped_where_it_would_change_the_function():
    ids = torch.randint(0, 5, (3, 7))
    dropped = LanguageModel(config=ModelConfig(cell="mingru", hidden=8, layers=1, dropout=0.2), vocab_size=5)
    assert dropped.window_table(ids) is None  # training: dropout falls between the embedding and layer 0
    dropped.eval()
    assert dropped.window_table(ids) is not None  # evaluation: no dropout, so the same function
    for config in (ModelConfig(cell="mingru", hidden=8, layers=1, block="residual"),  # a norm comes first
                   ModelConfig(cell="lstm", hidden=8, layers=1),
                   ModelConfig(cell="mingru", hidden=8, layers=1, backend="scratch")):
        assert LanguageModel(config=config, vocab_size=5).window_table(ids) is None


def test_the_cpu_gemm_choice_and_its_onednn_product(monkeypatch):
    from rnnkit.errors import RnnkitError
    from rnnkit.models import gemm

    torch.manual_seed(10)
    x = torch.randn(3, 40, 16, requires_grad=True)  # 120 rows: a product big enough to route
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    weights = torch.randn(3, 40, 24)

    def grads():
        out = gemm.linear(x, w, b)
        return (out.detach(), *torch.autograd.grad((out * weights).sum(), [x, w, b]))

    monkeypatch.setenv("RNNKIT_GEMM", "blas")
    assert gemm.cpu_gemm() == "blas"
    want = grads()
    reference = F.linear(x, w, b).detach()
    torch.testing.assert_close(want[0], reference, rtol=0, atol=0)  # blas: F.linear itself
    monkeypatch.setenv("RNNKIT_GEMM", "onednn")
    if not gemm._onednn_linear_available():
        assert gemm.cpu_gemm() == "blas"  # a build without oneDNN's operator falls back
    else:
        assert gemm.cpu_gemm() == "onednn"
        for got, expected in zip(grads(), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("RNNKIT_GEMM", "auto")
    assert gemm.cpu_gemm() == ("onednn" if gemm._cpu_vendor() == "AuthenticAMD"
                               and gemm._onednn_linear_available() else "blas")
    monkeypatch.setenv("RNNKIT_GEMM", "fastest")
    with pytest.raises(RnnkitError, match="RNNKIT_GEMM must be one of auto, onednn, blas"):
        gemm.cpu_gemm()


def test_a_bad_gemm_setting_is_a_one_line_error_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from rnnkit.cli import main

    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question\n" * 40, encoding="utf-8")
    monkeypatch.setenv("RNNKIT_GEMM", "fast")
    out = tmp_path / "run"
    assert main(["train", "--text", str(text), "--model", "mingru", "--hidden", "8", "--out", str(out),
                 "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["rnnkit: error: RNNKIT_GEMM must be one of auto, onednn, blas, got 'fast'"]
    assert not out.exists()
