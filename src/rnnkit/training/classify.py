"""Training and evaluating sequence classifiers (sentiment and other text labels).

The data pipeline (reading, splitting, encoding, bucketing) lives in
:mod:`rnnkit.data.classification`; this module holds the epoch loop: train
with a progress report, validate each epoch, keep the best checkpoint, stop
early when validation accuracy stops improving, and score the test split
with the best weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F

from rnnkit import checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.classification import BucketBatcher, EncodedSet, Example, build_label_index, encode_examples
from rnnkit.data.tokenizers import Tokenizer, build_tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.inference import predict_proba
from rnnkit.models.classifier import Classifier
from rnnkit.training.loop import Reporter, build_optimizer, prepare_run
from rnnkit.training.session import Resume, Session, StopFlag, optimizer_step

TASK = "classify"


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
    if d.level == "char":
        raise RnnkitError("classification reads words: use --level word (or bpe)")
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
class ClassifyEval:
    accuracy: float
    loss: float
    count: int
    confusion: list[list[int]]  # [true][predicted]
    labels: list[str]

    def report(self) -> dict[str, Any]:
        """Accuracy, per-class precision/recall/F1 and the confusion matrix, as JSON-ready data."""
        matrix = np.array(self.confusion)
        per_class = {}
        for i, label in enumerate(self.labels):
            tp = int(matrix[i, i])
            predicted = int(matrix[:, i].sum())
            actual = int(matrix[i, :].sum())
            precision = tp / predicted if predicted else 0.0
            recall = tp / actual if actual else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
        return {"accuracy": self.accuracy, "loss": self.loss, "examples": self.count, "per_class": per_class,
                "confusion_matrix": {"labels": self.labels, "rows_true_columns_predicted": self.confusion}}


def evaluate_classifier(model: Classifier, data: EncodedSet, labels: list[str], *, batch_size: int = 256) -> ClassifyEval:
    if len(data.labels) == 0:
        raise RnnkitError("no examples to evaluate")
    batches = BucketBatcher(data, batch_size=batch_size, pad_id=model.pad_id, shuffle=False)
    probs, truth = predict_proba(model, batches)
    predicted = probs.argmax(1)
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    loss = float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, None)).mean())
    return ClassifyEval(accuracy=float((predicted == truth).mean()), loss=loss, count=len(truth),
                        confusion=confusion.tolist(), labels=labels)


@dataclass
class ClassifyResult:
    epochs: int
    seconds: float
    best_val_accuracy: float | None
    test: dict[str, Any] | None
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)


def train_classifier(
    config: RunConfig,
    data: ClassifyData,
    *,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    stop: StopFlag | None = None,
    resume: Resume | None = None,
) -> ClassifyResult:
    """Train for ``train.epochs`` (or until ``max_time``/``max_steps``/early stopping) and keep the best."""
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    d, t = config.data, config.train
    device = prepare_run(config)
    if len(data.train.labels) == 0:
        raise RnnkitError("no training examples left after encoding")
    model = Classifier(config=config.model, vocab_size=data.tokenizer.vocab_size, num_classes=len(data.labels))
    model.to(device)
    optimizer = build_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    batches = BucketBatcher(data.train, batch_size=d.batch_size, pad_id=model.pad_id, shuffle=True, seed=t.seed)
    epochs = max(1, int(round(t.epochs))) if t.epochs else 4
    steps_per_epoch = len(batches)
    max_steps = min(t.max_steps, epochs * steps_per_epoch) if t.max_steps else epochs * steps_per_epoch
    session = Session(config=config, out_dir=out_dir, task=TASK, model=model, optimizer=optimizer,
                      tokenizer=data.tokenizer, extra={"labels": data.labels}, stop=stop, resume=resume,
                      on_save=reporter.on_save)
    # Counters of the loop that a resumed run continues from (all saved with each checkpoint).
    extra = session.progress.extra
    for key, value in (("best_val_accuracy", None), ("bad_epochs", 0), ("evaluated_epoch", 0),
                       ("epoch_loss_sum", 0.0), ("epoch_correct", 0), ("epoch_seen", 0)):
        extra.setdefault(key, value)
    session.refuse_if_finished(session.stopped_by(max_steps) or (
        "early stopping" if t.patience and extra["bad_epochs"] >= t.patience else None))

    out_dir.mkdir(parents=True, exist_ok=True)
    log_metrics = session.open_metrics()
    reporter.on_start({
        "device": str(device), "parameters": model.num_parameters(), "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": len(data.train.labels), "val_tokens": len(data.val.labels), "unit": "examples",
        "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "max_time": t.max_time,
        "source": data.source, "from_cache": False, "resumed_at": session.step if session.resumed else None,
    })
    get_epoch = lambda: {"epoch": batches.epoch}  # noqa: E731 - the batcher's order is drawn from its epoch number

    def set_epoch(state: dict[str, Any]) -> None:
        batches.epoch = state["epoch"]

    def end_of_epoch() -> bool:
        """Validate, save, and say whether early stopping ends the run."""
        epoch = session.progress.epoch
        seen = max(extra["epoch_seen"], 1)
        record: dict[str, Any] = {"step": session.step, "epoch": epoch, "time": round(session.elapsed(), 3),
                                  "train_loss": extra["epoch_loss_sum"] / seen,
                                  "train_accuracy": extra["epoch_correct"] / seen,
                                  "lr": optimizer.param_groups[0]["lr"]}
        extra["evaluated_epoch"] = epoch
        if len(data.val.labels):
            val = evaluate_classifier(model, data.val, data.labels)
            improved = extra["best_val_accuracy"] is None or val.accuracy > extra["best_val_accuracy"]
            if improved:
                extra["best_val_accuracy"], extra["bad_epochs"] = val.accuracy, 0
            else:
                extra["bad_epochs"] += 1
            record.update(val_loss=val.loss, val_accuracy=val.accuracy)
            reporter.on_eval({**record, "improved": improved, "best_val_accuracy": extra["best_val_accuracy"]})
            log_metrics(record)
            session.save(("best", "last") if improved else ("last",), {"val_accuracy": val.accuracy})
            return bool(t.patience and extra["bad_epochs"] >= t.patience)
        reporter.on_eval(record)
        log_metrics(record)
        session.save(("best", "last"))
        return False

    model.train()
    stopped_by = session.stopped_by(max_steps)
    # Throughput since the last progress line: tokens (padding excluded) and examples per second.
    rate_since, rate_tokens, rate_examples = time.perf_counter(), session.progress.tokens, 0
    try:
        while stopped_by is None:
            if not session.replaying and session.progress.epoch >= epochs:
                stopped_by = "epochs"
                break
            if not session.replaying:  # a new epoch (a resumed one keeps its running sums)
                extra.update(epoch_loss_sum=0.0, epoch_correct=0, epoch_seen=0)
            for ids, lengths, y in session.epochs(lambda: iter(batches), get_epoch, set_epoch):
                ids, y = ids.to(device), y.to(device)
                logits, _ = model(ids)
                loss = F.cross_entropy(logits, y)
                applied = session.check_finite(bool(optimizer_step(model, optimizer, loss, clip=t.clip)),
                                               skip=t.on_nan == "skip")
                session.advance(int(lengths.sum()))  # real tokens, padding not counted
                rate_examples += len(y)
                if applied:
                    extra["epoch_loss_sum"] += loss.item() * len(y)
                    extra["epoch_correct"] += (logits.argmax(-1) == y).sum().item()
                    extra["epoch_seen"] += len(y)
                step = session.step
                if step % t.log_every == 0 or step == max_steps:
                    seen = max(extra["epoch_seen"], 1)
                    now = time.perf_counter()
                    span = max(now - rate_since, 1e-9)
                    record = {"step": step, "time": round(session.elapsed(), 3),
                              "loss": extra["epoch_loss_sum"] / seen, "accuracy": extra["epoch_correct"] / seen,
                              "lr": optimizer.param_groups[0]["lr"],
                              "tokens_per_s": round((session.progress.tokens - rate_tokens) / span, 1),
                              "examples_per_s": round(rate_examples / span, 1)}
                    rate_since, rate_tokens, rate_examples = now, session.progress.tokens, 0
                    log_metrics(record)
                    reporter.on_step({**record, "max_steps": max_steps, "max_time": t.max_time,
                                      "epoch": step / steps_per_epoch, "example": None})
                stopped_by = session.stopped_by(max_steps)
                if stopped_by:
                    break
                session.after_step()
            if extra["evaluated_epoch"] != session.progress.epoch and end_of_epoch():
                stopped_by = "early stopping"
    finally:
        log_metrics.close()
    test_report = None
    if len(data.test.labels):
        best_model = checkpoint.load_checkpoint(out_dir, device=device).model
        test_report = evaluate_classifier(best_model, data.test, data.labels).report()
        log_metrics.reopen()
        log_metrics({"step": session.step, "test_accuracy": test_report["accuracy"], "test_loss": test_report["loss"]})
        log_metrics.close()
    seconds = session.elapsed()
    best = extra["best_val_accuracy"]
    reporter.on_end({"step": session.step, "tokens": 0, "seconds": seconds, "stopped_by": stopped_by,
                     "best_val_loss": None, "best_val_accuracy": best,
                     "test_accuracy": test_report["accuracy"] if test_report else None})
    return ClassifyResult(epochs=session.progress.epoch, seconds=seconds, best_val_accuracy=best, test=test_report,
                          stopped_by=stopped_by, history=log_metrics.history)
