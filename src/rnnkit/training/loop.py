"""The training loop for language models: visible, and the model knows nothing about it.

One step: take a batch; start from a zero state or carry the previous one
(detached, so gradients stop at the window edge: truncated BPTT); forward;
cross-entropy on every next token (or only the last); backward; clip the
global gradient norm; optimizer step. Every ``eval_every`` steps and at the
end the model is validated, the learning rate may decay on a plateau, the
best and last checkpoints are written and samples are drawn. A
:class:`Reporter` receives every event; the loop itself prints nothing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import RunConfig, generation_window
from rnnkit.data.batching import Batch, make_batcher
from rnnkit.data.lm_data import LMData, save_lm_cache
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.generation import generate_ids
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import State, detach_state
from rnnkit.runtime import resolve_device, seed_everything, set_threads
from rnnkit.training.evaluate import evaluate_lm
from rnnkit.training.metrics import lm_metrics
from rnnkit.training.session import (
    Resume,
    Session,
    StopFlag,
    no_data_state,
    numpy_rng_accessors,
    optimizer_step,
)

TASK = "language_model"


class Reporter:
    """Receives training events; the default ignores them all. The CLI's prints them."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, info: dict[str, Any]) -> None: ...

    def on_eval(self, info: dict[str, Any]) -> None: ...

    def on_sample(self, prefix: str, text: str) -> None: ...

    def on_save(self, path: Path, names: tuple[str, ...]) -> None: ...

    def on_end(self, info: dict[str, Any]) -> None: ...


def prepare_run(config: RunConfig) -> torch.device:
    """Threads, seeds and device for a training run of any task."""
    t = config.train
    set_threads(t.threads)
    seed_everything(t.seed)
    return resolve_device(t.device)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    best_val_loss: float | None
    last_val_loss: float | None
    train_loss: float | None
    stopped_by: str
    train_accuracy: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def build_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise RnnkitError(f"unknown optimizer {name!r} (choose: adam, adamw, rmsprop, sgd, adagrad)")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; targets (B, T) score every position, (B,) only the last."""
    if targets.dim() == 1:
        return F.cross_entropy(logits[:, -1], targets)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class StepOutput:
    loss: torch.Tensor  # () mean loss of the batch, detached
    correct: torch.Tensor  # () how many targets the argmax got right
    count: int  # how many targets
    predicted: torch.Tensor  # (B,) argmax at the last position, for the example line
    state: State
    predictions: torch.Tensor | None = None  # (B, T) argmax at every position (many-to-many only)
    applied: bool = True  # False: the loss or gradient was not finite, the weights were left alone


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    state: State | None,
    *,
    clip: float,
    device: torch.device,
) -> StepOutput:
    """One optimizer step on one batch; returns the loss, accuracy counts and the state to carry."""
    x = batch.x.to(device, non_blocking=True)
    y = batch.y.to(device, non_blocking=True)
    # Random windows start from zeros; sequential windows continue the previous
    # batch's streams, so carry its state but cut the graph behind it (TBPTT).
    state = None if batch.reset else detach_state(state)
    logits, state = model(x, state)
    loss = lm_loss(logits, y)
    applied = bool(optimizer_step(model, optimizer, loss, clip=clip))
    with torch.no_grad():
        scored = logits[:, -1] if y.dim() == 1 else logits  # (B, V) or (B, T, V)
        predicted = scored.argmax(dim=-1)
        correct = (predicted == y).sum()
    if y.dim() == 1:
        return StepOutput(loss=loss.detach(), correct=correct, count=y.numel(), predicted=predicted, state=state,
                          applied=applied)
    return StepOutput(loss=loss.detach(), correct=correct, count=y.numel(), predicted=predicted[:, -1],
                      state=state, predictions=predicted, applied=applied)


def step_budget(t, steps_per_epoch: int) -> int:
    """The step limit from --max-steps and --epochs (0: none, so --max-time decides)."""
    max_steps = t.max_steps
    if t.epochs:
        epoch_steps = max(1, math.ceil(t.epochs * steps_per_epoch))
        max_steps = min(max_steps, epoch_steps) if max_steps else epoch_steps
    if not max_steps and not t.max_time:
        max_steps = steps_per_epoch  # nothing said: one pass over the data
    return max_steps


def _default_prefixes(data: LMData) -> list[str]:
    """A newline for text with line breaks in its vocabulary, else the training text's first tokens."""
    tok = data.tokenizer
    if tok.kind == "char" and len(tok.encode("\n", unknown="skip")):
        return ["\n"]
    return [tok.decode(data.train[: min(3, len(data.train))].tolist())]


def _example(tokenizer: Tokenizer, batch: Batch, predicted: torch.Tensor) -> str:
    """``[had a general] -> [council] vs [council]``: the window, its target and the guess."""
    window = tokenizer.decode(batch.x[0, -8:].tolist())
    target = batch.y[0] if batch.y.dim() == 1 else batch.y[0, -1]
    return f"[{window}] -> [{tokenizer.decode([int(target)])}] vs [{tokenizer.decode([int(predicted[0])])}]"


class Running:
    """Loss and accuracy since the last progress line, kept on the device until read."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.steps = self.targets = self.tokens = 0
        self.since = time.perf_counter()

    def add(self, out: StepOutput, tokens: int) -> None:
        self.tokens += tokens
        if out.applied:  # a skipped batch's loss is NaN/inf: it says nothing about the model
            self.loss += out.loss
            self.correct += out.correct
            self.steps += 1
            self.targets += out.count

    def record(self, step: int, seconds: float, lr: float) -> dict[str, Any]:
        """The progress record, and start counting afresh."""
        now = time.perf_counter()
        record = {"step": step, "time": round(seconds, 3),
                  "loss": (self.loss / self.steps).item() if self.steps else math.nan,
                  "accuracy": self.correct.item() / max(self.targets, 1), "lr": lr,
                  "tokens_per_s": round(self.tokens / max(now - self.since, 1e-9), 1)}
        self.loss.zero_()
        self.correct.zero_()
        self.steps = self.targets = self.tokens = 0
        self.since = now
        return record


def session_step(session: Session, model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                 running: Running, *, clip: float, on_nan: str, device: torch.device, tokens: int) -> StepOutput:
    """One :func:`train_step` inside a session: the NaN guard, the carried state, the counters."""
    out = train_step(model, optimizer, batch, session.carry, clip=clip, device=device)
    session.check_finite(out.applied, skip=on_nan == "skip")
    # A skipped batch leaves the weights alone, and the state it produced is not carried.
    session.carry = out.state if out.applied else None if batch.reset else session.carry
    session.advance(tokens)
    running.add(out, tokens)
    return out


def train_language_model(
    config: RunConfig,
    data: LMData,
    *,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    stop: StopFlag | None = None,
    resume: Resume | None = None,
) -> TrainResult:
    """Train a language model on ``data`` as ``config`` says, writing checkpoints to ``out_dir``.

    ``stop`` (set by a signal handler) makes the loop save and raise
    :class:`~rnnkit.training.session.Stopped` at the next step boundary;
    ``resume`` continues a saved run exactly where it stopped.
    """
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    d, t = config.data, config.train
    device = prepare_run(config)

    model = LanguageModel(config=config.model, vocab_size=data.tokenizer.vocab_size).to(device)
    optimizer = build_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=t.lr_decay, patience=t.lr_patience)
    batcher = make_batcher(
        data.train, sampling=d.sampling, seq_len=d.seq_len, batch_size=d.batch_size, target=d.target, seed=t.seed
    )
    data_state = numpy_rng_accessors(batcher.rng) if hasattr(batcher, "rng") else no_data_state()
    steps_per_epoch = batcher.steps_per_epoch
    max_steps = step_budget(t, steps_per_epoch)
    tokens_per_step = d.batch_size * (d.seq_len if d.target == "all" else 1)
    prefixes = t.sample_prefixes or _default_prefixes(data)
    sample_gen = torch.Generator().manual_seed(t.seed)
    session = Session(config=config, out_dir=out_dir, task=TASK, model=model, optimizer=optimizer,
                      tokenizer=data.tokenizer, scheduler=scheduler, generators={"samples": sample_gen},
                      stop=stop, resume=resume, on_save=reporter.on_save)
    session.refuse_if_finished(session.stopped_by(max_steps))
    extra = session.progress.extra
    extra.setdefault("best_val_loss", None)
    extra.setdefault("val_loss", None)
    extra.setdefault("train_loss", None)
    extra.setdefault("train_accuracy", None)
    extra["default_prime"] = prefixes[0]

    # Everything is checked: only now does anything land on disk.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_lm_cache(data, out_dir / "data")
    log_metrics = session.open_metrics()

    reporter.on_start({
        "device": str(device), "parameters": model.num_parameters(), "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": len(data.train), "val_tokens": len(data.val), "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps, "max_time": t.max_time, "source": data.source, "from_cache": data.from_cache,
        "resumed_at": session.step if session.resumed else None,
    })

    running = Running(device)
    stopped_by = session.stopped_by(max_steps)

    def evaluate_and_save() -> None:
        record: dict[str, Any] = {"step": session.step, "time": round(session.elapsed(), 3),
                                  "lr": optimizer.param_groups[0]["lr"]}
        if len(data.val) >= 2:
            loss, count, val_accuracy = evaluate_lm(model, data.val, batch_size=d.batch_size, seq_len=d.seq_len,
                                                    max_tokens=t.eval_max_tokens, window=d.window)
            val = lm_metrics(loss, tokens=count, chars=round(count * data.chars_per_token))
            extra["val_loss"] = loss
            improved = extra["best_val_loss"] is None or loss < extra["best_val_loss"]
            if improved:
                extra["best_val_loss"] = loss
            scheduler.step(loss)
            record.update({f"val_{k}": v for k, v in val.items()}, val_accuracy=val_accuracy)
            reporter.on_eval({**record, "improved": improved, "best_val_loss": extra["best_val_loss"]})
        else:
            improved = True  # no validation text: the latest weights are the best we know
            reporter.on_eval(record)
        log_metrics(record)
        session.save(("best", "last") if improved else ("last",))
        draw_samples()

    def draw_samples() -> None:
        for prefix in prefixes:
            prime = data.tokenizer.encode(prefix, unknown="skip")
            if len(prime) == 0:
                continue
            ids = generate_ids(model, prime.tolist(), length=t.sample_length, temperature=t.sample_temperature,
                               generator=sample_gen, window=generation_window(config))[0]
            reporter.on_sample(prefix, data.tokenizer.decode(prime.tolist() + ids))

    model.train()
    try:
        while stopped_by is None:
            for batch in session.epochs(batcher.epoch, *data_state):
                out = session_step(session, model, optimizer, batch, running, clip=t.clip, on_nan=t.on_nan,
                                   device=device, tokens=tokens_per_step)
                step = session.step
                if step % t.log_every == 0 or step == max_steps:
                    record = running.record(step, session.elapsed(), optimizer.param_groups[0]["lr"])
                    if session.progress.skipped:
                        record["skipped"] = session.progress.skipped
                    extra["train_loss"], extra["train_accuracy"] = record["loss"], record["accuracy"]
                    log_metrics(record)
                    example = _example(data.tokenizer, batch, out.predicted) if d.target == "last" else None
                    reporter.on_step({**record, "max_steps": max_steps, "max_time": t.max_time,
                                      "epoch": step / steps_per_epoch, "example": example})
                stopped_by = session.stopped_by(max_steps)
                if stopped_by or step % t.eval_every == 0:
                    evaluate_and_save()
                elif t.sample_every and step % t.sample_every == 0:
                    draw_samples()
                if stopped_by:
                    break
                session.after_step()
    finally:
        log_metrics.close()
    counters = {"step": session.step, "tokens": session.progress.tokens, "seconds": session.elapsed(), **extra}
    reporter.on_end({**counters, "stopped_by": stopped_by})
    return TrainResult(
        steps=session.step, tokens=session.progress.tokens, seconds=session.elapsed(),
        best_val_loss=extra["best_val_loss"], last_val_loss=extra["val_loss"], train_loss=extra["train_loss"],
        stopped_by=stopped_by, train_accuracy=extra["train_accuracy"], history=log_metrics.history,
    )
