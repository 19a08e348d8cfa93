"""Generated sequence tasks: the "echo" task and its k-ary and long-delay variants.

The echo task (Erik Hallström's classic TensorFlow tutorial): a random series of
symbols ``x`` and a target ``y`` that is ``x`` shifted right by ``echo_step``
places, zeros first, so the network must remember what it saw ``echo_step``
steps ago. The series is reshaped into ``batch_size`` rows, each row read left
to right in windows of ``bptt`` steps; the hidden state is carried from one
window to the next (truncated backprop through time) and reset when a new
series starts, i.e. at each epoch.

Variants, all from the same generator:

* binary echo: ``symbols = 2`` (the classic);
* k-ary echo: ``symbols = k``, symbols 0..k-1;
* delayed copy: a delay longer than the window (``echo_step > bptt``). Gradients
  never cross a window edge, so the network cannot learn to carry a symbol
  that far; accuracy stays near chance (1/k). That is the lesson of the variant.

Every row starts in the middle of the series (except the first), so its first
``echo_step`` targets echo symbols the network never saw. Accuracy is measured
on the later steps of each row only (:func:`scored_mask`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from rnnkit.data.batching import Batch
from rnnkit.errors import RnnkitError

#: Characters that stand for symbols 0..35 in a checkpoint's tokenizer and in plots.
SYMBOL_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"


def echo_series(length: int, *, echo_step: int, symbols: int = 2,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random series (length,) of symbols and its echo: ``y[t] = x[t - echo_step]``, zeros first."""
    if not 2 <= symbols <= len(SYMBOL_CHARS):
        raise RnnkitError(f"'data.symbols' must be between 2 and {len(SYMBOL_CHARS)}, got {symbols}")
    if echo_step < 1:
        raise RnnkitError(f"'data.echo_step' must be at least 1, got {echo_step}")
    x = rng.integers(0, symbols, size=length, dtype=np.int64)
    y = np.zeros_like(x)
    y[echo_step:] = x[: length - echo_step]
    return x, y


def scored_mask(batch: EchoBatch, echo_step: int) -> torch.Tensor:
    """(B, T) bool: the steps whose target echoes a symbol of the same row."""
    columns = batch.offset + torch.arange(batch.x.shape[1])
    return (columns >= echo_step).unsqueeze(0).expand_as(batch.x)


@dataclass
class EchoBatch(Batch):
    offset: int = 0  # the window's first column within its row


class EchoStreams:
    """One fresh series per epoch, cut into ``batch_size`` rows read in windows of ``bptt``.

    ``reset`` is True for the first window of every series: the state starts at
    zero there and is carried (detached) through the rest of the epoch.
    """

    def __init__(self, *, series_length: int, echo_step: int, symbols: int, batch_size: int, bptt: int,
                 seed: int = 0) -> None:
        row = series_length // batch_size
        if row < bptt:
            raise RnnkitError(
                f"a series of {series_length} steps in {batch_size} rows gives rows of {row} steps, shorter "
                f"than one window of {bptt}; raise --series-length or lower --batch-size/--bptt"
            )
        self.series_length, self.echo_step, self.symbols = series_length, echo_step, symbols
        self.batch_size, self.bptt = batch_size, bptt
        self.rng = np.random.default_rng(seed)
        self.steps_per_epoch = row // bptt

    def series(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A new series as (B, steps_per_epoch * bptt) inputs and targets (the tail that fits no window is cut)."""
        x, y = echo_series(self.series_length, echo_step=self.echo_step, symbols=self.symbols, rng=self.rng)
        row = self.series_length // self.batch_size
        used = self.steps_per_epoch * self.bptt
        # Row b holds steps [b*row, (b+1)*row) of the series, as in the classic reshape.
        x = torch.from_numpy(x[: row * self.batch_size].reshape(self.batch_size, row)[:, :used])
        y = torch.from_numpy(y[: row * self.batch_size].reshape(self.batch_size, row)[:, :used])
        return x, y

    def epoch(self) -> Iterator[EchoBatch]:
        """The windows of a fresh series."""
        return self.windows(*self.series())

    def windows(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[EchoBatch]:
        """Windows of ``bptt`` steps over (B, N) inputs and targets, left to right."""
        for start in range(0, x.shape[1], self.bptt):
            end = start + self.bptt
            yield EchoBatch(x=x[:, start:end].contiguous(), y=y[:, start:end].contiguous(), reset=start == 0,
                            offset=start)


def streams_for(config, *, seed: int) -> EchoStreams:
    """The echo streams a run's configuration (a :class:`~rnnkit.config.RunConfig`) describes."""
    d = config.data
    return EchoStreams(series_length=d.series_length, echo_step=d.echo_step, symbols=d.symbols,
                       batch_size=d.batch_size, bptt=d.seq_len, seed=seed)
