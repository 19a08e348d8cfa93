"""One time step of each recurrent cell, written like the equations.

Four layers of the same arithmetic, from the inside out:

* ``rnn_cell`` / ``gru_cell`` / ``lstm_cell``: the recurrence proper. They
  take ``gx = W_ih x + b_ih``, the input's share of every gate, already
  computed, because a whole sequence's input projection is known in advance
  and is best done as one matrix product before the time loop (the scratch
  backend of :class:`~rnnkit.models.recurrent.Recurrent` does exactly that).
* ``rnn_step`` / ``gru_step`` / ``lstm_step``: a full step from the input
  ``x``, on raw weight tensors.
* :class:`FusedStep`: one token through a whole stack of layers, the step
  that generation runs. When it is bound (constructed) it lays the weights
  out for one-token arithmetic -- per layer ``[W_ih | W_hh]^T`` as one
  row-major (I + H, G*H) matrix and ``b_ih + b_hh`` -- so that each layer is
  one ``addmm`` and, for the LSTM, one sigmoid over all four gate blocks. On
  CPU a fused module called at length 1 pays a large fixed cost per call;
  this does not.
* :class:`RNNCell`, :class:`GRUCell`, :class:`LSTMCell`: modules holding
  explicit parameters, drop-in equivalents of ``torch.nn.RNNCell`` /
  ``GRUCell`` / ``LSTMCell`` (same parameter names, shapes and gate order, so
  ``load_state_dict`` works both ways).

The weights use PyTorch's fused layout: ``weight_ih`` is (G*H, I) and
``weight_hh`` (G*H, H) with the G gates stacked in PyTorch's order (LSTM
``i, f, g, o``; GRU ``r, z, n``; vanilla RNN a single block), so the same
functions run on the parameters of ``torch.nn.LSTM``/``GRU``/``RNN``
(``weight_ih_l{k}`` and so on) and on those of the scratch backend.

Shapes: ``x`` (B, I); ``gx`` (B, G*H); ``h`` and ``c`` (B, H).

minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?") have gates
and candidate that depend on the input only, so a layer has just
``weight_ih`` (G*H, I) and ``bias_ih`` (G*H,), stacked minGRU ``z, h~`` and
minLSTM ``f, i, h~``, and no ``weight_hh``. Their step is
``h' = a * h + b`` with ``(a, b)`` a function of ``gx`` alone
(:func:`mingru_coefficients`, :func:`minlstm_coefficients`), which is what
lets a whole window run as a scan (:mod:`rnnkit.models.scan`). The candidate
goes through the paper's positive ``g`` (:func:`positive`) in every
algorithm, so the log-space scan and the sequential loop are one function.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]

# Gate blocks stacked in the weight matrices, per cell type.
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "mingru": 2, "minlstm": 3}
# The cells whose gates read x_t only: no W_hh, one (h,) state, h' = a(x) * h + b(x).
MINIMAL = ("mingru", "minlstm")


# ---------------------------------------------------------------- the recurrence, given W_ih x + b_ih


def rnn_cell(
    gx: torch.Tensor,
    h: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
    *,
    nonlinearity: str = "tanh",
) -> torch.Tensor:
    """h' = act(W_ih x + b_ih + W_hh h + b_hh)."""
    pre = gx + F.linear(h, w_hh, b_hh)  # (B, H)
    return rnn_activation(pre, nonlinearity)


def rnn_activation(pre: torch.Tensor, nonlinearity: str) -> torch.Tensor:
    """act(pre), tanh or relu: the vanilla RNN's whole nonlinearity, shared with :class:`FusedStep`."""
    return torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)


def gru_cell(gx: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None) -> torch.Tensor:
    """h' = (1 - z) * n + z * h, with reset gate r, update gate z and candidate n."""
    x_r, x_z, x_n = gx.chunk(3, dim=-1)  # (B, H) each: W_i* x + b_i*
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)  # W_h* h + b_h*
    r = torch.sigmoid(x_r + h_r)  # reset gate: how much history the candidate sees
    z = torch.sigmoid(x_z + h_z)  # update gate: how much of the old state to keep
    n = torch.tanh(x_n + r * h_n)  # candidate state (r scales W_hn h + b_hn, as in torch)
    return (1 - z) * n + z * h


def lstm_cell(
    gx: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_hh: torch.Tensor,
    b_hh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """c' = f * c + i * g;  h' = o * tanh(c')."""
    gates = gx + F.linear(h, w_hh, b_hh)  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)
    i = torch.sigmoid(i)  # input gate: how much of the candidate to write
    f = torch.sigmoid(f)  # forget gate: how much of the old cell to keep
    g = torch.tanh(g)  # candidate cell content
    o = torch.sigmoid(o)  # output gate: how much of the cell to expose
    c = f * c + i * g
    h = o * torch.tanh(c)
    return h, c


# ---------------------------------------------------------------- minGRU and minLSTM, given W_ih x + b_ih


def positive(x: torch.Tensor) -> torch.Tensor:
    """g(x) = x + 1/2 for x >= 0, sigmoid(x) below: the paper's positive, continuous candidate map."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_positive(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed without forming g: log(x + 1/2) for x >= 0, -softplus(-x) below."""
    # The clamp keeps the unused branch's log finite (log(0.5) where x < 0), so no NaN reaches the
    # gradient; clamp passes the gradient at x = 0 itself, where torch.where takes this branch.
    return torch.where(x >= 0, torch.log(x.clamp(min=0) + 0.5), -F.softplus(-x))


def mingru_cell(gx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h' = (1 - z) * h + z * h~, with z and h~ from the input alone."""
    k_z, k_h = gx.chunk(2, dim=-1)  # (B, H) each: W_z x + b_z, W_h x + b_h
    z = torch.sigmoid(k_z)  # update gate: how much of the candidate to write
    h_tilde = positive(k_h)  # candidate state, > 0
    return (1 - z) * h + z * h_tilde


def minlstm_cell(gx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h' = f' * h + i' * h~, with the forget and input gates normalised to sum to one."""
    k_f, k_i, k_h = gx.chunk(3, dim=-1)  # (B, H) each: W_f x + b_f, W_i x + b_i, W_h x + b_h
    f = torch.sigmoid(k_f)  # forget gate: how much of the old state to keep
    i = torch.sigmoid(k_i)  # input gate: how much of the candidate to write
    h_tilde = positive(k_h)  # candidate state, > 0
    f_norm, i_norm = f / (f + i), i / (f + i)  # normalised: the state's scale does not grow with t
    return f_norm * h + i_norm * h_tilde


def mingru_coefficients(gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of :func:`mingru_cell` as ``h' = a * h + b``, for gx (..., 2H): a = 1 - z, b = z * g(k_h)."""
    return _MinGRUCoefficients.apply(gx)


def mingru_coefficients_autograd(gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same, left to autograd: the reference the hand-written backward is tested against."""
    k_z, k_h = gx.chunk(2, dim=-1)
    z = torch.sigmoid(k_z)
    return 1 - z, z * positive(k_h)


class _MinGRUCoefficients(torch.autograd.Function):
    """:func:`mingru_coefficients_autograd` with its backward written out, straight into one (..., 2H) gradient.

    With z = sigmoid(k_z) and g = g(k_h): dL/dk_z = (dL/db * g - dL/da) * z (1 - z) and
    dL/dk_h = dL/db * z * g'(k_h), g' = 1 for k_h >= 0 and g (1 - g) below (g is the sigmoid
    there). Autograd's version of the same spends a third of the elementwise time on the
    chunk's backward (a cat) and on both branches of ``torch.where``. The forward forms g as
    ``max(k_h + 1/2, sigmoid(k_h))``, the same function (x + 1/2 >= sigmoid(x) exactly when
    x >= 0: the sigmoid is below its tangent 1/2 + x/4 for x > 0 and above it for x < 0) in
    one pass fewer; g >= 1/2 exactly when k_h >= 0, so the backward reads the branch from g.
    """

    @staticmethod
    def forward(ctx, gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: D102
        k_z, k_h = gx.chunk(2, dim=-1)
        z = torch.sigmoid(k_z)
        g = torch.maximum(k_h + 0.5, torch.sigmoid(k_h))  # positive(k_h)
        a = 1 - z
        ctx.save_for_backward(z, a, g)
        return a, z * g

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:  # noqa: D102
        # Both gradients arrive as tensors: autograd materialises an unused output's as zeros.
        z, a, g = ctx.saved_tensors
        grad = torch.empty((*z.shape[:-1], 2 * z.shape[-1]), dtype=z.dtype, device=z.device)
        grad_kz, grad_kh = grad.chunk(2, dim=-1)
        torch.mul(grad_b, g, out=grad_kz).sub_(grad_a).mul_(z).mul_(a)
        slope = torch.where(g >= 0.5, 1.0, (1 - g).mul_(g))  # g'(k_h)
        torch.mul(grad_b, z, out=grad_kh).mul_(slope)
        return grad


def minlstm_coefficients(gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of :func:`minlstm_cell` as ``h' = a * h + b``, for gx (..., 3H): a = f', b = i' * g(k_h)."""
    k_f, k_i, k_h = gx.chunk(3, dim=-1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    return f / (f + i), i / (f + i) * positive(k_h)


def mingru_log_coefficients(gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a, log b) of :func:`mingru_coefficients`: log(1 - z) = -softplus(k_z), log z = -softplus(-k_z)."""
    k_z, k_h = gx.chunk(2, dim=-1)
    return -F.softplus(k_z), -F.softplus(-k_z) + log_positive(k_h)


def minlstm_log_coefficients(gx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a, log b) of :func:`minlstm_coefficients`.

    With d = log i - log f = softplus(-k_f) - softplus(-k_i): log f' = log(f / (f + i)) = -softplus(d)
    and log i' = -softplus(-d).
    """
    k_f, k_i, k_h = gx.chunk(3, dim=-1)
    d = F.softplus(-k_f) - F.softplus(-k_i)
    return -F.softplus(d), -F.softplus(-d) + log_positive(k_h)


MIN_CELLS = {"mingru": mingru_cell, "minlstm": minlstm_cell}
COEFFICIENTS = {"mingru": mingru_coefficients, "minlstm": minlstm_coefficients}
LOG_COEFFICIENTS = {"mingru": mingru_log_coefficients, "minlstm": minlstm_log_coefficients}


# ---------------------------------------------------------------- a whole step on raw weights


def rnn_step(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    *,
    nonlinearity: str = "tanh",
) -> torch.Tensor:
    return rnn_cell(F.linear(x, w_ih, b_ih), h, w_hh, b_hh, nonlinearity=nonlinearity)


def gru_step(
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> torch.Tensor:
    return gru_cell(F.linear(x, w_ih, b_ih), h, w_hh, b_hh)


def lstm_step(
    x: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return lstm_cell(F.linear(x, w_ih, b_ih), h, c, w_hh, b_hh)


# ---------------------------------------------------------------- the fused-gate step (generation)

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w_ih, w_hh, b_ih, b_hh) of a layer


def lstm_fused_gates(pre: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lstm_cell`'s gates from all four pre-activations at once: pre (B, 4H), c (B, H) -> (h', c').

    The same equations in the same i, f, g, o order, arranged for few kernel
    launches per token: one sigmoid over the whole (B, 4H) block (g's block
    of it goes unused), one tanh over g's block, and c' = f * c + i * g as one
    ``addcmul``. (Training keeps :func:`lstm_cell`'s form, whose numbers the
    recorded training fixtures pin.)
    """
    hidden = c.shape[-1]
    gates = torch.sigmoid(pre)  # (B, 4H)
    i, f, _, o = gates.chunk(4, dim=-1)  # input, forget, (unused), output gates
    g = torch.tanh(pre[:, 2 * hidden:3 * hidden])  # candidate cell content
    c = torch.addcmul(f * c, i, g)  # f * c + i * g
    h = o * torch.tanh(c)
    return h, c


def _stacked_transposes(*weights: torch.Tensor) -> torch.Tensor:
    """[W_1 | W_2 | ...]^T, row-major (sum of n_i, G*H), from weights (G*H, n_i).

    Transposing ``copy_`` calls into one buffer: the same numbers as
    ``torch.cat(weights, 1).t().contiguous()`` in a fraction of the time, which
    counts because a step is bound once per generated text.
    """
    out = weights[0].new_empty(sum(w.shape[1] for w in weights), weights[0].shape[0])
    row = 0
    for w in weights:
        out[row:row + w.shape[1]].copy_(w.t())
        row += w.shape[1]
    return out


class FusedStep:
    """``step(x, state) -> (h, state)``: one time step through a stack of layers, eval-mode arithmetic.

    x is (B, I) -- or, ``projected``, layer 0's input share already multiplied
    out, ``W_ih x + b_ih + b_hh`` (B, G*H), which a language model looks up in
    a per-token table; h is the top layer's output (B, H); the state is a
    tuple of (L, B, H) tensors (``(h, c)`` or ``(h,)``) and ``None`` means zeros.

    Binding (this constructor) builds the weight cache, once: per layer the
    transposed concatenation ``[W_ih | W_hh]^T`` (I + H, G*H), row-major, and
    the summed bias ``b_ih + b_hh`` (G*H,) -- for layer 0 of a projected step
    only ``W_hh^T`` (H, G*H) -- so that a layer is one ``addmm``
    (measured about twice as fast as two ``F.linear`` calls on the (G*H, I)
    and (G*H, H) weights). The cache is a copy: a later change to the weights
    (an optimizer step, a load) is seen by binding again, never implicitly.
    A bound step holds no mutable state, so threads may share one.

    The paths, all tested against ``torch.nn.*Cell``:

    * ``lstm``: ``addmm`` then :func:`lstm_fused_gates`.
    * ``rnn``: ``addmm`` then :func:`rnn_activation` (tanh or relu).
    * ``gru``: no cache and no projection. Its reset gate multiplies
      ``W_hn h + b_hn`` alone, so the input and hidden products cannot be
      summed; each layer runs :func:`gru_step` on the layer's own weight
      tensors (read in place).

    No dropout and no gradients to the weights: this is the inference step.
    """

    def __init__(self, cell: str, layers: list[Weights], *, nonlinearity: str = "tanh",
                 projected: bool = False) -> None:
        if cell not in GATES or cell in MINIMAL:
            raise ValueError(f"unknown cell {cell!r} (choose: lstm, gru, rnn; mingru/minlstm step with MinStep)")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r} (choose: tanh, relu)")
        if projected and cell == "gru":
            raise ValueError("a GRU step cannot start from a projected input: its reset gate scales W_hn h only")
        if not layers:
            raise ValueError("a step needs at least one layer")
        self.cell = cell
        self.nonlinearity = nonlinearity
        self.projected = projected
        self.num_layers = len(layers)
        self.hidden = layers[0][1].shape[1]  # w_hh is (G*H, H)
        self.gru_weights: list[Weights] = []  # gru: each layer's own tensors
        # lstm/rnn, per layer: ([W_ih | W_hh]^T (I + H, G*H), b_ih + b_hh (G*H,)); for layer 0 of a
        # projected step only W_hh^T (H, G*H), the input share and both biases arriving in x.
        self.cache: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if cell == "gru":
            self.gru_weights = [tuple(w.detach() for w in weights) for weights in layers]  # type: ignore[misc]
            return
        with torch.no_grad():
            for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(layers):
                if k == 0 and projected:
                    self.cache.append((_stacked_transposes(w_hh), None))
                else:
                    self.cache.append((_stacked_transposes(w_ih, w_hh), (b_ih + b_hh).contiguous()))

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        zeros = like.new_zeros(self.num_layers, batch_size, self.hidden)  # (L, B, H)
        return (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)

    def __call__(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0], x)
        if self.cell == "gru":
            hs = []
            for k, weights in enumerate(self.gru_weights):
                x = gru_step(x, state[0][k], *weights)  # (B, H)
                hs.append(x)
            return x, (torch.stack(hs),)
        lstm = self.cell == "lstm"
        hs, cs = [], []
        for k, (w_t, bias) in enumerate(self.cache):
            if bias is None:  # layer 0, projected: x already holds W_ih x + b_ih + b_hh
                pre = torch.addmm(x, state[0][0], w_t)  # (B, G*H)
            else:
                pre = torch.addmm(bias, torch.cat([x, state[0][k]], dim=1), w_t)  # W_ih x + W_hh h + b
            if lstm:
                x, c = lstm_fused_gates(pre, state[1][k])
                cs.append(c)
            else:
                x = rnn_activation(pre, self.nonlinearity)
            hs.append(x)  # no dropout between layers: this is the eval-mode step
        return x, ((torch.stack(hs), torch.stack(cs)) if lstm else (torch.stack(hs),))


class MinStep:
    """``step(x, state) -> (h, state)``: one time step of a minGRU/minLSTM stack, eval-mode arithmetic.

    The counterpart of :class:`FusedStep` for the cells whose gates read x_t
    only: per layer one ``addmm`` for ``W_ih x + b_ih`` (B, G*H), then
    :func:`mingru_cell` / :func:`minlstm_cell`. O(1) per token: the carried
    (L, B, H) state is all the history a step needs. x is (B, I) or, with
    ``projected``, layer 0's ``W_ih x + b_ih`` already (a language model's
    per-token table row). ``layers`` holds each layer's ``(w_ih, b_ih)``;
    binding keeps ``W_ih^T`` as a row-major (I, G*H) copy, so bind again after
    the weights change. No dropout, no gradients to the weights.
    """

    def __init__(self, cell: str, layers: list[tuple[torch.Tensor, torch.Tensor]], *, projected: bool = False) -> None:
        if cell not in MINIMAL:
            raise ValueError(f"MinStep steps mingru or minlstm, not {cell!r}")
        if not layers:
            raise ValueError("a step needs at least one layer")
        self.cell = cell
        self.projected = projected
        self.num_layers = len(layers)
        self.hidden = layers[0][0].shape[0] // GATES[cell]  # w_ih is (G*H, I)
        self.step_cell = MIN_CELLS[cell]
        with torch.no_grad():
            # Per layer (W_ih^T (I, G*H), b_ih (G*H,)); layer 0 of a projected step needs neither.
            self.cache = [(None, None) if k == 0 and projected else (w.t().contiguous(), b.detach().clone())
                          for k, (w, b) in enumerate(layers)]

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        return (like.new_zeros(self.num_layers, batch_size, self.hidden),)  # (L, B, H)

    def __call__(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0], x)
        hs = []
        for k, (w_t, bias) in enumerate(self.cache):
            gx = x if w_t is None else torch.addmm(bias, x, w_t)  # (B, G*H): W_ih x + b_ih
            x = self.step_cell(gx, state[0][k])  # (B, H)
            hs.append(x)  # no dropout between layers: this is the eval-mode step
        return x, (torch.stack(hs),)


# ---------------------------------------------------------------- initialisation


def init_recurrent_(params: list[tuple[str, nn.Parameter]], *, hidden: int, scheme: str) -> None:
    """Initialise recurrent weights in place.

    ``default`` is PyTorch's for ``nn.LSTM``/``GRU``/``RNN`` and their cells:
    every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)], drawn in
    parameter order (so a scratch stack seeded like a fused one starts from
    the very same numbers). ``normal`` is the d2l tutorial's: weights from
    N(0, 0.01²), biases zero. ``keras`` is what Keras's ``SimpleRNNCell``,
    ``GRUCell`` and ``LSTMCell`` start from: the input weights Glorot uniform
    over the whole (G*H, I) matrix (Keras's (I, G*H) kernel transposed, same
    fan-in and fan-out), the recurrent weights orthogonal, biases zero, and an
    LSTM's forget-gate bias 1 (``unit_forget_bias``; gate order i, f, g, o as
    in Keras, in ``bias_ih`` only since PyTorch adds the two biases).
    """
    with torch.no_grad():
        if scheme == "default":
            bound = 1.0 / math.sqrt(hidden) if hidden > 0 else 0.0
            for _, p in params:
                p.uniform_(-bound, bound)
        elif scheme == "normal":
            for name, p in params:
                if name.startswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.01)
        elif scheme == "keras":
            for name, p in params:
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)  # (G*H, I): fan-in I, fan-out G*H
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)  # (G*H, H): orthonormal columns, Keras's (H, G*H) rows
                else:
                    p.zero_()
                    if name.startswith("bias_ih") and p.shape[0] == 4 * hidden:  # an LSTM: [i, f, g, o]
                        p[hidden : 2 * hidden] = 1.0
        else:
            raise ValueError(f"unknown init scheme {scheme!r} (choose: default, normal, keras)")


# ---------------------------------------------------------------- cell modules


class _Cell(nn.Module):
    """Shared parameter set-up: weight_ih (G*H, I), weight_hh (G*H, H), bias_ih and bias_hh (G*H,)."""

    kind = ""

    def __init__(self, input_size: int, hidden: int, *, init: str = "default") -> None:
        super().__init__()
        gates = GATES[self.kind] * hidden
        self.input_size = input_size
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh = nn.Parameter(torch.empty(gates, hidden))
        self.bias_ih = nn.Parameter(torch.empty(gates))
        self.bias_hh = nn.Parameter(torch.empty(gates))
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "default") -> None:
        init_recurrent_(list(self.named_parameters()), hidden=self.hidden, scheme=init)

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def initial_state(self, batch_size: int) -> State:
        zeros = self.weight_hh.new_zeros(batch_size, self.hidden)
        return (zeros,) if self.kind != "lstm" else (zeros, zeros.clone())

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden}"


class RNNCell(_Cell):
    """``forward(x, state=None) -> (h,)``: h' = act(W_ih x + b_ih + W_hh h + b_hh), act tanh or relu."""

    kind = "rnn"

    def __init__(self, input_size: int, hidden: int, *, nonlinearity: str = "tanh", init: str = "default") -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r} (choose: tanh, relu)")
        super().__init__(input_size, hidden, init=init)
        self.nonlinearity = nonlinearity

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        (h,) = state if state is not None else self.initial_state(x.shape[0])
        return (rnn_step(x, h, *self.weights, nonlinearity=self.nonlinearity),)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nonlinearity={self.nonlinearity!r}"


class GRUCell(_Cell):
    """``forward(x, state=None) -> (h,)`` with reset, update and candidate gates (torch's r, z, n order)."""

    kind = "gru"

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        (h,) = state if state is not None else self.initial_state(x.shape[0])
        return (gru_step(x, h, *self.weights),)


class LSTMCell(_Cell):
    """``forward(x, state=None) -> (h, c)`` with input, forget, cell and output gates (torch's i, f, g, o order)."""

    kind = "lstm"

    def forward(self, x: torch.Tensor, state: State | None = None) -> State:
        h, c = state if state is not None else self.initial_state(x.shape[0])
        return lstm_step(x, h, c, *self.weights)


CELL_MODULES: dict[str, type[_Cell]] = {"rnn": RNNCell, "gru": GRUCell, "lstm": LSTMCell}
