"""Batchers for language modelling: random windows and sequential TBPTT streams.

Both yield :class:`Batch` objects with inputs ``x`` of shape (B, T) and
targets ``y``: (B, T) for many-to-many training (every next token), or (B,)
for many-to-one (only the window's last next token). ``reset`` tells the
training loop whether to start from a zero state (random windows, or the
first window of a sequential epoch) or to carry the previous batch's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rnnkit.errors import RnnkitError

Target = Literal["all", "last"]


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) int64 input ids
    y: torch.Tensor  # (B, T) next ids, or (B,) with target="last"
    reset: bool  # True: start from a zero state; False: carry the previous state


def _check_length(n_tokens: int, seq_len: int, what: str) -> None:
    if n_tokens < seq_len + 1:
        raise RnnkitError(
            f"the {what} text has {n_tokens} tokens, fewer than one window of {seq_len} + 1; "
            "use a longer text or a smaller --seq-len"
        )


def _targets(x_and_next: np.ndarray, target: Target) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, T+1) windows into inputs (B, T) and targets."""
    window = torch.from_numpy(x_and_next.astype(np.int64))
    x = window[:, :-1]
    y = window[:, 1:] if target == "all" else window[:, -1]
    return x.contiguous(), y.contiguous()


class RandomWindows:
    """Independent windows at uniformly random offsets; the state resets every batch."""

    def __init__(
        self,
        ids: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        target: Target = "all",
        seed: int = 0,
    ) -> None:
        _check_length(len(ids), seq_len, "training")
        self.ids = ids
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.target = target
        self.rng = np.random.default_rng(seed)
        # An "epoch" is as many batches as it takes to predict every token once on average:
        # a window gives T targets (many-to-many) or just one (many-to-one).
        targets_per_window = seq_len if target == "all" else 1
        self.steps_per_epoch = max(1, (len(ids) - 1) // (targets_per_window * batch_size))
        self._offsets = np.arange(seq_len + 1)

    def batch(self) -> Batch:
        starts = self.rng.integers(0, len(self.ids) - self.seq_len, size=self.batch_size)
        windows = self.ids[starts[:, None] + self._offsets]  # (B, T+1)
        x, y = _targets(windows, self.target)
        return Batch(x=x, y=y, reset=True)

    def epoch(self) -> Iterator[Batch]:
        for _ in range(self.steps_per_epoch):
            yield self.batch()


class SequentialStreams:
    """The text cut into B parallel streams, read in consecutive windows of T.

    Stream b holds tokens [b * L, (b + 1) * L + 1) for L = (N - 1) // B, so
    window k of every stream continues window k - 1 exactly and the hidden
    state can be carried across batches (truncated backprop through time).
    """

    def __init__(
        self,
        ids: np.ndarray,
        *,
        seq_len: int,
        batch_size: int,
        target: Target = "all",
    ) -> None:
        stream_len = (len(ids) - 1) // batch_size
        if stream_len < seq_len:
            raise RnnkitError(
                f"the text has {len(ids)} tokens: too few for {batch_size} streams of at least "
                f"{seq_len} + 1; use a longer text, a smaller --batch-size or a smaller --seq-len"
            )
        self.ids = ids
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.target = target
        self.stream_len = stream_len
        self.steps_per_epoch = stream_len // seq_len
        self._starts = np.arange(batch_size) * stream_len
        self._offsets = np.arange(seq_len + 1)

    def window(self, k: int) -> Batch:
        """Window ``k`` (0-based) of every stream."""
        index = self._starts[:, None] + k * self.seq_len + self._offsets  # (B, T+1)
        x, y = _targets(self.ids[index], self.target)
        return Batch(x=x, y=y, reset=k == 0)

    def epoch(self) -> Iterator[Batch]:
        for k in range(self.steps_per_epoch):
            yield self.window(k)


def make_batcher(
    ids: np.ndarray,
    *,
    sampling: str,
    seq_len: int,
    batch_size: int,
    target: Target = "all",
    seed: int = 0,
) -> RandomWindows | SequentialStreams:
    if sampling == "random":
        return RandomWindows(ids, seq_len=seq_len, batch_size=batch_size, target=target, seed=seed)
    if sampling == "sequential":
        return SequentialStreams(ids, seq_len=seq_len, batch_size=batch_size, target=target)
    raise RnnkitError(f"unknown sampling {sampling!r} (choose: random, sequential)")
