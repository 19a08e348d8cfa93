"""One time step of each recurrent cell, written like the equations.

Three layers of the same arithmetic, from the inside out:

* ``rnn_cell`` / ``gru_cell`` / ``lstm_cell``: the recurrence proper. They
  take ``gx = W_ih x + b_ih``, the input's share of every gate, already
  computed, because a whole sequence's input projection is known in advance
  and is best done as one matrix product before the time loop (the scratch
  backend of :class:`~rnnkit.models.recurrent.Recurrent` does exactly that).
* ``rnn_step`` / ``gru_step`` / ``lstm_step``: a full step from the input
  ``x``, on raw weight tensors. Generation steps one token at a time with
  these on the weights of either backend: on CPU a fused module called at
  length 1 pays a large fixed cost per call, while two matrix products per
  layer do not.
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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]

# Gate blocks stacked in the weight matrices, per cell type.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


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


def step(
    cell: str,
    x: torch.Tensor,
    state: State,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    *,
    nonlinearity: str = "tanh",
) -> State:
    """One step of any cell type: ``state`` is ``(h,)`` or ``(h, c)``; returns the new state."""
    if cell == "lstm":
        return lstm_step(x, state[0], state[1], *weights)
    if cell == "gru":
        return (gru_step(x, state[0], *weights),)
    return (rnn_step(x, state[0], *weights, nonlinearity=nonlinearity),)


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
