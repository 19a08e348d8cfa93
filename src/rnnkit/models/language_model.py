"""Language model: token ids -> (embedding | one-hot) -> recurrent stack -> next-token logits.

The stack is a plain :class:`~rnnkit.models.recurrent.Recurrent` (``block =
"plain"``) or, with ``block = "residual"``, a
:class:`~rnnkit.models.blocks.ResidualStack` of pre-norm residual blocks; both
have the same calls and the same state format.

The model contract, shared by every model:

* ``forward(ids, state=None) -> (logits, state)`` over a window: ids (B, T),
  logits (B, T, V). The same path whatever T, the mode or the grad setting.
  With ``softmax = "adaptive"`` the logits are log-probabilities (their softmax
  is the distribution, as for any logits), and ``nll`` gives the training loss
  without building them.
* ``step(ids, state) -> (logits, state)`` for one token per row: ids (B,),
  logits (B, V). ``stepper()`` binds it once (weights laid out for the step,
  see :class:`LanguageModelStep`) for a loop over many tokens, which is what
  generation runs; ``step`` binds for one call.

The state is a tuple of (layers, B, H) tensors; ``None`` means zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import ModelConfig
from rnnkit.models.adaptive import AdaptiveHead, resolve_cutoffs
from rnnkit.models.blocks import ResidualStack, ResidualStep
from rnnkit.models.cells import FusedStep, MinStep
from rnnkit.models.gemm import linear
from rnnkit.models.recurrent import Recurrent, State


class LanguageModel(nn.Module):
    """``forward(ids, state=None) -> (logits, state)``, ids (B, T), logits (B, T, V); ``step`` for ids (B,)."""

    def __init__(self, *, config: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        if config.input == "embedding":
            dim = config.embedding_dim or config.hidden
            self.embedding: nn.Embedding | None = nn.Embedding(vocab_size, dim)
            input_size = dim
        else:
            self.embedding = None
            input_size = vocab_size
        common = {"cell": config.cell, "input_size": input_size, "hidden": config.hidden, "layers": config.layers,
                  "dropout": config.dropout, "nonlinearity": config.nonlinearity, "backend": config.backend,
                  "init": config.init, "scan": config.scan}
        # Plain: the layers stacked directly. Residual: each in a pre-norm residual block, a final norm
        # after them (models/blocks.py); the same calls and state format either way.
        self.recurrent: Recurrent | ResidualStack = (
            Recurrent(**common) if config.block == "plain" else ResidualStack(**common, mlp_ratio=config.mlp_ratio)
        )
        self.dropout = nn.Dropout(config.dropout)
        # Whether the bound step looks layer 0's input product up in a (V, G*H) per-token table: the
        # table replaces W_ih (G*H, E) in memory traffic, worth it when it is no bigger (V <= E).
        self.step_uses_table = self.recurrent.steps_from_projection and vocab_size <= input_size
        # Adaptive: the head gives log-probabilities, so scores mean the same for every reader.
        self.adaptive = config.softmax == "adaptive"
        self.head: nn.Linear | AdaptiveHead = nn.Linear(config.hidden, vocab_size) if not self.adaptive else (
            AdaptiveHead(hidden=config.hidden, vocab_size=vocab_size, div_value=config.div_value,
                         cutoffs=resolve_cutoffs(config.cutoffs, vocab_size, hidden=config.hidden,
                                                 div_value=config.div_value)))
        if config.init in ("normal", "keras"):
            self._init_head(config.init)
        if config.tie_weights:
            assert self.embedding is not None and self.embedding.weight.shape == self.head.weight.shape
            self.head.weight = self.embedding.weight

    def _init_head(self, init: str) -> None:
        """d2l's normal(0, 0.01) or Keras's Glorot-uniform weights (each linear of an adaptive head), zero biases."""
        if init == "keras" and self.embedding is not None:  # Keras's Embedding default (the stack took its own)
            nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
        linears = [self.head] if isinstance(self.head, nn.Linear) else [m for m in self.head.modules()
                                                                         if isinstance(m, nn.Linear)]
        for layer in linears:
            if init == "normal":
                nn.init.normal_(layer.weight, 0.0, 0.01)
            else:
                nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(ids)  # (B, T, E)
        return F.one_hot(ids, self.vocab_size).to(next(self.recurrent.parameters()).dtype)  # (B, T, V)

    def features(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The head's input: ids (B, T) -> (B, T, H) outputs of the stack (after dropout) and the new state."""
        table = self.window_table(ids)
        if table is not None:  # layer 0's input product gathered per token, time-major: (T, B, G*H)
            out, state = self.recurrent(None, state, projected=F.embedding(ids.t(), table))
        else:
            x = self.dropout(self.embed(ids))  # (B, T, E)
            out, state = self.recurrent(x, state)  # (B, T, H)
        return self.dropout(out), state

    def window_table(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Layer 0's ``W_ih x + b_ih`` for every token, (V, G*H), differentiable, when gathering beats the GEMM.

        For minGRU/minLSTM's scan stack in plain blocks, whose layer 0 reads the
        embedding (or one-hot) rows as they are, that is when no dropout falls on
        them in between and the window holds at least twice as many tokens as the
        vocabulary: the (V, E) x (E, G*H) product and a row gather then replace a
        (B*T, E) x (E, G*H) one, forward and backward. The same function, summed
        in another order; a 2x512 minGRU step on an 80-token vocabulary took
        110-119 ms against 179 without it (docs/cells.md). None when it does not apply.
        """
        if (not isinstance(self.recurrent, Recurrent) or not self.recurrent.takes_projected or ids.dim() != 2
                or 2 * self.vocab_size > ids.numel() or (self.training and self.dropout.p > 0)
                or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            return None
        w_ih, _, b_ih, _ = self.recurrent.layer_weights(0)
        if self.embedding is None:  # a one-hot row picks W_ih's column
            return w_ih.t() + b_ih
        return linear(self.embedding.weight, w_ih, b_ih)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        out, state = self.features(ids, state)
        return self.head(out), state

    def nll(self, ids: torch.Tensor, targets: torch.Tensor,
            state: State | None = None) -> tuple[torch.Tensor, torch.Tensor, State]:
        """-log p(target), the argmax predictions and the new state, without building (B, T, V) when adaptive.

        ids (B, T); targets (B, T) score every position, (B,) only the last; the
        losses and predictions have the targets' shape.
        """
        out, state = self.features(ids, state)
        if targets.dim() == 1:
            out = out[:, -1]  # (B, H)
        h, y = out.reshape(-1, out.shape[-1]), targets.reshape(-1)  # (N, H), (N,)
        if isinstance(self.head, AdaptiveHead):
            nll, predicted = self.head.nll(h, y)
        else:
            logits = self.head(h)  # (N, V)
            nll, predicted = F.cross_entropy(logits.float(), y, reduction="none"), logits.detach().argmax(-1)
        return nll.view(targets.shape), predicted.view(targets.shape), state

    def stepper(self) -> LanguageModelStep:
        """Bind the one-token step to this moment's weights (eval-mode arithmetic); bind again after they change."""
        return LanguageModelStep(self)

    def step(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """One token per row, ids (B,) -> logits (B, V) and the new state; binds for this one call."""
        return self.stepper()(ids, state)

    def input_table(self) -> torch.Tensor:
        """(V, G*H): layer 0's ``W_ih x + b_ih + b_hh`` for every token x, computed now (minGRU/minLSTM: no b_hh)."""
        w_ih, _, b_ih, b_hh = self.recurrent.layer_weights(0)
        with torch.no_grad():
            inputs = self.embedding.weight if self.embedding is not None else None  # (V, E), or one-hot: W_ih^T
            bias = b_ih if b_hh is None else b_ih + b_hh  # (G*H,)
            table = (w_ih.t() if inputs is None else inputs @ w_ih.t()) + bias  # (V, G*H)
        return table.contiguous()

    def initial_state(self, batch_size: int) -> State:
        return self.recurrent.initial_state(batch_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class LanguageModelStep:
    """``step(ids, state) -> (logits, state)``: a language model's one-token step, bound to its weights.

    ids (B,), logits (B, V), state as the model's (``None``: zeros). Binding
    (``model.stepper()``) builds everything the step caches, once:

    * table path (``model.step_uses_table``: LSTM, vanilla RNN, minGRU or
      minLSTM with V <= E, hence every one-hot model but a GRU): the (V, G*H) input table
      :meth:`LanguageModel.input_table`, so layer 0's input product is a row
      lookup, and the recurrent step bound ``projected``;
    * otherwise: the embedding (or one-hot) of the ids, then the recurrent step.

    Either way the recurrent part is a :class:`~rnnkit.models.cells.FusedStep`
    (minGRU/minLSTM: a :class:`~rnnkit.models.cells.MinStep`; residual blocks: a
    :class:`~rnnkit.models.blocks.ResidualStep`, never the table) and the head one ``addmm`` (an adaptive
    head: its log-probabilities). What binding derives from the weights (the
    table, ``[W_ih | W_hh]^T``, the summed biases) is a copy, so bind again
    after the weights change; what the step uses as it is (the embedding, the
    head, a GRU's weights) is read in place. Eval-mode arithmetic (no
    dropout), no gradients to the weights.
    """

    def __init__(self, model: LanguageModel) -> None:
        self.embed = model.embed
        self.table: torch.Tensor | None = model.input_table() if model.step_uses_table else None  # (V, G*H)
        self.recurrent: FusedStep | MinStep | ResidualStep = model.recurrent.stepper(projected=self.table is not None)
        self.initial_state = model.initial_state
        self.head = model.head
        if isinstance(model.head, nn.Linear):
            # (V,) and (H, V), a transposed view: addmm reads the (V, H) weight as it lies.
            self.head_b, self.head_w_t = model.head.bias.detach(), model.head.weight.detach().t()

    def __call__(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        if state is None:
            state = self.initial_state(ids.shape[0])
        x = self.embed(ids) if self.table is None else F.embedding(ids, self.table)  # (B, E) or (B, G*H)
        out, state = self.recurrent(x, state)  # (B, H)
        if isinstance(self.head, nn.Linear):
            return torch.addmm(self.head_b, out, self.head_w_t), state
        with torch.no_grad():
            return self.head(out), state  # (B, V) log-probabilities
