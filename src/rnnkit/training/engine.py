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

import contextlib
import dataclasses
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
from rnnkit.runtime import SINGLE, Distributed, distributed, rank_rows, resolve_device, seed_everything, set_threads
from rnnkit.training.events import EndEvent, EvalEvent, Reporter, SampleEvent, SaveEvent, StartEvent, StepEvent
from rnnkit.training.session import MetricsLog, Resume, Session, StopFlag

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop,
              "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def build_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise RnnkitError(f"unknown optimizer {name!r} (choose: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def prepare_run(config: RunConfig) -> torch.device:
    """Threads, seeds and device for a training run of any task (every rank seeds alike: same initial weights)."""
    t = config.train
    set_threads(t.threads)
    seed_everything(t.seed)
    device = resolve_device(t.device)
    autocast_dtype(t.precision, device)  # refuse fp16 without CUDA before anything is built
    return device


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
    outputs: tuple[torch.Tensor, ...] = ()  # per-row results the task's metrics need (predictions, targets)


LossFn = Callable[[nn.Module, Any, "State | None", torch.device], Forward]


def batch_rows(batch: Any) -> int:
    """How many rows (sequences, texts) a batch holds: the first dimension of its first tensor."""
    return next(v for v in _fields(batch).values() if isinstance(v, torch.Tensor)).shape[0]


def slice_rows(batch: Any, rows: slice) -> Any:
    """The same batch with only ``rows`` of each of its (B, ...) tensors."""
    fields = {k: v[rows] for k, v in _fields(batch).items() if isinstance(v, torch.Tensor)}
    return dataclasses.replace(batch, **fields) if dataclasses.is_dataclass(batch) else batch._replace(**fields)


def _fields(batch: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(batch):
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return batch._asdict()  # a NamedTuple


class Plan:
    """How one optimizer step is computed: precision, this rank's share of the batch, micro-batches.

    ``--batch-size`` is the global batch. Every rank draws the same batch and takes
    its contiguous share of the rows; ``--grad-accum`` cuts that share into
    micro-batches. Each micro-batch's mean loss is weighted by its share of the
    global batch, so the summed gradient is the global batch's mean gradient on
    any number of ranks and micro-batches, and the all-reduce is a plain sum.
    """

    def __init__(self, *, precision: str, accum: int, device: torch.device, group: Distributed) -> None:
        self.group, self.accum, self.device = group, accum, device
        self.dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype is torch.float16 else None

    @property
    def simple(self) -> bool:
        return not self.group.active and self.accum == 1

    def parts(self, batch: Any) -> list[tuple[Any, slice, float]]:
        """``(micro-batch, its rows within this rank's share, its weight)``; empty micro-batches left out."""
        if self.simple:
            return [(batch, slice(None), 1.0)]
        total = batch_rows(batch)
        mine = rank_rows(total, self.group)
        size = mine.stop - mine.start
        parts = []
        for k in range(self.accum):
            lo, hi = size * k // self.accum, size * (k + 1) // self.accum
            if hi > lo:
                parts.append((slice_rows(batch, slice(mine.start + lo, mine.start + hi)), slice(lo, hi),
                              (hi - lo) / total))
        return parts

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def all_reduce(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """Sum the gradients and the loss over the ranks, in one message; returns the global loss."""
        if not self.group.active:
            return loss
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        return flat[-1]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skips the update if the scaled gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``--precision`` asks for on ``device`` (None: plain fp32)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise RnnkitError("--precision fp16 needs a CUDA GPU (its gradient scaler is CUDA-only); "
                          "use bf16 or fp32 on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16): else bf16 is emulated, slower."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def describe_device(device: torch.device, precision: str) -> str:
    """The device in words for the start line, with the autocast dtype when it is not plain fp32."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return str(device)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return f"{device}, {name} autocast (emulated: this CPU has no AMX or AVX512-BF16, expect it slower than fp32)"
    return f"{device}, {name} autocast"


SIMPLE_PLAN = Plan(precision="fp32", accum=1, device=torch.device("cpu"), group=SINGLE)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, carry: State | None, *,
               loss_fn: LossFn, clip: float, device: torch.device, plan: Plan = SIMPLE_PLAN) -> tuple[Forward, bool]:
    """One optimizer step on one batch; returns the forward pass and whether the update was applied."""
    # Random windows (batch.reset) start from zeros; sequential windows continue the previous
    # batch's streams, so carry its state but cut the graph behind it (truncated BPTT).
    state = None if batch.reset else detach_state(carry)
    optimizer.zero_grad(set_to_none=True)
    forwards = []
    for part, rows, weight in plan.parts(batch):
        with plan.autocast():
            forward = loss_fn(model, part, _rows(state, rows), device)
        plan.backward(forward.loss if weight == 1.0 else forward.loss * weight)
        forwards.append((forward, weight))
    forward = _merge(forwards, device)
    forward.loss = plan.all_reduce(model, forward.loss)  # several ranks: gradients and loss summed
    if plan.scaler is not None:
        plan.scaler.unscale_(optimizer)  # clip the true gradients
    # The norm is computed even without clipping (an infinite limit scales by exactly 1):
    # a NaN gradient must never reach the weights.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf, foreach=True)
    # fp16: an overflowing gradient is the scaler's business (it skips the step and lowers its scale).
    applied = bool(torch.isfinite(forward.loss) & (torch.isfinite(norm) | (plan.scaler is not None)))
    if applied:
        plan.step(optimizer)
    else:
        optimizer.zero_grad(set_to_none=True)
    return forward, applied


def _rows(state: State | None, rows: slice) -> State | None:
    return state if state is None or rows == slice(None) else tuple(s[:, rows] for s in state)


def _merge(forwards: list[tuple[Forward, float]], device: torch.device) -> Forward:
    """One Forward for a rank's micro-batches: the weighted loss, the states and outputs joined by rows."""
    if len(forwards) == 1 and forwards[0][1] == 1.0:
        forward = forwards[0][0]
        forward.loss = forward.loss.detach()
        return forward
    if not forwards:  # this rank's share of a small batch is empty: it adds nothing to the sum
        return Forward(loss=torch.zeros((), device=device))
    loss = sum(f.loss.detach().float() * w for f, w in forwards)
    states = [f.state for f, _ in forwards]
    state = None if states[0] is None else tuple(torch.cat(parts, dim=1) for parts in zip(*states, strict=True))
    outputs = tuple(torch.cat(parts) for parts in zip(*(f.outputs for f, _ in forwards), strict=True))
    return Forward(loss=loss, state=state, outputs=outputs)


class Schedule:
    """The learning rate of each step: warm-up, then constant, cosine, or the plateau decay's rate.

    The rate is a function of the step and the elapsed training time, both part of
    the trainer state, so a resumed run continues the schedule where it stopped.
    Cosine anneals over whichever budget binds first: the step budget (--max-steps,
    --epochs) or, by elapsed training time, --max-time. With the plateau schedule the
    decay (torch's ReduceLROnPlateau, at validations) owns the optimizer's rate and
    the warm-up scales it for the step only.
    """

    def __init__(self, t, *, max_steps: int) -> None:
        self.kind, self.warmup, self.lr, self.min_lr = t.lr_schedule, t.warmup, t.lr, t.min_lr
        self.max_steps, self.max_time = max_steps, t.max_time

    def factor(self, step: int, elapsed: float) -> float:
        """The multiplier on the optimizer's rate for the step after ``step`` steps."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        if self.kind != "cosine":
            return warm
        done = max(step / self.max_steps if self.max_steps else 0.0,
                   elapsed / self.max_time if self.max_time else 0.0)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return warm * (self.min_lr + (self.lr - self.min_lr) * cosine) / self.lr

    @contextlib.contextmanager
    def applied(self, optimizer: torch.optim.Optimizer, step: int, elapsed: float):
        """Run the optimizer step at the scheduled rate; the optimizer keeps its own (the plateau's) afterwards."""
        factor = self.factor(step, elapsed)
        if factor == 1.0:
            yield
            return
        bases = [group["lr"] for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            group["lr"] = base * factor
        try:
            yield
        finally:
            for group, base in zip(optimizer.param_groups, bases, strict=True):
                group["lr"] = base

    def rate(self, optimizer: torch.optim.Optimizer, step: int, elapsed: float) -> float:
        """The rate the next step will use (for the logs)."""
        return optimizer.param_groups[0]["lr"] * self.factor(step, elapsed)


@dataclass
class Validation:
    """What a task's validation found."""

    record: dict[str, Any]  # the metrics.jsonl record: step, time, lr and what the task measured
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
    group = distributed()
    # Rank 0 alone prints and writes; the others compute their share and stay quiet.
    reporter = (reporter or Reporter()) if group.main else Reporter()
    out_dir = Path(out_dir)
    config = task.config
    t = config.train
    device = prepare_run(config)
    plan = Plan(precision=t.precision, accum=t.grad_accum, device=device, group=group)
    model = task.build_model(device)
    optimizer = build_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    # seam: a learning-rate schedule (warm-up, cosine) steps here beside the plateau decay
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=t.lr_decay, patience=t.lr_patience)
                 if task.plateau_decay and t.lr_schedule == "plateau" else None)
    schedule = Schedule(t, max_steps=task.max_steps)
    session = Session(config=config, out_dir=out_dir, task=task.name, model=model, optimizer=optimizer,
                      tokenizer=task.tokenizer, scheduler=scheduler, generators=task.generators,
                      extra=task.checkpoint_extra, stop=stop, resume=resume, group=group, scaler=plan.scaler,
                      on_save=lambda path, names: reporter.on_save(SaveEvent(path=path, names=names)))
    for key, value in task.counters.items():
        session.progress.extra.setdefault(key, value)
    session.refuse_if_finished(task.finished(session))
    task.setup(session)

    # Everything is checked: only now does anything land on disk.
    if group.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    metrics = session.open_metrics()
    try:
        reporter.on_start(task.begin(session, metrics, out_dir))
        stopped_by = _loop(task, session, model, optimizer, scheduler, schedule, metrics, reporter, plan)
    finally:
        metrics.close()
        task.close()
    group.barrier()  # rank 0's last checkpoint is on disk before any rank reads it back
    end, result = task.finish(session, stopped_by, metrics)
    reporter.on_end(end)
    return result


def _loop(task: EngineTask, session: Session, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
          schedule: Schedule, metrics: MetricsLog, reporter: Reporter, plan: Plan) -> str:
    """Epochs of steps until a stop condition holds; returns which one."""
    t = task.config.train

    def validate() -> bool:
        """Validate, decay the learning rate on a plateau, save best/last, draw samples; True: stop early."""
        found = task.validate(session)
        record = found.record
        if scheduler is not None and found.plateau_loss is not None:
            scheduler.step(found.plateau_loss)
        reporter.on_eval(EvalEvent(step=session.step, record=record, improved=found.improved,
                                   headline=found.headline, summary=found.summary))
        metrics(record)
        session.save(("best", "last") if found.improved else ("last",), found.save_state)
        draw_samples()
        return found.early_stop

    def draw_samples() -> None:
        if session.group.main:  # the other ranks would only draw them to throw them away
            for sample in task.samples():
                reporter.on_sample(sample)

    model.train()
    stopped_by = session.stopped_by(task.max_steps)
    while stopped_by is None:
        if task.epoch_limit and not session.replaying and session.progress.epoch >= task.epoch_limit:
            return "epochs"
        if not session.replaying:
            task.begin_epoch(session)
        for batch in session.epochs(*task.epoch()):
            with schedule.applied(optimizer, session.step, session.elapsed()):
                forward, applied = train_step(model, optimizer, batch, session.carry, loss_fn=task.loss,
                                              clip=t.clip, device=plan.device, plan=plan)
            session.check_finite(applied, skip=t.on_nan == "skip")
            # A skipped batch leaves the weights alone, and the state it produced is not carried.
            session.carry = forward.state if applied else None if batch.reset else session.carry
            session.advance(task.tokens(batch))
            task.observe(batch, forward, applied)
            step = session.step
            session.lr = schedule.rate(optimizer, step - 1, session.elapsed())  # the rate this step ran at
            if step % t.log_every == 0 or step == task.max_steps:
                _log_progress(task, session, session.lr, metrics, reporter, batch, forward)
            task.after_step(session, batch, forward)
            stopped_by = session.step_end(task.max_steps)
            if stopped_by or (not task.validate_each_epoch and step % t.eval_every == 0):
                if validate():
                    stopped_by = "early stopping"
            elif t.sample_every and step % t.sample_every == 0:
                draw_samples()
            if stopped_by:
                break
            session.after_step()
        if task.validate_each_epoch and task.epoch_needs_validation(session) and validate():
            stopped_by = "early stopping"
    return stopped_by


def _log_progress(task: EngineTask, session: Session, lr: float, metrics: MetricsLog, reporter: Reporter,
                  batch: Any, forward: Forward) -> None:
    """One progress record (``lr``: the rate the step ran at) to metrics.jsonl and the reporter."""
    t = task.config.train
    record, rate, unit = task.progress(session, lr)
    if session.progress.skipped:
        record["skipped"] = session.progress.skipped
    metrics(record)
    reporter.on_step(StepEvent(step=record["step"], epoch=session.step / task.steps_per_epoch, time=record["time"],
                               loss=record["loss"], accuracy=record["accuracy"], lr=record["lr"], rate=rate,
                               rate_unit=unit, max_steps=task.max_steps, max_time=t.max_time,
                               example=task.example(batch, forward)))
