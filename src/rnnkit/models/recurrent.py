"""A stack of recurrent layers with one state format for every cell type and backend.

The state is always a tuple of (layers, B, H) tensors: ``(h, c)`` for an LSTM
and ``(h,)`` for a GRU or vanilla RNN, so code that carries, detaches or
batches states never needs to know the cell type.

Two backends compute the same function with the same parameters:

* ``fused``: PyTorch's ``nn.LSTM``/``GRU``/``RNN`` (oneDNN/cuDNN kernels).
* ``scratch``: :class:`ScratchStack`, a time loop over the hand-written cells
  of :mod:`rnnkit.models.cells`. It registers its parameters exactly as the
  fused module does (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
  ``bias_hh_l{k}``, same shapes, same order), so ``state_dict``s, checkpoints
  and even optimizer states move between the backends unchanged, and the
  default initialisation draws the same numbers from the same seed.

Whichever the backend, stepping a single token without gradients
(generation) runs the hand-written steps on the weights directly, which on
CPU is several times faster than calling the fused module at length 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.cells import GATES, State, gru_cell, init_recurrent_, lstm_cell, rnn_cell, step

__all__ = ["BACKENDS", "CELLS", "Recurrent", "ScratchStack", "State", "detach_state"]

_FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
CELLS = tuple(_FUSED)
BACKENDS = ("fused", "scratch")
_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class ScratchStack(nn.Module):
    """``forward(x, state) -> (outputs, state)``: x (B, T, I), outputs (B, T, H), state as :class:`Recurrent`'s.

    Each layer first projects its whole input sequence at once (one matrix
    product for all T steps, with both biases folded in where the equations
    allow), then walks the time steps with ``unbind(1)`` (indexing ``xp[:, t]``
    in the loop measured about twice as slow), applying only the recurrent
    half of the cell per step. Dropout falls between layers in training, as
    in the fused modules.
    """

    def __init__(
        self,
        *,
        cell: str,
        input_size: int,
        hidden: int,
        layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__()
        if cell not in GATES:
            raise ValueError(f"unknown cell {cell!r} (choose: {', '.join(GATES)})")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"unknown nonlinearity {nonlinearity!r} (choose: tanh, relu)")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden
        self.num_layers = layers
        self.dropout = dropout
        self.nonlinearity = nonlinearity
        gates = GATES[cell] * hidden
        for k in range(layers):
            fan_in = input_size if k == 0 else hidden
            # The same names, shapes and registration order as nn.LSTM/GRU/RNN.
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, fan_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_recurrent_(list(self.named_parameters()), hidden=self.hidden_size, scheme="default")

    def layer_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(getattr(self, f"{name}_l{k}") for name in _WEIGHT_NAMES)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        finals: list[State] = []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)  # between layers only
            x, final = self._layer(x, tuple(s[k] for s in state), *self.layer_weights(k))
            finals.append(final)
        # Per-layer (B, H) finals -> (layers, B, H) per state tensor.
        return x, tuple(torch.stack(parts) for parts in zip(*finals, strict=True))

    def _layer(
        self,
        x: torch.Tensor,
        state: State,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor,
        b_hh: torch.Tensor,
    ) -> tuple[torch.Tensor, State]:
        """One layer over the whole sequence: x (B, T, I) -> outputs (B, T, H) and the final state."""
        outputs: list[torch.Tensor] = []
        if self.cell == "lstm":
            # W_hh h + b_hh is only ever added to W_ih x + b_ih, so b_hh joins the hoisted product.
            xp = F.linear(x, w_ih, b_ih + b_hh)  # (B, T, 4H): every step's input share, one GEMM
            h, c = state
            for gx in xp.unbind(1):
                h, c = lstm_cell(gx, h, c, w_hh, None)
                outputs.append(h)
            final: State = (h, c)
        elif self.cell == "gru":
            # b_hn sits inside r * (W_hn h + b_hn), so b_hh stays in the per-step product.
            xp = F.linear(x, w_ih, b_ih)  # (B, T, 3H)
            (h,) = state
            for gx in xp.unbind(1):
                h = gru_cell(gx, h, w_hh, b_hh)
                outputs.append(h)
            final = (h,)
        else:
            xp = F.linear(x, w_ih, b_ih + b_hh)  # (B, T, H)
            (h,) = state
            for gx in xp.unbind(1):
                h = rnn_cell(gx, h, w_hh, None, nonlinearity=self.nonlinearity)
                outputs.append(h)
            final = (h,)
        return torch.stack(outputs, dim=1), final

    def extra_repr(self) -> str:
        extra = f", nonlinearity={self.nonlinearity!r}" if self.cell == "rnn" else ""
        return (f"{self.cell}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}{extra}")


class Recurrent(nn.Module):
    """``forward(x, state) -> (outputs, state)`` with x (B, T, I) and outputs (B, T, H)."""

    def __init__(
        self,
        *,
        cell: str,
        input_size: int,
        hidden: int,
        layers: int = 1,
        dropout: float = 0.0,
        nonlinearity: str = "tanh",
        backend: str = "fused",
        init: str = "default",
    ) -> None:
        super().__init__()
        if cell not in _FUSED:
            raise ValueError(f"unknown cell {cell!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose: {', '.join(BACKENDS)})")
        self.cell = cell
        self.hidden = hidden
        self.layers = layers
        self.nonlinearity = nonlinearity
        self.backend = backend
        self._step_cache: dict[int, tuple] = {}  # layer -> (weight versions, [W_ih|W_hh]^T, b_ih + b_hh)
        # Dropout between layers only: applied to every layer's output but the last.
        between = dropout if layers > 1 else 0.0
        if backend == "fused":
            kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
            self.rnn: nn.Module = _FUSED[cell](
                input_size, hidden, num_layers=layers, batch_first=True, dropout=between, **kwargs,
            )
        else:
            self.rnn = ScratchStack(cell=cell, input_size=input_size, hidden=hidden, layers=layers,
                                    dropout=between, nonlinearity=nonlinearity)
        if init != "default":  # both modules already hold PyTorch's default
            init_recurrent_(list(self.rnn.named_parameters()), hidden=hidden, scheme=init)

    @property
    def state_size(self) -> int:
        """How many tensors make up a state: 2 for an LSTM, else 1."""
        return 2 if self.cell == "lstm" else 1

    def initial_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        p = next(self.parameters())
        zeros = torch.zeros(
            self.layers, batch_size, self.hidden, device=device or p.device, dtype=dtype or p.dtype
        )
        return tuple(zeros.clone() for _ in range(self.state_size))

    def layer_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer k's (weight_ih, weight_hh, bias_ih, bias_hh), whichever the backend."""
        return tuple(getattr(self.rnn, f"{name}_l{k}") for name in _WEIGHT_NAMES)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 1 and not self.training and not torch.is_grad_enabled():
            return self._step(x[:, 0], state)
        if self.backend == "scratch":
            return self.rnn(x, state)
        fused_state = state if self.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, fused_state)  # out (B, T, H)
        return out, (tuple(new_state) if self.cell == "lstm" else (new_state,))

    def _step_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer k's [W_ih | W_hh] transposed to (I + H, G*H) and b_ih + b_hh, cached while the weights stay.

        For one token, ``addmm(b, [x, h], W^T)`` is one matrix product over a row-major
        (I + H, G*H) matrix; measured here it runs about twice as fast as two ``F.linear``
        calls on the (G*H, I) and (G*H, H) weights. The cache is rebuilt whenever a
        weight changes (training in between, loading a checkpoint).

        Safe when several threads generate from one model (the server): an entry is
        built completely and then published with one dict assignment, so a reader
        sees either no entry or a whole one; two threads that miss at once both
        build the same matrices and the last one's stays.
        """
        weights = self.layer_weights(k)
        key = tuple((w.data_ptr(), w._version) for w in weights)
        cached = self._step_cache.get(k)
        if cached is None or cached[0] != key:
            w_ih, w_hh, b_ih, b_hh = weights
            with torch.no_grad():
                w_t = torch.cat([w_ih, w_hh], dim=1).t().contiguous()  # (I + H, G*H)
                bias = (b_ih + b_hh).contiguous()
            cached = (key, w_t, bias)
            self._step_cache[k] = cached
        return cached[1], cached[2]

    @property
    def steps_from_projection(self) -> bool:
        """Whether :meth:`step_fn` can start from a projected input (not for the GRU, whose r gates W_hn h only)."""
        return self.cell != "gru"

    def step_fn(self, *, projected: bool = False) -> Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]:
        """One eval-mode time step through every layer, with this moment's weights bound.

        Returns ``run(x, state) -> (h, state)`` with x (B, I) and h (B, H) the top
        layer's output. With ``projected``, x is layer 0's input already
        multiplied out, ``W_ih x + b_ih + b_hh`` (B, G*H): a language model looks it
        up in a per-token table instead of reading W_ih every step. A generation
        loop binds once and calls ``run`` per token, skipping the per-call checks
        of the weight cache; bind again after the weights change.
        """
        if self.cell == "gru":  # r gates only W_hn h + b_hn: the two products stay apart
            weights = [self.layer_weights(k) for k in range(self.layers)]

            def run_gru(x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
                hs = []
                for k in range(self.layers):
                    (x,) = step("gru", x, (state[0][k],), weights[k])
                    hs.append(x)
                return x, (torch.stack(hs),)

            return run_gru
        hidden, lstm, relu = self.hidden, self.cell == "lstm", self.nonlinearity == "relu"
        bound = [self._step_weights(k) for k in range(self.layers)]  # [(W^T (I+H, G*H), b)]
        w_hh0_t = bound[0][0][bound[0][0].shape[0] - hidden:]  # rows I: of [W_ih | W_hh]^T: W_hh^T, contiguous

        def run(x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
            hs, cs = [], []
            for k, (w_t, bias) in enumerate(bound):
                if k == 0 and projected:
                    pre = torch.addmm(x, state[0][0], w_hh0_t)  # (B, G*H)
                else:
                    pre = torch.addmm(bias, torch.cat([x, state[0][k]], dim=1), w_t)  # W_ih x + W_hh h + b
                if lstm:
                    # The gates of cells.lstm_cell, same order; one sigmoid over all four blocks
                    # (fewer kernel launches per token), of which g's is not used.
                    gates = torch.sigmoid(pre)
                    i, f, _, o = gates.chunk(4, dim=-1)
                    g = torch.tanh(pre[:, 2 * hidden:3 * hidden])
                    c = torch.addcmul(f * state[1][k], i, g)  # f * c + i * g
                    x = o * torch.tanh(c)
                    cs.append(c)
                else:
                    x = torch.relu(pre) if relu else torch.tanh(pre)
                hs.append(x)  # no inter-layer dropout: this path only runs in eval mode
            return x, ((torch.stack(hs), torch.stack(cs)) if lstm else (torch.stack(hs),))

        return run

    def _step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time step through every layer with plain matrix products (no autograd)."""
        out, new_state = self.step_fn()(x, state)
        return out.unsqueeze(1), new_state


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state (truncated backprop through time)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state)
