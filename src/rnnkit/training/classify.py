"""Training and evaluating sequence classifiers (sentiment and other text labels).

The data pipeline (reading, splitting, encoding, bucketing) lives in
:mod:`rnnkit.data.classification`; this module holds the epoch loop: train
with a progress report, validate each epoch, keep the best checkpoint, stop
early when validation accuracy stops improving, and score the test split
with the best weights.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit import checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.classification import BucketBatcher, EncodedSet, Example, build_label_index, encode_examples
from rnnkit.data.tokenizers import Tokenizer, build_tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_classifier
from rnnkit.models.classifier import Classifier
from rnnkit.training import engine
from rnnkit.training.engine import Forward, Validation
from rnnkit.training.events import EndEvent, Reporter, StartEvent
from rnnkit.training.session import MetricsLog, Resume, Session, StopFlag


@dataclass
class ClassifyData:
    tokenizer: Tokenizer
    labels: list[str]
    train: EncodedSet
    val: EncodedSet
    test: EncodedSet
    source: str


def prepare_classify_data(
    config: RunConfig,
    splits: tuple[list[Example], list[Example], list[Example]],
    *,
    source: str,
    log: Callable[[str], None] | None = None,
) -> ClassifyData:
    """Fit the vocabulary and label set on the training split and encode all three splits."""
    train, val, test = splits
    labels = build_label_index(train)
    d = config.data
    if d.level == "char":  # texts are classified from their words (or BPE pieces), never characters
        d.level = "word"  # the run's configuration (config.toml, the checkpoint) says what was read
    tokenizer = build_tokenizer(d, "\n".join(e.text for e in train))
    encode = dict(tokenizer=tokenizer, labels=labels, max_len=d.max_len, truncate=d.truncate, log=log)
    data = ClassifyData(
        tokenizer=tokenizer, labels=labels, source=source,
        train=encode_examples(train, **encode),
        val=encode_examples(val, **encode, unknown_label="skip"),
        test=encode_examples(test, **encode, unknown_label="skip"),
    )
    counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for ids in data.train.ids:
        counts += np.bincount(ids, minlength=tokenizer.vocab_size)
    tokenizer.counts = counts.tolist()
    return data


@dataclass
class ClassifyResult:
    epochs: int
    seconds: float
    best_val_accuracy: float | None
    test: dict[str, Any] | None
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)


class LabelledBatch(NamedTuple):
    """A bucket of padded texts: ids (B, T), lengths (B,), labels (B,). Never carries state."""

    ids: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor
    reset: bool = True


def classifier_forward(model: nn.Module, batch: LabelledBatch, state, device: torch.device) -> Forward:
    ids, y = batch.ids.to(device), batch.y.to(device)
    logits, _ = model(ids)  # (B, C)
    return Forward(loss=F.cross_entropy(logits, y), outputs=(logits, y))


class ClassifierTask:
    """Epochs over length buckets; validate each epoch, keep the best, stop early; score the test split."""

    name = "classify"
    plateau_decay = False
    validate_each_epoch = True
    generators: dict[str, torch.Generator] = {}
    # Counters a resumed run continues from (all saved with each checkpoint).
    counters = {"best_val_accuracy": None, "bad_epochs": 0, "evaluated_epoch": 0, "epoch_loss_sum": 0.0,
                "epoch_correct": 0, "epoch_seen": 0}
    loss = staticmethod(classifier_forward)

    def __init__(self, config: RunConfig, data: ClassifyData) -> None:
        d, t = config.data, config.train
        if len(data.train.labels) == 0:
            raise RnnkitError("no training examples left after encoding")
        self.config, self.data, self.tokenizer = config, data, data.tokenizer
        self.checkpoint_extra = {"labels": data.labels}
        self.batches = BucketBatcher(data.train, batch_size=d.batch_size, pad_id=data.tokenizer.vocab_size,
                                     shuffle=True, seed=t.seed)
        self.epoch_limit = max(1, int(round(t.epochs))) if t.epochs else 4
        self.steps_per_epoch = len(self.batches)
        total = self.epoch_limit * self.steps_per_epoch
        self.max_steps = min(t.max_steps, total) if t.max_steps else total

    def build_model(self, device: torch.device) -> nn.Module:
        self.device = device
        self.model = Classifier(config=self.config.model, vocab_size=self.tokenizer.vocab_size,
                                num_classes=len(self.data.labels))
        self.model.to(device)
        return self.model

    def finished(self, session: Session) -> str | None:
        patience, extra = self.config.train.patience, session.progress.extra
        return session.stopped_by(self.max_steps) or (
            "early stopping" if patience and extra["bad_epochs"] >= patience else None)

    def setup(self, session: Session) -> None:
        self.extra = session.progress.extra

    def begin(self, session: Session, metrics: MetricsLog, out_dir: Path) -> StartEvent:
        # Throughput since the last progress line: tokens (padding excluded) and examples per second.
        self.rate_since, self.rate_tokens, self.rate_examples = time.perf_counter(), session.progress.tokens, 0
        data = self.data
        return StartEvent(device=engine.describe_device(self.device, self.config.train.precision), parameters=self.model.num_parameters(),
                          vocab_size=data.tokenizer.vocab_size, train_size=len(data.train.labels),
                          val_size=len(data.val.labels), unit="examples", steps_per_epoch=self.steps_per_epoch,
                          max_steps=self.max_steps, max_time=self.config.train.max_time, source=data.source,
                          from_cache=False, resumed_at=session.step if session.resumed else None)

    def epoch(self):
        def get() -> dict[str, Any]:
            return {"epoch": self.batches.epoch}  # the batcher's order is drawn from its epoch number

        def put(state: dict[str, Any]) -> None:
            self.batches.epoch = state["epoch"]

        return (lambda: (LabelledBatch(*parts) for parts in self.batches), get, put)

    def begin_epoch(self, session: Session) -> None:
        self.extra.update(epoch_loss_sum=0.0, epoch_correct=0, epoch_seen=0)  # a resumed epoch keeps its sums

    def tokens(self, batch: LabelledBatch) -> int:
        return int(batch.lengths.sum())  # real tokens, padding not counted

    def observe(self, batch: LabelledBatch, forward: Forward, applied: bool) -> None:
        self.rate_examples += len(batch.y)
        if applied:
            logits, y = forward.outputs
            self.extra["epoch_loss_sum"] += forward.loss.item() * len(y)
            self.extra["epoch_correct"] += (logits.argmax(-1) == y).sum().item()
            self.extra["epoch_seen"] += len(y)

    def progress(self, session: Session, lr: float) -> tuple[dict[str, Any], float, str]:
        seen = max(self.extra["epoch_seen"], 1)
        now = time.perf_counter()
        span = max(now - self.rate_since, 1e-9)
        record = {"step": session.step, "time": round(session.elapsed(), 3),
                  "loss": self.extra["epoch_loss_sum"] / seen, "accuracy": self.extra["epoch_correct"] / seen,
                  "lr": lr, "tokens_per_s": round((session.progress.tokens - self.rate_tokens) / span, 1),
                  "examples_per_s": round(self.rate_examples / span, 1)}
        self.rate_since, self.rate_tokens, self.rate_examples = now, session.progress.tokens, 0
        return record, record["examples_per_s"], "examples/s"

    def example(self, batch: LabelledBatch, forward: Forward) -> None:
        return None

    def after_step(self, session: Session, batch: LabelledBatch, forward: Forward) -> None:
        pass

    def samples(self) -> list:
        return []

    def epoch_needs_validation(self, session: Session) -> bool:
        return self.extra["evaluated_epoch"] != session.progress.epoch

    def validate(self, session: Session) -> Validation:
        """Validate the epoch; early stopping ends the run after ``patience`` epochs without a better accuracy."""
        extra, patience = self.extra, self.config.train.patience
        epoch = session.progress.epoch
        seen = max(extra["epoch_seen"], 1)
        record: dict[str, Any] = {"step": session.step, "epoch": epoch, "time": round(session.elapsed(), 3),
                                  "train_loss": extra["epoch_loss_sum"] / seen,
                                  "train_accuracy": extra["epoch_correct"] / seen,
                                  "lr": session.lr}
        extra["evaluated_epoch"] = epoch
        summary = f"train accuracy {record['train_accuracy']:.4f}  loss {record['train_loss']:.4f}"
        if not len(self.data.val.labels):
            return Validation(record=record, improved=True, headline=f"epoch {epoch}", summary=summary)
        val = evaluate_classifier(self.model, self.data.val, self.data.labels)
        improved = extra["best_val_accuracy"] is None or val.accuracy > extra["best_val_accuracy"]
        if improved:
            extra["best_val_accuracy"], extra["bad_epochs"] = val.accuracy, 0
        else:
            extra["bad_epochs"] += 1
        record.update(val_loss=val.loss, val_accuracy=val.accuracy)
        summary += f"  validation accuracy {val.accuracy:.4f}  loss {val.loss:.4f}"
        return Validation(record=record, improved=improved, headline=f"epoch {epoch}", summary=summary,
                          save_state={"val_accuracy": val.accuracy},
                          early_stop=bool(patience and extra["bad_epochs"] >= patience))

    def finish(self, session: Session, stopped_by: str, metrics: MetricsLog) -> tuple[EndEvent, ClassifyResult]:
        """Score the test split with the best weights."""
        test_report = None
        if len(self.data.test.labels):
            best_model = checkpoint.load_checkpoint(session.out_dir, device=self.device).model
            test_report = evaluate_classifier(best_model, self.data.test, self.data.labels).report()
            metrics.reopen()
            metrics({"step": session.step, "test_accuracy": test_report["accuracy"], "test_loss": test_report["loss"]})
            metrics.close()
        seconds, best = session.elapsed(), self.extra["best_val_accuracy"]
        end = EndEvent(step=session.step, tokens=0, seconds=seconds, stopped_by=stopped_by,
                       best=("validation accuracy", best) if best is not None else None)
        return end, ClassifyResult(epochs=session.progress.epoch, seconds=seconds, best_val_accuracy=best,
                                   test=test_report, stopped_by=stopped_by, history=metrics.history)

    def close(self) -> None:
        pass


def train_classifier(config: RunConfig, data: ClassifyData, *, out_dir: str | Path, reporter: Reporter | None = None,
                     stop: StopFlag | None = None, resume: Resume | None = None) -> ClassifyResult:
    """Train for ``train.epochs`` (or until ``max_time``/``max_steps``/early stopping) and keep the best."""
    return engine.train(ClassifierTask(config, data), out_dir=out_dir, reporter=reporter, stop=stop, resume=resume)


def make_task(config: RunConfig, *, out: Path, resume: Resume | None = None, log=None,
              live: bool | None = None) -> ClassifierTask:
    """Read the labelled examples, split them (seeded, stratified) and encode them into the engine task."""
    from rnnkit.data.classification import read_labelled_source, split_examples
    from rnnkit.training.runs import same_tokenizer

    sets, source = read_labelled_source(config.data, log=log)
    splits = split_examples(sets, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
                            seed=config.train.seed)
    data = prepare_classify_data(config, splits, source=source, log=log)
    same_tokenizer(data.tokenizer, resume)
    return ClassifierTask(config, data)


def summary(result: ClassifyResult, out: Path) -> list[str]:
    """Write ``test_metrics.json`` and say where the results are."""
    if result.test is None:
        return []
    (out / "test_metrics.json").write_text(json.dumps(result.test, indent=2) + "\n", encoding="utf-8")
    best = (f"best validation accuracy {result.best_val_accuracy:.4f}" if result.best_val_accuracy is not None
            else "no validation split")
    return [f"test accuracy {result.test['accuracy']:.4f} on {result.test['examples']} examples "
            f"({best}); details in {out}/test_metrics.json"]
