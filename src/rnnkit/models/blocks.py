"""Pre-norm residual blocks around recurrent layers (``--block residual``), for the language model.

A plain language model stacks its recurrent layers directly (``Recurrent`` with
``layers = L``). A residual one, as the minGRU paper's language models and
nanoGPT are built, keeps a residual stream x of width H and gives each of the
L layers a block of its own:

    x = W_in e + b_in                       (only when the input width I is not H)
    x = x + drop(rnn_k(LN_k(x)))            the recurrent sub-block, k = 1..L
    x = x + drop(MLP_k(LN'_k(x)))           with ``mlp_ratio`` > 0: MLP(u) = W_2 gelu(W_1 u + b_1) + b_2
    out = LN_f(x)                           the final norm, before the head

Each ``rnn_k`` is a one-layer :class:`~rnnkit.models.recurrent.Recurrent` of
width H, so every cell and backend works as in a plain stack, and the state
keeps the one format: a tuple of (L, B, H) tensors, row k the state of block
k's layer (``(h, c)`` for an LSTM, ``(h,)`` otherwise).

:class:`ResidualStack` has :class:`Recurrent`'s interface (``forward``,
``initial_state``, ``stepper``, ``step``), so the language model holds either
as its ``recurrent``. :class:`ResidualStep` is its bound one-token step: per
block a layer norm, the layer's own bound step (``FusedStep`` / ``MinStep`` of
one layer: O(1) per token from the carried state), the add, and the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.models.cells import FusedStep, MinStep, State
from rnnkit.models.recurrent import Recurrent

__all__ = ["ResidualBlock", "ResidualStack", "ResidualStep"]

Norm = tuple[torch.Tensor, torch.Tensor, float]  # a LayerNorm's (weight, bias, eps), read in place
Dense = tuple[torch.Tensor, torch.Tensor]  # a Linear's (bias (out,), weight^T (in, out) as a view) for addmm


def _norm(module: nn.LayerNorm) -> Norm:
    return module.weight.detach(), module.bias.detach(), module.eps


def _dense(module: nn.Linear) -> Dense:
    return module.bias.detach(), module.weight.detach().t()  # addmm reads the (out, in) weight as it lies


def _linear(x: torch.Tensor, dense: Dense) -> torch.Tensor:
    bias, weight_t = dense
    return torch.addmm(bias, x, weight_t)  # (B, out) = x W^T + b


def _layer_norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    weight, bias, eps = norm
    return F.layer_norm(x, weight.shape, weight, bias, eps)


class ResidualBlock(nn.Module):
    """``forward(x, state) -> (x', state)``: one pre-norm residual block, x (B, T, H), state (1, B, H) tensors."""

    def __init__(self, *, cell: str, hidden: int, mlp_ratio: float = 0.0, dropout: float = 0.0,
                 nonlinearity: str = "tanh", backend: str = "fused", init: str = "default",
                 scan: str = "auto") -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.recurrent = Recurrent(cell=cell, input_size=hidden, hidden=hidden, layers=1,
                                   nonlinearity=nonlinearity, backend=backend, init=init, scan=scan)
        inner = round(mlp_ratio * hidden)
        # The MLP sub-block, present only with mlp_ratio > 0 (its own pre-norm, then H -> inner -> H).
        self.mlp_norm = nn.LayerNorm(hidden) if inner else None
        self.mlp_up = nn.Linear(hidden, inner) if inner else None
        self.mlp_down = nn.Linear(inner, hidden) if inner else None
        self.dropout = nn.Dropout(dropout)  # on each sub-block's output, before it joins the stream

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state = self.recurrent(self.norm(x), state)  # (B, T, H)
        x = x + self.dropout(out)
        if self.mlp_up is not None:
            x = x + self.dropout(self.mlp_down(F.gelu(self.mlp_up(self.mlp_norm(x)))))
        return x, state


class ResidualStack(nn.Module):
    """``forward(x, state) -> (outputs, state)``: x (B, T, I), outputs (B, T, H) after the final norm.

    The residual counterpart of :class:`~rnnkit.models.recurrent.Recurrent`
    (same calls, same state format), built of ``layers`` :class:`ResidualBlock`.
    """

    # The bound step's layer 0 reads LN(x), never the token alone, so there is no per-token input table.
    steps_from_projection = False

    def __init__(self, *, cell: str, input_size: int, hidden: int, layers: int = 1, mlp_ratio: float = 0.0,
                 dropout: float = 0.0, nonlinearity: str = "tanh", backend: str = "fused", init: str = "default",
                 scan: str = "auto") -> None:
        super().__init__()
        self.cell = cell
        self.hidden = hidden
        self.layers = layers
        # The residual stream is H wide: a narrower or wider input (embedding, one-hot V) is projected to it.
        self.input_proj = nn.Linear(input_size, hidden) if input_size != hidden else None
        self.blocks = nn.ModuleList(
            ResidualBlock(cell=cell, hidden=hidden, mlp_ratio=mlp_ratio, dropout=dropout,
                          nonlinearity=nonlinearity, backend=backend, init=init, scan=scan)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)

    @property
    def state_size(self) -> int:
        """How many tensors make up a state: 2 for an LSTM, else 1."""
        return self.blocks[0].recurrent.state_size

    def initial_state(self, batch_size: int, *, device=None, dtype=None) -> State:
        p = self.norm.weight
        zeros = torch.zeros(self.layers, batch_size, self.hidden, device=device or p.device, dtype=dtype or p.dtype)
        return tuple(zeros.clone() for _ in range(self.state_size))

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        if self.input_proj is not None:
            x = self.input_proj(x)  # (B, T, H)
        finals = []
        for k, block in enumerate(self.blocks):
            x, final = block(x, tuple(s[k : k + 1] for s in state))  # block k's rows: (1, B, H) each
            finals.append(final)
        # Per-block (1, B, H) finals -> (L, B, H) per state tensor.
        return self.norm(x), tuple(torch.cat(parts) for parts in zip(*finals, strict=True))

    def stepper(self, *, projected: bool = False) -> ResidualStep:
        """Bind the one-token step to this moment's weights (eval-mode arithmetic); bind again after they change."""
        if projected:
            raise ValueError("a residual stack's step cannot start from a projected input: its layers read LN(x)")
        return ResidualStep(self)

    def step(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One time step, x (B, I) -> out (B, H) and the new state; binds for this one call (loops: :meth:`stepper`)."""
        return self.stepper()(x, state)


class ResidualStep:
    """``step(x, state) -> (out, state)``: one token through a :class:`ResidualStack`, x (B, I), out (B, H).

    Binding builds each block's layer step (a one-layer ``FusedStep`` or
    ``MinStep``, which copies its weights into the step layout) and keeps the
    norms, the MLPs and the input projection as they are (read in place, the
    linear weights as transposed views for ``addmm``). Bind again after the
    weights change. No dropout, no gradients to the weights.
    """

    def __init__(self, stack: ResidualStack) -> None:
        self.initial_state = stack.initial_state
        self.input_proj: Dense | None = None if stack.input_proj is None else _dense(stack.input_proj)
        self.blocks: list[tuple[Norm, FusedStep | MinStep, tuple[Norm, Dense, Dense] | None]] = [
            (_norm(b.norm), b.recurrent.stepper(),
             None if b.mlp_up is None else (_norm(b.mlp_norm), _dense(b.mlp_up), _dense(b.mlp_down)))
            for b in stack.blocks
        ]
        self.norm = _norm(stack.norm)

    def __call__(self, x: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(x.shape[0])
        if self.input_proj is not None:
            x = _linear(x, self.input_proj)  # (B, H)
        finals = []
        for k, (norm, layer, mlp) in enumerate(self.blocks):
            out, final = layer(_layer_norm(x, norm), tuple(s[k : k + 1] for s in state))  # (B, H)
            x = x + out
            if mlp is not None:
                mlp_norm, up, down = mlp
                x = x + _linear(F.gelu(_linear(_layer_norm(x, mlp_norm), up)), down)
            finals.append(final)
        return _layer_norm(x, self.norm), tuple(torch.cat(parts) for parts in zip(*finals, strict=True))
