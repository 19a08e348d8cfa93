"""Language model: token ids -> (embedding | one-hot) -> recurrent stack -> next-token logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import ModelConfig
from rnnkit.models.recurrent import Recurrent, State


class LanguageModel(nn.Module):
    """``forward(ids, state=None) -> (logits, state)``; ids (B, T), logits (B, T, V)."""

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
        self.recurrent = Recurrent(
            cell=config.cell,
            input_size=input_size,
            hidden=config.hidden,
            layers=config.layers,
            dropout=config.dropout,
            nonlinearity=config.nonlinearity,
            backend=config.backend,
            init=config.init,
        )
        self.dropout = nn.Dropout(config.dropout)
        self._table: tuple | None = None  # (weight versions, (V, G*H) projected inputs) for one-token steps
        # The table replaces W_ih (G*H, E) in memory traffic; worth it when it is no bigger (V <= E).
        self._use_table = self.recurrent.steps_from_projection and vocab_size <= input_size
        self.head = nn.Linear(config.hidden, vocab_size)
        if config.init == "normal":  # d2l: output weights from N(0, 0.01^2) too, bias zero
            nn.init.normal_(self.head.weight, 0.0, 0.01)
            nn.init.zeros_(self.head.bias)
        if config.init == "keras":  # Keras's Embedding and Dense defaults (the recurrent stack took its own)
            if self.embedding is not None:
                nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
            nn.init.xavier_uniform_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if config.tie_weights:
            assert self.embedding is not None and self.embedding.weight.shape == self.head.weight.shape
            self.head.weight = self.embedding.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            return self.embedding(ids)  # (B, T, E)
        return F.one_hot(ids, self.vocab_size).to(self.head.weight.dtype)  # (B, T, V)

    def step_fn(self) -> Callable[[torch.Tensor, State], tuple[torch.Tensor, State]]:
        """``run(ids, state) -> (logits, state)`` for one token per row, ids (B,), logits (B, V), eval only.

        The weights (and the input table) are bound once, so a generation loop pays
        the cache checks once per text instead of once per token; bind again after
        the weights change.
        """
        head_b, head_w_t = self.head.bias, self.head.weight.t()  # (V,), (H, V) a transposed view
        if self._use_table:
            run, table = self.recurrent.step_fn(projected=True), self._input_table()

            def step(ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
                out, state = run(F.embedding(ids, table), state)  # (B, H)
                return torch.addmm(head_b, out, head_w_t), state
        else:
            run = self.recurrent.step_fn()

            def step(ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
                out, state = run(self.embed(ids), state)  # (B, H)
                return torch.addmm(head_b, out, head_w_t), state

        return step

    def _input_table(self) -> torch.Tensor:
        """(V, G*H): layer 0's ``W_ih x + b_ih + b_hh`` for every token, cached while the weights stay."""
        w_ih, _, b_ih, b_hh = self.recurrent.layer_weights(0)
        sources = (w_ih, b_ih, b_hh) + ((self.embedding.weight,) if self.embedding is not None else ())
        key = tuple((w.data_ptr(), w._version) for w in sources)
        cached = self._table
        if cached is None or cached[0] != key:
            with torch.no_grad():
                inputs = self.embedding.weight if self.embedding is not None else None  # (V, E), or one-hot
                table = (w_ih.t() if inputs is None else inputs @ w_ih.t()) + (b_ih + b_hh)  # (V, G*H)
            cached = (key, table.contiguous())
            self._table = cached  # published whole: safe for threads sharing the model
        return cached[1]

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if (ids.shape[1] == 1 and state is not None and not self.training and not torch.is_grad_enabled()
                and self._use_table):
            # Generation: one token per row, so layer 0's input product is a table lookup.
            logits, state = self.step_fn()(ids[:, 0], state)
            return logits.unsqueeze(1), state
        x = self.dropout(self.embed(ids))
        out, state = self.recurrent(x, state)  # (B, T, H)
        return self.head(self.dropout(out)), state

    def initial_state(self, batch_size: int) -> State:
        return self.recurrent.initial_state(batch_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
