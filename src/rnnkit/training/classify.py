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
from torch import nn

from rnnkit import checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.classification import BucketBatcher, EncodedSet, Example, build_label_index, encode_examples
from rnnkit.data.tokenizers import Tokenizer, build_tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.inference import predict_proba
from rnnkit.models.classifier import Classifier
from rnnkit.training.loop import MetricsLog, Reporter, build_optimizer, prepare_run

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

    out_dir.mkdir(parents=True, exist_ok=True)
    log_metrics = MetricsLog(out_dir / "metrics.jsonl")

    reporter.on_start({
        "device": str(device), "parameters": model.num_parameters(), "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": len(data.train.labels), "val_tokens": len(data.val.labels), "unit": "examples",
        "steps_per_epoch": steps_per_epoch, "max_steps": max_steps, "max_time": t.max_time,
        "source": data.source, "from_cache": False,
    })
    start = time.perf_counter()
    step, best, bad_epochs, stopped_by = 0, None, 0, "epochs"
    extra = {"labels": data.labels}

    def save(names: tuple[str, ...], epoch: int, val_accuracy: float | None) -> None:
        state = {"step": step, "epoch": epoch, "seconds": round(time.perf_counter() - start, 3),
                 "val_accuracy": val_accuracy, "best_val_accuracy": best}
        path = checkpoint.save_to_run(out_dir, names=names, step=step, model=model, tokenizer=data.tokenizer,
                                      task=TASK, run_config=config, state=state, extra=extra)
        reporter.on_save(path, names)

    model.train()
    epoch = 0
    try:
        while epoch < epochs:
            epoch += 1
            loss_sum, correct, seen, tick = 0.0, 0, 0, time.perf_counter()
            for ids, _, y in batches:
                ids, y = ids.to(device), y.to(device)
                logits, _ = model(ids)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), t.clip, foreach=True)
                optimizer.step()
                step += 1
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(-1) == y).sum().item()
                seen += len(y)
                if step % t.log_every == 0 or step == max_steps:
                    now = time.perf_counter()
                    record = {"step": step, "time": round(now - start, 3), "loss": loss_sum / seen,
                              "accuracy": correct / seen, "lr": optimizer.param_groups[0]["lr"],
                              "tokens_per_s": round(seen / max(now - tick, 1e-9), 1)}
                    log_metrics(record)
                    reporter.on_step({**record, "max_steps": max_steps, "max_time": t.max_time,
                                      "epoch": step / steps_per_epoch, "example": None})
                if step >= max_steps:
                    stopped_by = "steps"
                    break
                if t.max_time and time.perf_counter() - start >= t.max_time:
                    stopped_by = "time"
                    break
            record: dict[str, Any] = {"step": step, "epoch": epoch, "time": round(time.perf_counter() - start, 3),
                                      "train_loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1),
                                      "lr": optimizer.param_groups[0]["lr"]}
            if len(data.val.labels):
                val = evaluate_classifier(model, data.val, data.labels)
                improved = best is None or val.accuracy > best
                if improved:
                    best, bad_epochs = val.accuracy, 0
                else:
                    bad_epochs += 1
                record.update(val_loss=val.loss, val_accuracy=val.accuracy)
                reporter.on_eval({**record, "improved": improved, "best_val_accuracy": best})
                log_metrics(record)
                save(("best", "last") if improved else ("last",), epoch, val.accuracy)
                if t.patience and bad_epochs >= t.patience:
                    stopped_by = "early stopping"
                    break
            else:
                reporter.on_eval(record)
                log_metrics(record)
                save(("best", "last"), epoch, None)
            if stopped_by in ("steps", "time"):
                break
    except KeyboardInterrupt:
        if step:
            save(("last",), epoch, None)
        log_metrics.close()
        raise
    test_report = None
    if len(data.test.labels):
        best_model = checkpoint.load_checkpoint(out_dir, device=device).model
        test_report = evaluate_classifier(best_model, data.test, data.labels).report()
        log_metrics({"step": step, "test_accuracy": test_report["accuracy"], "test_loss": test_report["loss"]})
    log_metrics.close()
    seconds = time.perf_counter() - start
    reporter.on_end({"step": step, "tokens": 0, "seconds": seconds, "stopped_by": stopped_by,
                     "best_val_loss": None, "best_val_accuracy": best,
                     "test_accuracy": test_report["accuracy"] if test_report else None})
    return ClassifyResult(epochs=epoch, seconds=seconds, best_val_accuracy=best, test=test_report,
                          stopped_by=stopped_by, history=log_metrics.history)

