"""What a training run tells its reporter: typed events, one class per kind.

The engine sends them in this order: one :class:`StartEvent`, then per step
maybe a :class:`StepEvent` (every ``log_every`` steps), an :class:`EvalEvent`
at each validation, :class:`SampleEvent` for generated samples and
:class:`SaveEvent` for each checkpoint written, and one :class:`EndEvent`.
Each task fills the same fields; the console prints them without knowing
which task ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StartEvent:
    device: str
    parameters: int
    vocab_size: int
    train_size: int  # training tokens, examples or series steps (see ``unit``)
    val_size: int
    unit: str  # what train_size/val_size count: "tokens", "examples", "steps per series"
    steps_per_epoch: int
    max_steps: int  # 0: no step limit
    max_time: float  # 0: no time limit
    source: str  # the data, in words
    from_cache: bool  # the encoded ids came from the run's data cache
    resumed_at: int | None  # the step a resumed run continues from


@dataclass(frozen=True)
class StepEvent:
    """A progress record: training loss and accuracy since the previous one."""

    step: int
    epoch: float  # steps / steps per epoch
    time: float  # training seconds so far
    loss: float
    accuracy: float
    lr: float
    rate: float  # tokens/s, or examples/s for a classifier
    rate_unit: str  # "tok/s" or "examples/s"
    max_steps: int
    max_time: float
    example: str | None = None  # many-to-one models: "[window] -> [target] vs [guess]"


@dataclass(frozen=True)
class EvalEvent:
    """A validation: the metrics record and the task's one-line summary of it."""

    step: int
    record: dict[str, Any]  # as written to metrics.jsonl
    improved: bool  # the best checkpoint was replaced
    headline: str  # "step 500", "epoch 3"
    summary: str | None  # "validation loss 1.2345  perplexity 3.44 ..."; None: nothing to show


@dataclass(frozen=True)
class SampleEvent:
    prefix: str
    text: str  # prefix and continuation


@dataclass(frozen=True)
class SaveEvent:
    path: Path  # the checkpoint folder
    names: tuple[str, ...]  # which of best/last now point at it


@dataclass(frozen=True)
class EndEvent:
    step: int
    tokens: int  # 0 where tokens are not what the task counts
    seconds: float
    stopped_by: str  # "steps", "time", "epochs", "early stopping"
    best: tuple[str, float] | None = None  # e.g. ("validation loss", 1.23): the run's best validation figure


class Reporter:
    """Receives training events; the default ignores them all. The CLI's prints them."""

    def on_start(self, event: StartEvent) -> None: ...

    def on_step(self, event: StepEvent) -> None: ...

    def on_eval(self, event: EvalEvent) -> None: ...

    def on_sample(self, event: SampleEvent) -> None: ...

    def on_save(self, event: SaveEvent) -> None: ...

    def on_end(self, event: EndEvent) -> None: ...
