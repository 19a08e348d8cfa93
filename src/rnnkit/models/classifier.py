"""Sequence classifier: token ids -> embedding -> recurrent layers -> pooled -> class logits.

Inputs are post-padded with ``pad_id`` (one id past the tokenizer's
vocabulary). Padding never changes a result: the forward direction reads the
real tokens first, the backward direction reads each sequence reversed within
its own length, and pooling ignores padded positions. Two classes use one
logit (a sigmoid head); ``forward`` still returns (B, 2) logits ``[0, z]`` so
that softmax gives exactly the sigmoid probabilities and every caller treats
two classes like any other number.

Dropout (``config.dropout``) falls on every recurrent layer's input (the
embedding, then each layer's output) and, with ``dropout_at="input+head"``,
also on the pooled state before the head; ``dropout_at="input"`` is Keras's
``SimpleRNNCell(dropout=...)``, which drops a cell's input and nothing else.
``dropout_mask="sequence"`` draws one mask per text and feature and keeps it
for every time step, as Keras's recurrent cells do; ``"element"`` draws a
fresh one for every element.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.config import ModelConfig
from rnnkit.models.recurrent import Recurrent


def _reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of every row of (B, T, D); padding stays in place."""
    t = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    index = torch.where(t < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - t, t)  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class Classifier(nn.Module):
    """``forward(ids, state=None) -> (logits, None)`` with ids (B, T) and logits (B, num_classes)."""

    def __init__(self, *, config: ModelConfig, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError("a classifier needs at least two classes")
        self.config = config
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.pad_id = vocab_size  # one past the tokenizer's ids
        dim = config.embedding_dim or config.hidden
        self.embedding = nn.Embedding(vocab_size + 1, dim, padding_idx=self.pad_id)
        directions = 2 if config.bidirectional else 1
        self.forward_layers = nn.ModuleList()
        self.backward_layers = nn.ModuleList()
        size = dim
        for _ in range(config.layers):
            self.forward_layers.append(self._layer(size))
            if config.bidirectional:
                self.backward_layers.append(self._layer(size))
            size = config.hidden * directions
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(size, 1 if num_classes == 2 else num_classes)
        if config.init == "keras":  # Keras's Embedding and Dense defaults (the layers took theirs in _layer)
            with torch.no_grad():
                nn.init.uniform_(self.embedding.weight, -0.05, 0.05)
                self.embedding.weight[self.pad_id] = 0.0  # padding stays a zero vector
                nn.init.xavier_uniform_(self.head.weight)
                nn.init.zeros_(self.head.bias)

    def _layer(self, input_size: int) -> Recurrent:
        return Recurrent(cell=self.config.cell, input_size=input_size, hidden=self.config.hidden, layers=1,
                         nonlinearity=self.config.nonlinearity, backend=self.config.backend, init=self.config.init,
                         scan=self.config.scan)

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).sum(dim=1).clamp(min=1)  # (B,)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, H * directions)."""
        lengths = self.lengths(ids)
        x = self._drop_input(self.embedding(ids))  # (B, T, E)
        for n, layer in enumerate(self.forward_layers):
            out, _ = layer(x)  # (B, T, H): causal, so padding after the tokens cannot reach them
            if self.config.bidirectional:
                back, _ = self.backward_layers[n](_reverse_within_length(x, lengths))
                out = torch.cat([out, _reverse_within_length(back, lengths)], dim=-1)  # (B, T, 2H)
            x = self._drop_input(out) if n < len(self.forward_layers) - 1 else out
        return self._pool(x, lengths)

    def _drop_input(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout on a recurrent layer's input x (B, T, D)."""
        if self.config.dropout_mask == "element" or not self.training or self.config.dropout == 0:
            return self.dropout(x)
        keep = 1.0 - self.config.dropout
        mask = torch.empty(x.shape[0], 1, x.shape[2], device=x.device, dtype=x.dtype).bernoulli_(keep)  # (B, 1, D)
        return x * mask / keep  # the same features dropped at every time step of a text

    def _pool(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(out.shape[1], device=out.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        pooling = self.config.pooling
        if pooling == "mean":
            return (out * mask.unsqueeze(-1)).sum(1) / lengths.unsqueeze(1).to(out.dtype)
        if pooling == "max":
            return out.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values
        # last: the forward direction's output at the last real token; the backward
        # direction's final output sits at position 0 after re-reversal.
        h = self.config.hidden
        last = out[torch.arange(out.shape[0], device=out.device), lengths - 1]  # (B, dirs*H)
        if self.config.bidirectional:
            return torch.cat([last[:, :h], out[:, 0, h:]], dim=-1)
        return last

    def forward(self, ids: torch.Tensor, state=None) -> tuple[torch.Tensor, None]:
        pooled = self.encode(ids)  # (B, H * directions)
        if self.config.dropout_at == "input+head":
            pooled = self.dropout(pooled)
        z = self.head(pooled)  # (B, 1) or (B, C)
        if self.num_classes == 2:
            z = torch.cat([torch.zeros_like(z), z], dim=-1)  # softmax([0, z]) == [1 - sigmoid(z), sigmoid(z)]
        return z, None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
