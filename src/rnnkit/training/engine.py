"""The training engine: one loop that trains every task.

A task (language model, classifier, echo, ...; see :class:`EngineTask`)
supplies its model, its batches and their replayable position, the loss and
metrics of a batch, its validation and what its events say. The engine owns
everything else: device, threads and seeds, the optimizer and the
learning-rate decay, the step (carry and detach the state, forward, loss,
backward, clip, non-finite guard, optimizer step), validation every
``eval_every`` steps (or each epoch), best/last checkpoints, stop conditions,
signals, periodic saves, exact resume and ``metrics.jsonl`` (the last five
through :class:`~rnnkit.training.session.Session`).

Seams for what comes next are marked ``# seam:``: gradient accumulation and a
distributed wrapper around the backward pass, autocast around the forward,
a learning-rate schedule beside the plateau decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.models.recurrent import State, detach_state
from rnnkit.runtime import resolve_device, seed_everything, set_threads
from rnnkit.training.events import EndEvent, EvalEvent, Reporter, SampleEvent, SaveEvent, StartEvent, StepEvent
from rnnkit.training.session import MetricsLog, Resume, Session, StopFlag

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
              "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def build_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise RnnkitError(f"unknown optimizer {name!r} (choose: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def prepare_run(config: RunConfig) -> torch.device:
    """Threads, seeds and device for a training run of any task."""
    t = config.train
    set_threads(t.threads)
    seed_everything(t.seed)
    return resolve_device(t.device)


def step_budget(t, steps_per_epoch: int) -> int:
    """The step limit from --max-steps and --epochs (0: none, so --max-time decides)."""
    max_steps = t.max_steps
    if t.epochs:
        epoch_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
        max_steps = min(max_steps, epoch_steps) if max_steps else epoch_steps
    if not max_steps and not t.max_time:
        max_steps = steps_per_epoch  # nothing said: one pass over the data
    return max_steps


@dataclass
class Forward:
    """What a task's loss function returns for one batch."""

    loss: torch.Tensor  # () the mean loss to backpropagate
    state: State | None = None  # the recurrent state to carry into the next batch (None: nothing to carry)
    outputs: Any = None  # whatever the task's metrics need (logits, targets, ...)


LossFn = Callable[[nn.Module, Any, "State | None", torch.device], Forward]


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, carry: State | None, *,
               loss_fn: LossFn, clip: float, device: torch.device) -> tuple[Forward, bool]:
    """One optimizer step on one batch; returns the forward pass and whether the update was applied."""
    # Random windows (batch.reset) start from zeros; sequential windows continue the previous
    # batch's streams, so carry its state but cut the graph behind it (truncated BPTT).
    state = None if batch.reset else detach_state(carry)
    forward = loss_fn(model, batch, state, device)  # seam: autocast goes around the forward
    optimizer.zero_grad(set_to_none=True)
    forward.loss.backward()  # seam: gradient accumulation and DDP's all-reduce
    # The norm is computed even without clipping (an infinite limit scales by exactly 1):
    # a NaN gradient must never reach the weights.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf, foreach=True)
    applied = bool(torch.isfinite(forward.loss.detach()) & torch.isfinite(norm))
    if applied:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return forward, applied


@dataclass
class Validation:
    """What a task's validation found."""

    record: dict[str, Any]  # the metrics.jsonl record (step, time and lr are filled in already)
    improved: bool  # a new best: the best checkpoint moves here
    headline: str  # "step 500", "epoch 3"
    summary: str | None  # the console line after the headline; None: nothing to show
    plateau_loss: float | None = None  # feeds the learning-rate decay on a plateau
    save_state: dict[str, Any] | None = None  # extra facts for the checkpoint's config.json
    early_stop: bool = False  # the task asks to end the run here


class EngineTask(Protocol):
    """What a task gives the engine. See ``training/lm.py`` for the fullest example."""

    name: str  # the registry name, written into checkpoints
    config: RunConfig
    tokenizer: Tokenizer
    steps_per_epoch: int
    max_steps: int  # 0: no step limit (--max-time decides)
    epoch_limit: int  # stop after this many epochs (0: the step budget decides)
    plateau_decay: bool  # decay the learning rate when validation stops improving
    validate_each_epoch: bool  # validate at each epoch's end (else every train.eval_every steps)
    generators: dict[str, torch.Generator]  # RNGs of the task's own, saved and restored on resume
    checkpoint_extra: dict[str, Any]  # task facts for config.json (a classifier's labels)
    counters: dict[str, Any]  # the task's counters in the trainer state, with their starting values

    def build_model(self, device: torch.device) -> nn.Module: ...

    def setup(self, session: Session) -> None:
        """Once the model and trainer state exist and the run has steps to go, before anything is written."""

    def begin(self, session: Session, metrics: MetricsLog, out_dir: Path) -> StartEvent:
        """Write the task's files (data cache), start its meters; say what the run is."""

    def finished(self, session: Session) -> str | None:
        """Why a resumed run has nothing left to do (None: it has)."""

    def epoch(self) -> tuple[Callable[[], Iterator[Any]], Callable[[], dict], Callable[[dict], None]]:
        """``(make_epoch, get_state, set_state)``: an epoch's batches and what decides their draws."""

    def begin_epoch(self, session: Session) -> None: ...

    def loss(self, model: nn.Module, batch: Any, state: State | None, device: torch.device) -> Forward: ...

    def tokens(self, batch: Any) -> int:
        """How many tokens a batch counts for (the token counter and the rate)."""

    def observe(self, batch: Any, forward: Forward, applied: bool) -> None:
        """Add a step to the running metrics (a skipped step's loss says nothing about the model)."""

    def progress(self, session: Session, lr: float) -> tuple[dict[str, Any], float, str]:
        """The progress record since the last one, its rate and the rate's unit; restart the meters."""

    def example(self, batch: Any, forward: Forward) -> str | None: ...

    def after_step(self, session: Session, batch: Any, forward: Forward) -> None:
        """Per-step extras (the echo task's live plot)."""

    def validate(self, session: Session) -> Validation: ...

    def samples(self) -> list[SampleEvent]: ...

    def epoch_needs_validation(self, session: Session) -> bool: ...

    def finish(self, session: Session, stopped_by: str, metrics: MetricsLog) -> tuple[EndEvent, Any]:
        """After the loop: the end event and the task's result object."""

    def close(self) -> None: ...


def train(task: EngineTask, *, out_dir: str | Path, reporter: Reporter | None = None, stop: StopFlag | None = None,
          resume: Resume | None = None) -> Any:
    """Run ``task`` to its stop condition, writing checkpoints and metrics to ``out_dir``; returns its result.

    ``stop`` (set by a signal handler) makes the loop save and raise
    :class:`~rnnkit.training.session.Stopped` at the next step boundary;
    ``resume`` continues a saved run exactly where it stopped.
    """
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    config = task.config
    t = config.train
    device = prepare_run(config)
    model = task.build_model(device)
    optimizer = build_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # seam: a learning-rate schedule (warm-up, cosine) steps here beside the plateau decay
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=t.lr_decay, patience=t.lr_patience)
                 if task.plateau_decay else None)
    session = Session(config=config, out_dir=out_dir, task=task.name, model=model, optimizer=optimizer,
                      tokenizer=task.tokenizer, scheduler=scheduler, generators=task.generators,
                      extra=task.checkpoint_extra, stop=stop, resume=resume,
                      on_save=lambda path, names: reporter.on_save(SaveEvent(path=path, names=names)))
    for key, value in task.counters.items():
        session.progress.extra.setdefault(key, value)
    session.refuse_if_finished(task.finished(session))
    task.setup(session)

    # Everything is checked: only now does anything land on disk.
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = session.open_metrics()
    try:
        reporter.on_start(task.begin(session, metrics, out_dir))
        stopped_by = _loop(task, session, model, optimizer, scheduler, metrics, reporter, device)
    finally:
        metrics.close()
        task.close()
    end, result = task.finish(session, stopped_by, metrics)
    reporter.on_end(end)
    return result


def _loop(task: EngineTask, session: Session, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
          metrics: MetricsLog, reporter: Reporter, device: torch.device) -> str:
    """Epochs of steps until a stop condition holds; returns which one."""
    t = task.config.train

    def validate() -> bool:
        """Validate, decay the learning rate on a plateau, save best/last, draw samples; True: stop early."""
        found = task.validate(session)
        record = {"step": session.step, "time": round(session.elapsed(), 3),
                  "lr": optimizer.param_groups[0]["lr"], **found.record}
        if scheduler is not None and found.plateau_loss is not None:
            scheduler.step(found.plateau_loss)
        reporter.on_eval(EvalEvent(step=session.step, record=record, improved=found.improved,
                                   headline=found.headline, summary=found.summary))
        metrics(record)
        session.save(("best", "last") if found.improved else ("last",), found.save_state)
        for sample in task.samples():
            reporter.on_sample(sample)
        return found.early_stop

    model.train()
    stopped_by = session.stopped_by(task.max_steps)
    while stopped_by is None:
        if task.epoch_limit and not session.replaying and session.progress.epoch >= task.epoch_limit:
            return "epochs"
        if not session.replaying:
            task.begin_epoch(session)
        for batch in session.epochs(*task.epoch()):
            forward, applied = train_step(model, optimizer, batch, session.carry, loss_fn=task.loss, clip=t.clip,
                                          device=device)
            session.check_finite(applied, skip=t.on_nan == "skip")
            # A skipped batch leaves the weights alone, and the state it produced is not carried.
            session.carry = forward.state if applied else None if batch.reset else session.carry
            session.advance(task.tokens(batch))
            task.observe(batch, forward, applied)
            step = session.step
            if step % t.log_every == 0 or step == task.max_steps:
                _log_progress(task, session, optimizer, metrics, reporter, batch, forward)
            task.after_step(session, batch, forward)
            stopped_by = session.stopped_by(task.max_steps)
            if stopped_by or (not task.validate_each_epoch and step % t.eval_every == 0):
                if validate():
                    stopped_by = "early stopping"
            elif t.sample_every and step % t.sample_every == 0:
                for sample in task.samples():
                    reporter.on_sample(sample)
            if stopped_by:
                break
            session.after_step()
        if task.validate_each_epoch and task.epoch_needs_validation(session) and validate():
            stopped_by = "early stopping"
    return stopped_by


def _log_progress(task: EngineTask, session: Session, optimizer: torch.optim.Optimizer, metrics: MetricsLog,
                  reporter: Reporter, batch: Any, forward: Forward) -> None:
    """One progress record to metrics.jsonl and the reporter."""
    t = task.config.train
    record, rate, unit = task.progress(session, optimizer.param_groups[0]["lr"])
    if session.progress.skipped:
        record["skipped"] = session.progress.skipped
    metrics(record)
    reporter.on_step(StepEvent(step=record["step"], epoch=session.step / task.steps_per_epoch, time=record["time"],
                               loss=record["loss"], accuracy=record["accuracy"], lr=record["lr"], rate=rate,
                               rate_unit=unit, max_steps=task.max_steps, max_time=t.max_time,
                               example=task.example(batch, forward)))
