"""A stack of recurrent layers with one state format for every cell type and backend.

The state is always a tuple of (layers, B, H) tensors: ``(h, c)`` for an LSTM
and ``(h,)`` for a GRU or vanilla RNN, so code that carries, detaches or
batches states never needs to know the cell type.

Two backends compute the same function with the same parameters:

* ``fused``: PyTorch's ``nn.LSTM``/``GRU``/``RNN`` (oneDNN/cuDNN kernels);
  for minGRU/minLSTM, which PyTorch lacks, :class:`ScanStack`: the gates of
  the whole window from one matrix product per layer, then the scan chosen
  by ``scan`` (:mod:`rnnkit.models.scan`).
* ``scratch``: :class:`ScratchStack`, a time loop over the hand-written cells
  of :mod:`rnnkit.models.cells`. It registers its parameters exactly as the
  fused module does (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
  ``bias_hh_l{k}``, same shapes, same order; minGRU/minLSTM have only the
  ``ih`` pair), so ``state_dict``s, checkpoints and even optimizer states move
  between the backends unchanged, and the default initialisation draws the
  same numbers from the same seed.

Two calls, one per shape of work (the model contract):

* ``forward(x, state=None) -> (outputs, state)`` over a window, x (B, T, I):
  always the backend's module, whatever T, the mode or the grad setting.
* ``step(x, state) -> (h, state)`` for one time step, x (B, I): the
  :class:`~rnnkit.models.cells.FusedStep` of this moment's weights.
  ``stepper()`` binds one (lays the weights out once) for a loop that steps
  many tokens; on CPU it is several times faster than calling the fused
  module at length 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.cells import (
    COEFFICIENTS,
    GATES,
    LOG_COEFFICIENTS,
    MIN_CELLS,
    MINIMAL,
    FusedStep,
    MinStep,
    State,
    gru_cell,
    init_recurrent_,
    lstm_cell,
    rnn_cell,
)
from rnnkit.models.gemm import linear
from rnnkit.models.scan import SCANS, choose_scan, mingru_scan_time_major, parallel_scan, sequential_scan_time_major

__all__ = ["BACKENDS", "CELLS", "Recurrent", "ScanStack", "ScratchStack", "State", "detach_state"]

_FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
CELLS = (*_FUSED, *MINIMAL)
BACKENDS = ("fused", "scratch")
_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class ScratchStack(nn.Module):
    """``forward(x, state) -> (outputs, state)``: x (B, T, I), outputs (B, T, H), state as :class:`Recurrent`'s.

    Each layer first projects its whole input sequence at once (one matrix
    product for all T steps, with both biases folded in where the equations
    allow), then walks the time steps with ``unbind(1)`` (indexing ``xp[:, t]``
    in the loop measured about twice as slow), applying only the recurrent
    half of the cell per step (for minGRU/minLSTM, the whole cell: their
    gates read only the projected input). Dropout falls between layers in
    training, as in the fused modules.
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
            # The same names, shapes and registration order as nn.LSTM/GRU/RNN; minGRU/minLSTM have
            # no hidden-to-hidden weights, so only the stacked gate and candidate projections.
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(gates, fan_in)))
            if cell not in MINIMAL:
                self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(gates, hidden)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(gates)))
            if cell not in MINIMAL:
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(gates)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_recurrent_(list(self.named_parameters()), hidden=self.hidden_size, scheme="default")

    def layer_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # minGRU/minLSTM: (weight_ih, None, bias_ih, None).
        return tuple(getattr(self, f"{name}_l{k}", None) for name in _WEIGHT_NAMES)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        finals: list[State] = []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)  # between layers only
            if self.cell in MINIMAL:
                w_ih, _, b_ih, _ = self.layer_weights(k)  # no hidden-to-hidden weights
                x, final = self._min_layer(x, state[0][k], w_ih, b_ih)
            else:
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

    def _min_layer(self, x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor,
                   b_ih: torch.Tensor) -> tuple[torch.Tensor, State]:
        """minGRU/minLSTM, the reference: x (B, T, I), h (B, H) -> outputs (B, T, H), (h_T,)."""
        cell = MIN_CELLS[self.cell]
        # (B, T, G*H): every step's gates and candidate, one GEMM; the gates at the state's precision
        # (float32 under bf16/fp16 autocast), as the scan stack computes them.
        xp = F.linear(x, w_ih, b_ih).to(h.dtype)
        outputs = []
        for gx in xp.unbind(1):
            h = cell(gx, h)  # the whole step: nothing in it reads h but the final mix
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h,)

    def extra_repr(self) -> str:
        extra = f", nonlinearity={self.nonlinearity!r}" if self.cell == "rnn" else ""
        return (f"{self.cell}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"dropout={self.dropout}{extra}")


class ScanStack(ScratchStack):
    """minGRU/minLSTM's fast stack: the scratch stack's parameters, each layer's window as one scan.

    Per layer: ``gx = W_ih x + b_ih`` for the whole window (one GEMM,
    (B, T, G*H)), every gate and candidate from it at once (elementwise over
    the window), then ``h_t = a_t * h_{t-1} + b_t`` by the scan ``scan``
    names: ``sequential`` (an ``addcmul`` per step), ``parallel`` (Heinsen's
    log-space scan) or ``auto`` (chosen by the input's device at each call,
    :func:`~rnnkit.models.scan.choose_scan`). Same function as
    :class:`ScratchStack`'s loop, tested equal.
    """

    def __init__(self, *, cell: str, input_size: int, hidden: int, layers: int = 1, dropout: float = 0.0,
                 scan: str = "auto") -> None:
        if cell not in MINIMAL:
            raise ValueError(f"a scan stack runs mingru or minlstm, not {cell!r}")
        if scan not in SCANS:
            raise ValueError(f"unknown scan {scan!r} (choose: {', '.join(SCANS)})")
        super().__init__(cell=cell, input_size=input_size, hidden=hidden, layers=layers, dropout=dropout)
        self.scan = scan

    def forward(self, x: torch.Tensor | None, state: State, *,
                projected: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """x (B, T, I) -> outputs (B, T, H) and the final state; or, with ``projected``, layer 0's
        ``W_ih x + b_ih`` given time-major, (T, B, G*H), in place of x and of layer 0's GEMM."""
        parallel = choose_scan(self.scan, (x if projected is None else projected).device) == "parallel"
        # The parallel scan is a cumsum over T, so its layers stay batch-first. The sequential scan
        # walks time, so the window goes time-major once, (T, B, .), and every layer's GEMM, gates
        # and scan read and write contiguous (T, B, .) tensors; the outputs go back batch-first as a
        # view. Measured on a 2x512 minGRU step: the transposing copies that batch-first layers made
        # around each scan (and the strided elementwise work behind them) cost more than the scan.
        if projected is not None:
            x = projected.transpose(0, 1) if parallel else projected
        elif not parallel:
            x = x.transpose(0, 1)
        finals = []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)  # between layers only
            w_ih, _, b_ih, _ = self.layer_weights(k)
            h = state[0][k]
            # (., ., G*H), then at the state's precision: under bf16/fp16 autocast the GEMM runs in
            # half precision but the gates and the scan stay in float32.
            gx = (x if k == 0 and projected is not None else linear(x, w_ih, b_ih)).to(h.dtype)
            if parallel:
                x = parallel_scan(*LOG_COEFFICIENTS[self.cell](gx), h)  # (B, T, H)
                finals.append(x[:, -1])
            else:
                if self.cell == "mingru":
                    x = mingru_scan_time_major(gx, h)  # (T, B, H): gates and scan as one autograd node
                else:
                    x = sequential_scan_time_major(*COEFFICIENTS[self.cell](gx), h)
                finals.append(x[-1])
        return (x if parallel else x.transpose(0, 1)), (torch.stack(finals),)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scan={self.scan!r}"


class Recurrent(nn.Module):
    """``forward(x, state) -> (outputs, state)``, x (B, T, I), outputs (B, T, H); ``step(x, state)`` for one x (B, I)."""

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
        scan: str = "auto",
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r} (choose: {', '.join(CELLS)})")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose: {', '.join(BACKENDS)})")
        if scan not in SCANS:  # checked for every cell and backend, though only ScanStack reads it
            raise ValueError(f"unknown scan {scan!r} (choose: {', '.join(SCANS)})")
        self.cell = cell
        self.hidden = hidden
        self.layers = layers
        self.nonlinearity = nonlinearity
        self.backend = backend
        # Dropout between layers only: applied to every layer's output but the last.
        between = dropout if layers > 1 else 0.0
        if backend == "fused" and cell in MINIMAL:
            self.rnn: nn.Module = ScanStack(cell=cell, input_size=input_size, hidden=hidden, layers=layers,
                                            dropout=between, scan=scan)
        elif backend == "fused":
            kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
            self.rnn = _FUSED[cell](
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
        """Layer k's (weight_ih, weight_hh, bias_ih, bias_hh), whichever the backend; minGRU/minLSTM: hh are None."""
        return tuple(getattr(self.rnn, f"{name}_l{k}", None) for name in _WEIGHT_NAMES)  # type: ignore[return-value]

    @property
    def takes_projected(self) -> bool:
        """Whether :meth:`forward` can take layer 0's input product for x (``projected``): minGRU/minLSTM's scan stack."""
        return isinstance(self.rnn, ScanStack)

    def forward(self, x: torch.Tensor | None, state: State | None = None, *,
                projected: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """The whole window x (B, T, I) -> outputs (B, T, H) and the final state, on the backend's module.

        With ``projected`` (only where :attr:`takes_projected`), x is None and layer 0's
        ``W_ih x + b_ih`` comes time-major, (T, B, G*H), already computed.
        """
        if projected is not None:
            if not self.takes_projected:
                raise ValueError(f"a {self.backend} {self.cell} stack takes its input, not a projected one")
            if state is None:
                state = self.initial_state(projected.shape[1], device=projected.device)
            return self.rnn(None, state, projected=projected)
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        if self.backend == "scratch" or self.cell in MINIMAL:
            return self.rnn(x, state)
        fused_state = state if self.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, fused_state)  # out (B, T, H)
        return out, (tuple(new_state) if self.cell == "lstm" else (new_state,))

    @property
    def steps_from_projection(self) -> bool:
        """Whether :meth:`stepper` can start from a projected input (not for the GRU, whose r gates W_hn h only)."""
        return self.cell != "gru"

    def stepper(self, *, projected: bool = False) -> FusedStep | MinStep:
        """Bind the one-token step to this moment's weights: ``run(x, state) -> (h, state)``, eval only.

        x (B, I), or with ``projected`` layer 0's ``W_ih x + b_ih + b_hh`` (B, G*H);
        h (B, H) is the top layer's output. Binding copies the weights into the
        step's layout (see :class:`~rnnkit.models.cells.FusedStep`); bind again
        after the weights change. minGRU/minLSTM bind a :class:`~rnnkit.models.cells.MinStep`
        (projected: layer 0's ``W_ih x + b_ih``, they have no ``b_hh``).
        """
        if self.cell in MINIMAL:
            return MinStep(self.cell, [(w_ih, b_ih) for w_ih, _, b_ih, _ in map(self.layer_weights, range(self.layers))],
                           projected=projected)
        return FusedStep(self.cell, [self.layer_weights(k) for k in range(self.layers)],
                         nonlinearity=self.nonlinearity, projected=projected)

    def step(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One time step, x (B, I) -> h (B, H) and the new state; binds for this one call (loops: :meth:`stepper`)."""
        return self.stepper()(x, state)


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state (truncated backprop through time)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state)
