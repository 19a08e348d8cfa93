"""A stack of recurrent layers with one state format for every cell type.

The state is always a tuple of (layers, B, H) tensors: ``(h, c)`` for an LSTM
and ``(h,)`` for a GRU or vanilla RNN, so code that carries, detaches or
batches states never needs to know the cell type.

Training runs the fused PyTorch module (oneDNN/cuDNN kernels). Stepping a
single token without gradients (generation) runs the hand-written steps of
:mod:`rnnkit.models.cells` on the same weights, which on CPU is several times
faster than calling the fused module at length 1.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.models.cells import gru_step, lstm_step, rnn_step

State = tuple[torch.Tensor, ...]

_FUSED = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


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
    ) -> None:
        super().__init__()
        if cell not in _FUSED:
            raise ValueError(f"unknown cell {cell!r}")
        self.cell = cell
        self.hidden = hidden
        self.layers = layers
        self.nonlinearity = nonlinearity
        kwargs = {"nonlinearity": nonlinearity} if cell == "rnn" else {}
        # Dropout between layers only: torch applies it to every layer's output but the last.
        self.rnn = _FUSED[cell](
            input_size, hidden, num_layers=layers, batch_first=True,
            dropout=dropout if layers > 1 else 0.0, **kwargs,
        )

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

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        if x.shape[1] == 1 and not self.training and not torch.is_grad_enabled():
            return self._step(x[:, 0], state)
        fused_state = state if self.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, fused_state)  # out (B, T, H)
        return out, (tuple(new_state) if self.cell == "lstm" else (new_state,))

    def _step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One time step through every layer with plain matrix products (no autograd)."""
        hs, cs = [], []
        for layer in range(self.layers):
            w = [getattr(self.rnn, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if self.cell == "lstm":
                h, c = lstm_step(x, state[0][layer], state[1][layer], *w)
                cs.append(c)
            elif self.cell == "gru":
                h = gru_step(x, state[0][layer], *w)
            else:
                h = rnn_step(x, state[0][layer], *w, nonlinearity=self.nonlinearity)
            hs.append(h)
            x = h  # no inter-layer dropout: this path only runs in eval mode
        new_state = (torch.stack(hs),) + ((torch.stack(cs),) if self.cell == "lstm" else ())
        return x.unsqueeze(1), new_state


def detach_state(state: State | None) -> State | None:
    """Cut the graph behind a carried state (truncated backprop through time)."""
    if state is None:
        return None
    return tuple(s.detach() for s in state)
