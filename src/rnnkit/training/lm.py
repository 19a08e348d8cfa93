"""The language-model task: predict the next token of a text (many-to-many), or the one after a window.

One step: take a batch; start from a zero state or carry the previous one
(the engine detaches it: truncated BPTT); forward; cross-entropy on every next
token (or only the last); the engine does the rest. Every ``eval_every``
steps and at the end the model is scored on the validation tail with carried
state (:func:`~rnnkit.evaluation.evaluate_lm`), the learning rate may decay
on a plateau, and samples are drawn from the training prefixes.
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
from rnnkit.evaluation import evaluate_lm, lm_metrics
from rnnkit.generation import generate_ids
from rnnkit.models.adaptive import resolve_cutoffs
from rnnkit.models.language_model import LanguageModel
from rnnkit.models.recurrent import State
from rnnkit.runtime import distributed
from rnnkit.training import engine
from rnnkit.training.engine import Forward, Validation
from rnnkit.training.events import EndEvent, Reporter, SampleEvent, StartEvent
from rnnkit.training.session import MetricsLog, Resume, Session, StopFlag, no_data_state, numpy_rng_accessors


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


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; targets (B, T) score every position, (B,) only the last."""
    if targets.dim() == 1:
        return F.cross_entropy(logits[:, -1], targets)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_forward(model: nn.Module, batch: Batch, state: State | None, device: torch.device) -> Forward:
    """Forward one batch of windows; ``outputs`` keeps the logits and targets for the metrics."""
    x = batch.x.to(device, non_blocking=True)
    y = batch.y.to(device, non_blocking=True)
    if getattr(model, "adaptive", False):  # the adaptive softmax's own loss: no (B, T, V) tensor at all
        nll, predicted, state = model.nll(x, y, state)  # (B, T) or (B,) each
        return Forward(loss=nll.mean(), state=state, outputs=(predicted, y))
    logits, state = model(x, state)  # (B, T, V)
    # lm_loss is looked up at call time, so a test can poison the loss.
    loss = lm_loss(logits, y)
    with torch.no_grad():  # the argmax now, so that the (B, T, V) logits need not outlive the backward pass
        predicted = (logits[:, -1] if y.dim() == 1 else logits).argmax(dim=-1)  # (B,) or (B, T)
    return Forward(loss=loss, state=state, outputs=(predicted, y))


@dataclass
class StepOutput:
    loss: torch.Tensor  # () mean loss of the batch, detached
    correct: torch.Tensor  # () how many targets the argmax got right
    count: int  # how many targets
    predicted: torch.Tensor  # (B,) argmax at the last position, for the example line
    state: State
    predictions: torch.Tensor | None = None  # (B, T) argmax at every position (many-to-many only)
    applied: bool = True  # False: the loss or gradient was not finite, the weights were left alone


@torch.no_grad()
def step_output(forward: Forward, applied: bool) -> StepOutput:
    """Accuracy counts and predictions of a language-model step."""
    predicted, y = forward.outputs
    correct = (predicted == y).sum()
    if y.dim() == 1:
        return StepOutput(loss=forward.loss.detach(), correct=correct, count=y.numel(), predicted=predicted,
                          state=forward.state, applied=applied)
    return StepOutput(loss=forward.loss.detach(), correct=correct, count=y.numel(), predicted=predicted[:, -1],
                      state=forward.state, predictions=predicted, applied=applied)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, state: State | None, *,
               clip: float, device: torch.device, plan: engine.Plan = engine.SIMPLE_PLAN) -> StepOutput:
    """The engine's step with the language-model loss (for experiments and benchmarks outside a run)."""
    forward, applied = engine.train_step(model, optimizer, batch, state, loss_fn=lm_forward, clip=clip,
                                         device=device, plan=plan)
    return step_output(forward, applied)


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


class WindowTask:
    """What the language-model and echo tasks share: windows of tokens, carried state, per-token metrics."""

    plateau_decay = True
    validate_each_epoch = False
    epoch_limit = 0
    checkpoint_extra: dict[str, Any] = {}

    def __init__(self, config: RunConfig, *, vocab_size: int, tokens_per_step: int, steps_per_epoch: int) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.tokens_per_step = tokens_per_step
        self.steps_per_epoch = steps_per_epoch
        self.max_steps = engine.step_budget(config.train, steps_per_epoch)
        group, accum = distributed(), config.train.grad_accum
        if config.data.batch_size % (group.world * accum):
            what = f"{group.world} processes x {accum} micro-batches" if accum > 1 else f"{group.world} processes"
            raise RnnkitError(f"--batch-size {config.data.batch_size} does not divide into {what}: the global batch "
                              f"is shared out by rows; choose a multiple of {group.world * accum}")
        self.generators: dict[str, torch.Generator] = {}
        self.model: nn.Module | None = None
        self.running: Running | None = None
        self._last: StepOutput | None = None

    def build_model(self, device: torch.device) -> nn.Module:
        self.device = device
        self.model = LanguageModel(config=self.config.model, vocab_size=self.vocab_size).to(device)
        return self.model

    def setup(self, session: Session) -> None:
        self.session = session

    def finished(self, session: Session) -> str | None:
        return session.stopped_by(self.max_steps)

    def begin_epoch(self, session: Session) -> None:
        pass

    loss = staticmethod(lm_forward)

    def tokens(self, batch: Batch) -> int:
        return self.tokens_per_step

    def observe(self, batch: Batch, forward: Forward, applied: bool) -> None:
        self._last = step_output(forward, applied)
        self.running.add(self._last, self.tokens_per_step)

    def progress(self, session: Session, lr: float) -> tuple[dict[str, Any], float, str]:
        record = self.running.record(session.step, session.elapsed(), lr)
        extra = session.progress.extra
        extra["train_loss"], extra["train_accuracy"] = record["loss"], record["accuracy"]
        return record, record["tokens_per_s"], "tok/s"

    def example(self, batch: Batch, forward: Forward) -> str | None:
        return None

    def after_step(self, session: Session, batch: Batch, forward: Forward) -> None:
        pass

    def samples(self) -> list[SampleEvent]:
        return []

    def epoch_needs_validation(self, session: Session) -> bool:
        return False

    def base_record(self, session: Session) -> dict[str, Any]:
        return {"step": session.step, "time": round(session.elapsed(), 3),
                "lr": session.lr}

    def result(self, session: Session, stopped_by: str, metrics: MetricsLog) -> TrainResult:
        extra = session.progress.extra
        return TrainResult(
            steps=session.step, tokens=session.progress.tokens, seconds=session.elapsed(),
            best_val_loss=extra["best_val_loss"], last_val_loss=extra["val_loss"], train_loss=extra["train_loss"],
            stopped_by=stopped_by, train_accuracy=extra["train_accuracy"], history=metrics.history,
        )

    def close(self) -> None:
        pass


def _default_prefixes(data: LMData) -> list[str]:
    """A newline for text with line breaks in its vocabulary, else the training text's first tokens."""
    tok = data.tokenizer
    if tok.kind == "char" and len(tok.encode("\n", unknown="skip")):
        return ["\n"]
    return [tok.decode(data.train[: min(3, len(data.train))].tolist())]


class LanguageModelTask(WindowTask):
    name = "language_model"

    def __init__(self, config: RunConfig, data: LMData) -> None:
        d, t = config.data, config.train
        self.data = data
        self.tokenizer: Tokenizer = data.tokenizer
        self.batcher = make_batcher(data.train, sampling=d.sampling, seq_len=d.seq_len, batch_size=d.batch_size,
                                    target=d.target, seed=t.seed)
        super().__init__(config, vocab_size=data.tokenizer.vocab_size, steps_per_epoch=self.batcher.steps_per_epoch,
                         tokens_per_step=d.batch_size * (d.seq_len if d.target == "all" else 1))
        self.prefixes = t.sample_prefixes or _default_prefixes(data)
        self.sample_gen = torch.Generator().manual_seed(t.seed)
        self.generators = {"samples": self.sample_gen}
        self.counters = {"best_val_loss": None, "val_loss": None, "train_loss": None, "train_accuracy": None}
        m = config.model
        if m.softmax == "adaptive":  # checked before training starts, and recorded: the checkpoints say what they use
            m.cutoffs = resolve_cutoffs(m.cutoffs, data.tokenizer.vocab_size, hidden=m.hidden, div_value=m.div_value)

    def setup(self, session: Session) -> None:
        super().setup(session)
        session.progress.extra["default_prime"] = self.prefixes[0]

    def begin(self, session: Session, metrics: MetricsLog, out_dir: Path) -> StartEvent:
        if session.group.main:
            save_lm_cache(self.data, out_dir / "data")
        self.running = Running(self.device)
        data = self.data
        return StartEvent(device=engine.describe_device(self.device, self.config.train.precision), parameters=self.model.num_parameters(),
                          vocab_size=data.tokenizer.vocab_size, train_size=len(data.train), val_size=len(data.val),
                          unit="tokens", steps_per_epoch=self.steps_per_epoch, max_steps=self.max_steps,
                          max_time=self.config.train.max_time, source=data.source, from_cache=data.from_cache,
                          resumed_at=session.step if session.resumed else None)

    def epoch(self):
        accessors = numpy_rng_accessors(self.batcher.rng) if hasattr(self.batcher, "rng") else no_data_state()
        return (self.batcher.epoch, *accessors)

    def example(self, batch: Batch, forward: Forward) -> str | None:
        """``[had a general] -> [council] vs [council]``: the window, its target and the guess."""
        if self.config.data.target != "last":
            return None
        tokenizer = self.tokenizer
        window = tokenizer.decode(batch.x[0, -8:].tolist())
        target = batch.y[0] if batch.y.dim() == 1 else batch.y[0, -1]
        guess = int(self._last.predicted[0])
        return f"[{window}] -> [{tokenizer.decode([int(target)])}] vs [{tokenizer.decode([guess])}]"

    def validate(self, session: Session) -> Validation:
        d, t = self.config.data, self.config.train
        extra = session.progress.extra
        record = self.base_record(session)
        if len(self.data.val) < 2:  # no validation text: the latest weights are the best we know
            return Validation(record=record, improved=True, headline=f"step {session.step}", summary=None)
        loss, count, val_accuracy = evaluate_lm(self.model, self.data.val, batch_size=d.batch_size,
                                                seq_len=d.seq_len, max_tokens=t.eval_max_tokens, window=d.window,
                                                group=session.group)
        val = lm_metrics(loss, tokens=count, chars=round(count * self.data.chars_per_token))
        extra["val_loss"] = loss
        improved = extra["best_val_loss"] is None or loss < extra["best_val_loss"]
        if improved:
            extra["best_val_loss"] = loss
        record.update({f"val_{k}": v for k, v in val.items()}, val_accuracy=val_accuracy)
        summary = (f"validation loss {loss:.4f}  perplexity {val['perplexity']:.2f}  "
                   f"bits/char {val['bits_per_char']:.3f}  lr {record['lr']:.3g}")
        return Validation(record=record, improved=improved, headline=f"step {session.step}", summary=summary,
                          plateau_loss=loss)

    def samples(self) -> list[SampleEvent]:
        t = self.config.train
        events = []
        for prefix in self.prefixes:
            prime = self.tokenizer.encode(prefix, unknown="skip")
            if len(prime) == 0:
                continue
            ids = generate_ids(self.model, prime.tolist(), length=t.sample_length, temperature=t.sample_temperature,
                               generator=self.sample_gen, window=generation_window(self.config))[0]
            events.append(SampleEvent(prefix=prefix, text=self.tokenizer.decode(prime.tolist() + ids)))
        return events

    def finish(self, session: Session, stopped_by: str, metrics: MetricsLog) -> tuple[EndEvent, TrainResult]:
        best = session.progress.extra["best_val_loss"]
        end = EndEvent(step=session.step, tokens=session.progress.tokens, seconds=session.elapsed(),
                       stopped_by=stopped_by, best=("validation loss", best) if best is not None else None)
        return end, self.result(session, stopped_by, metrics)


def train_language_model(config: RunConfig, data: LMData, *, out_dir: str | Path, reporter: Reporter | None = None,
                         stop: StopFlag | None = None, resume: Resume | None = None) -> TrainResult:
    """Train a language model on ``data`` as ``config`` says, writing checkpoints to ``out_dir``."""
    return engine.train(LanguageModelTask(config, data), out_dir=out_dir, reporter=reporter, stop=stop, resume=resume)


def make_task(config: RunConfig, *, out: Path, resume: Resume | None = None, log=None,
              live: bool | None = None) -> LanguageModelTask:
    """Read, tokenize and split the text (or its cached ids in ``out/data``) into the engine task."""
    from rnnkit.data.lm_data import prepare_lm_data
    from rnnkit.training.runs import same_tokenizer

    data = prepare_lm_data(config.data, cache_dir=out / "data", log=log, live=live)
    same_tokenizer(data.tokenizer, resume)
    return LanguageModelTask(config, data)


def summary(result: TrainResult, out: Path) -> list[str]:
    best = f" (best: validation loss {result.best_val_loss:.4f})" if result.best_val_loss is not None else ""
    return [f"checkpoints in {out}/checkpoints{best}"]
