"""Scoring a model: language models on a token stream, classifiers on labelled texts, echo models on a series.

Shared by training (validation), ``rnnkit eval`` and anything else that asks
how good a checkpoint is. Every function here runs the model in eval mode
without gradients and puts its mode back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.data.classification import BucketBatcher, EncodedSet
from rnnkit.data.synthetic import EchoStreams, scored_mask
from rnnkit.errors import RnnkitError
from rnnkit.inference import predict_proba
from rnnkit.models import eval_mode
from rnnkit.runtime import SINGLE, Distributed, rank_rows

# ------------------------------------------------------------------ language models


def lm_metrics(loss: float, *, tokens: int, chars: int | None = None) -> dict[str, float | int]:
    """loss, perplexity, bits per token and bits per character (``chars`` defaults to tokens)."""
    chars = tokens if chars is None else chars
    bits_per_token = loss / math.log(2)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709 nats
        "bits_per_token": bits_per_token,
        "bits_per_char": bits_per_token * tokens / max(chars, 1),
        "tokens": tokens,
    }



@torch.inference_mode()
def evaluate_lm(
    model: nn.Module,
    ids: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int = 0,
    window: int = 0,
    group: Distributed = SINGLE,
) -> tuple[float, int, float]:
    """Mean next-token cross-entropy (nats) over ``ids``, the number of tokens scored, and accuracy.

    The text is cut into up to ``batch_size`` parallel streams read window by
    window with the state carried, so every scored token sees all the text
    before it in its stream (as in training with sequential sampling).
    With ``window`` N (a many-to-one model) each token from the N-th on is
    scored from the N tokens before it and a zero state, as the model was trained.
    In a process group each rank scores its share of the streams (or windows) and the
    sums are added up, so every rank gets the same figures.
    """
    if max_tokens and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
    if window:
        return _evaluate_windows(model, ids, window=window, batch_size=max(batch_size, 256), group=group)
    if len(ids) < 2:
        raise RnnkitError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    streams = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    stream_len = (len(ids) - 1) // streams
    device = next(model.parameters()).device
    # Windows are gathered from ``ids`` one at a time: a memory-mapped corpus is never copied whole.
    starts = (np.arange(streams) * stream_len)[rank_rows(streams, group)]
    total, count, correct, state = 0.0, 0, 0, None
    with eval_mode(model):
        for k in range(0, stream_len if len(starts) else 0, seq_len):
            t = min(seq_len, stream_len - k)
            index = starts[:, None] + k + np.arange(t + 1)  # (B, t+1)
            chunk = torch.from_numpy(ids[index].astype(np.int64)).to(device)
            if getattr(model, "adaptive", False):  # its own loss, which never builds the (B, t, V) log-probs
                nll, predicted, state = model.nll(chunk[:, :-1], chunk[:, 1:], state)
                loss = nll.float().sum()
            else:
                logits, state = model(chunk[:, :-1], state)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1),
                                       reduction="sum")
                predicted = logits.argmax(-1)
            total += loss.item()
            count += chunk[:, 1:].numel()
            correct += (predicted == chunk[:, 1:]).sum().item()
    total, count, correct = _sum_over_ranks(group, total, count, correct)
    return total / count, count, correct / count


def _sum_over_ranks(group: Distributed, *values: float) -> tuple[float, ...]:
    if not group.active:
        return values
    import torch.distributed as dist

    sums = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(sums)
    return tuple(v.item() if isinstance(x, float) else int(v.item()) for v, x in zip(sums, values, strict=True))


@torch.inference_mode()
def _evaluate_windows(model: nn.Module, ids: np.ndarray, *, window: int, batch_size: int,
                      group: Distributed = SINGLE) -> tuple[float, int, float]:
    if len(ids) < window + 1:
        raise RnnkitError(f"need at least {window + 1} tokens to evaluate a {window}-token window model, got {len(ids)}")
    device = next(model.parameters()).device
    every = np.lib.stride_tricks.sliding_window_view(ids, window + 1)  # (M, N+1), a view: no copy
    rows = every[rank_rows(len(every), group)]
    total, correct = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[start : start + batch_size].astype(np.int64)).to(device)
            if getattr(model, "adaptive", False):
                nll, predicted, _ = model.nll(chunk[:, :-1], chunk[:, -1])  # (B,) each
                total += nll.float().sum().item()
            else:
                logits, _ = model(chunk[:, :-1])
                total += F.cross_entropy(logits[:, -1].float(), chunk[:, -1], reduction="sum").item()
                predicted = logits[:, -1].argmax(-1)
            correct += (predicted == chunk[:, -1]).sum().item()
    total, correct = _sum_over_ranks(group, total, correct)
    return total / len(every), len(every), correct / len(every)


# ------------------------------------------------------------------ classifiers


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


def evaluate_classifier(model: nn.Module, data: EncodedSet, labels: list[str], *, batch_size: int = 256) -> ClassifyEval:
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


# ------------------------------------------------------------------ the echo task


@dataclass
class EchoEvaluation:
    loss: float  # mean cross-entropy over the scored steps
    accuracy: float  # fraction of scored steps predicted right
    scored: int  # how many steps were scored
    x: torch.Tensor  # (B, T) the last window's inputs, targets and predictions, for the figure
    y: torch.Tensor
    predicted: torch.Tensor
    offset: int  # the last window's first column


@torch.no_grad()
def evaluate_echo(model: nn.Module, streams: EchoStreams, series: tuple[torch.Tensor, torch.Tensor], *,
                  device: torch.device) -> EchoEvaluation:
    """Run ``model`` over ``series`` window by window with carried state, as in training."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    scored = 0
    state = None
    with eval_mode(model):
        for batch in streams.windows(*series):
            x, y = batch.x.to(device), batch.y.to(device)
            logits, state = model(x, None if batch.reset else state)
            mask = scored_mask(batch, streams.echo_step).to(device)
            predicted = logits.argmax(-1)
            loss_sum += F.cross_entropy(logits[mask], y[mask], reduction="sum")
            correct += (predicted == y)[mask].sum()
            scored += int(mask.sum())
    if scored == 0:
        raise RnnkitError(f"no step of the series lies more than --echo-step {streams.echo_step} steps into its "
                          "row; use a longer --series-length")
    return EchoEvaluation(loss=loss_sum.item() / scored, accuracy=correct.item() / scored, scored=scored,
                          x=batch.x, y=batch.y, predicted=predicted.cpu(), offset=batch.offset)


# ------------------------------------------------------------------ `rnnkit eval`: a checkpoint on data


@dataclass
class EvalRequest:
    """What to score a checkpoint on, and how (the options of ``rnnkit eval``)."""

    text: str | None = None  # a text file or folder (language models), or labelled data (classifiers)
    corpus: str | None = None  # a named corpus instead
    label_column: str | None = None  # classifiers: default the training one
    text_column: str | None = None
    unknown_label: str = "error"  # classifiers: a label the model never saw: error or skip
    encoding: str = "utf-8"
    unknown: str | None = None  # tokens the model never saw: error, skip, unk (default: the tokenizer's)
    batch_size: int = 0  # parallel streams (0: the training batch size)
    seq_len: int = 0  # window length (0: the training one)
    max_tokens: int = 0  # score only the first N tokens (0: all)
    seed: int = 0  # echo models: the fresh series


@dataclass
class EvalReport:
    metrics: dict[str, Any]  # the JSON form
    lines: list[str]  # the text form
    notes: list[str]  # remarks on the data (unknown words, ...)


def _one_source(request: EvalRequest) -> None:
    if bool(request.text) == bool(request.corpus):
        raise RnnkitError("pass exactly one of --text/--data PATH or --corpus NAME to evaluate on")


def evaluate_text(ckpt, request: EvalRequest, *, log=None, live: bool | None = None) -> EvalReport:
    """Loss, perplexity, bits per token and char, and accuracy of a language model on a text of any size.

    The text is streamed into a memory-mapped ids file (progress through ``log``), never held whole.
    """
    from rnnkit.data import corpora
    from rnnkit.data.lm_data import encode_text

    _one_source(request)
    if request.max_tokens < 0:
        raise RnnkitError(f"--max-tokens must be 0 (all) or more, got {request.max_tokens}")
    encoded = encode_text(ckpt.tokenizer, request.text or corpora.fetch(request.corpus),
                          encoding=request.encoding if request.text else "utf-8", unknown=request.unknown,
                          what="evaluation text", log=log, live=live)
    ids = encoded.ids
    notes = []
    if encoded.unknown:
        notes.append(f"note: {encoded.unknown} word(s) of the text are not in the vocabulary and count as <unk>")
    if len(ids) < 2:
        raise RnnkitError("the evaluation text needs at least 2 known tokens")
    run = ckpt.run_config.data
    loss, count, accuracy = evaluate_lm(ckpt.model, ids, batch_size=request.batch_size or run.batch_size,
                                        seq_len=request.seq_len or run.seq_len, window=run.window,
                                        max_tokens=request.max_tokens)
    metrics = {**lm_metrics(loss, tokens=count, chars=round(count * encoded.chars / len(ids))), "accuracy": accuracy}
    line = (f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
            f"bits/char {metrics['bits_per_char']:.4f}  accuracy {accuracy:.4f}  tokens {metrics['tokens']}")
    return EvalReport(metrics=metrics, lines=[line], notes=notes)


def evaluate_labelled(ckpt, request: EvalRequest, *, log=None, live: bool | None = None) -> EvalReport:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of a classifier on labelled texts."""
    from rnnkit.data import corpora
    from rnnkit.data.classification import encode_examples, read_labelled

    _one_source(request)
    path = corpora.fetch(request.corpus) if request.corpus else request.text
    run = ckpt.run_config.data
    sets = read_labelled(path, label_column=request.label_column or run.label_column,
                         text_column=request.text_column or run.text_column, encoding=request.encoding, min_classes=1)
    examples = sets.get("test") or [e for group in sets.values() for e in group]
    labels = ckpt.meta["labels"]
    encoded = encode_examples(examples, tokenizer=ckpt.tokenizer, labels=labels, max_len=run.max_len,
                              truncate=run.truncate, unknown_label=request.unknown_label)
    report = evaluate_classifier(ckpt.model, encoded, labels).report()
    lines = [f"accuracy {report['accuracy']:.4f} on {report['examples']} examples (loss {report['loss']:.4f})",
             f"{'label':<16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for label, m in report["per_class"].items():
        lines.append(f"{label:<16} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8}")
    lines.append("confusion matrix (rows: true, columns: predicted): " + ", ".join(labels))
    for label, row in zip(labels, report["confusion_matrix"]["rows_true_columns_predicted"], strict=True):
        lines.append(f"{label:<16} " + " ".join(f"{c:>8}" for c in row))
    return EvalReport(metrics=report, lines=lines, notes=[])


def evaluate_series(ckpt, request: EvalRequest, *, log=None, live: bool | None = None) -> EvalReport:
    """An echo model scored on a fresh series of its own task (seeded by ``request.seed``)."""
    from rnnkit.data.synthetic import streams_for

    if request.text or request.corpus:
        raise RnnkitError("an echo checkpoint is evaluated on a fresh generated series; drop --text/--corpus/--data")
    streams = streams_for(ckpt.run_config, seed=request.seed)
    result = evaluate_echo(ckpt.model, streams, streams.series(), device=next(ckpt.model.parameters()).device)
    metrics = {"loss": result.loss, "accuracy": result.accuracy, "scored_steps": result.scored, "seed": request.seed}
    line = (f"loss {result.loss:.4f}  accuracy {result.accuracy:.4f} on {result.scored} steps of a fresh series "
            f"(seed {request.seed})")
    return EvalReport(metrics=metrics, lines=[line], notes=[])


def evaluate_checkpoint(ckpt, request: EvalRequest, *, log=None, live: bool | None = None) -> EvalReport:
    """Score ``ckpt`` the way its task is scored (see :mod:`rnnkit.tasks`); reading progress goes to ``log``."""
    from rnnkit import tasks

    return tasks.resolve(tasks.get(ckpt.task).evaluate)(ckpt, request, log=log, live=live)
