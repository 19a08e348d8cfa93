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

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit import checkpoint
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

TASK = "language_model"


class Reporter:
    """Receives training events; the default ignores them all. The CLI's prints them."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, info: dict[str, Any]) -> None: ...

    def on_eval(self, info: dict[str, Any]) -> None: ...

    def on_sample(self, prefix: str, text: str) -> None: ...

    def on_save(self, path: Path, names: tuple[str, ...]) -> None: ...

    def on_end(self, info: dict[str, Any]) -> None: ...


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON record per line, flushed as written, and kept in memory."""

    def __init__(self, path: Path) -> None:
        self.history: list[dict[str, Any]] = []
        self._file = open(path, "a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    optimizer.step()
    with torch.no_grad():
        scored = logits[:, -1] if y.dim() == 1 else logits  # (B, V) or (B, T, V)
        predicted = scored.argmax(dim=-1)
        correct = (predicted == y).sum()
    if y.dim() == 1:
        return StepOutput(loss=loss.detach(), correct=correct, count=y.numel(), predicted=predicted, state=state)
    return StepOutput(loss=loss.detach(), correct=correct, count=y.numel(), predicted=predicted[:, -1],
                      state=state, predictions=predicted)


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


def train_language_model(
    config: RunConfig,
    data: LMData,
    *,
    out_dir: str | Path,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train a language model on ``data`` as ``config`` says, writing checkpoints to ``out_dir``."""
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
    steps_per_epoch = batcher.steps_per_epoch
    max_steps = step_budget(t, steps_per_epoch)
    tokens_per_step = d.batch_size * (d.seq_len if d.target == "all" else 1)
    prefixes = t.sample_prefixes or _default_prefixes(data)
    sample_gen = torch.Generator().manual_seed(t.seed)

    # Everything is checked: only now does anything land on disk.
    out_dir.mkdir(parents=True, exist_ok=True)
    save_lm_cache(data, out_dir / "data")
    log_metrics = MetricsLog(out_dir / "metrics.jsonl")

    reporter.on_start({
        "device": str(device), "parameters": model.num_parameters(), "vocab_size": data.tokenizer.vocab_size,
        "train_tokens": len(data.train), "val_tokens": len(data.val), "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps, "max_time": t.max_time, "source": data.source, "from_cache": data.from_cache,
    })

    step = 0
    tokens = 0
    best_val: float | None = None
    last_val: float | None = None
    recent_loss = torch.zeros((), device=device)
    recent_correct = torch.zeros((), device=device, dtype=torch.long)
    recent_count = recent_targets = 0
    last_train_loss: float | None = None
    accuracy: float | None = None
    start = time.perf_counter()
    log_start, log_tokens = start, 0
    state = None
    stopped_by = "steps"

    def elapsed() -> float:
        return time.perf_counter() - start

    def counters() -> dict[str, Any]:
        return {"step": step, "tokens": tokens, "epoch": step / steps_per_epoch, "seconds": round(elapsed(), 3),
                "best_val_loss": best_val, "val_loss": last_val, "train_loss": last_train_loss,
                "train_accuracy": accuracy, "default_prime": prefixes[0]}

    def save(names: tuple[str, ...]) -> None:
        path = checkpoint.save_to_run(
            out_dir, names=names, step=step, model=model, tokenizer=data.tokenizer, task=TASK,
            run_config=config, state=counters(),
        )
        reporter.on_save(path, names)

    def evaluate_and_save() -> None:
        nonlocal best_val, last_val
        record: dict[str, Any] = {"step": step, "time": round(elapsed(), 3), "lr": optimizer.param_groups[0]["lr"]}
        if len(data.val) >= 2:
            loss, count, val_accuracy = evaluate_lm(model, data.val, batch_size=d.batch_size, seq_len=d.seq_len,
                                      max_tokens=t.eval_max_tokens, window=d.window)
            chars = round(count * data.chars_per_token)
            val = lm_metrics(loss, tokens=count, chars=chars)
            last_val = loss
            improved = best_val is None or loss < best_val
            if improved:
                best_val = loss
            scheduler.step(loss)
            record.update({f"val_{k}": v for k, v in val.items()}, val_accuracy=val_accuracy)
            reporter.on_eval({**record, "improved": improved, "best_val_loss": best_val})
            log_metrics(record)
            save(("best", "last") if improved else ("last",))
        else:
            # No validation text: the latest weights are the best we know.
            reporter.on_eval(record)
            log_metrics(record)
            save(("best", "last"))
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
        done = False
        while not done:
            for batch in batcher.epoch():
                out = train_step(model, optimizer, batch, state, clip=t.clip, device=device)
                state = out.state
                step += 1
                tokens += tokens_per_step
                recent_loss += out.loss
                recent_correct += out.correct
                recent_count += 1
                recent_targets += out.count

                if step % t.log_every == 0 or step == max_steps:
                    last_train_loss = (recent_loss / recent_count).item()
                    if not math.isfinite(last_train_loss):
                        raise RnnkitError(
                            f"the training loss became {last_train_loss} by step {step}; lower --lr or use --clip"
                        )
                    now = time.perf_counter()
                    rate = (tokens - log_tokens) / max(now - log_start, 1e-9)
                    log_start, log_tokens = now, tokens
                    accuracy = recent_correct.item() / max(recent_targets, 1)
                    recent_loss.zero_()
                    recent_correct.zero_()
                    recent_count = recent_targets = 0
                    record = {"step": step, "time": round(now - start, 3), "loss": last_train_loss,
                              "accuracy": accuracy, "lr": optimizer.param_groups[0]["lr"],
                              "tokens_per_s": round(rate, 1)}
                    log_metrics(record)
                    example = _example(data.tokenizer, batch, out.predicted) if d.target == "last" else None
                    reporter.on_step({**record, "max_steps": max_steps, "max_time": t.max_time,
                                      "epoch": step / steps_per_epoch, "example": example})

                if max_steps and step >= max_steps:
                    stopped_by, done = "steps", True
                elif t.max_time and elapsed() >= t.max_time:
                    stopped_by, done = "time", True
                if done or step % t.eval_every == 0:
                    evaluate_and_save()
                elif t.sample_every and step % t.sample_every == 0:
                    draw_samples()
                if done:
                    break
    except KeyboardInterrupt:
        if step > 0:
            save(("last",))
        log_metrics.close()
        raise
    log_metrics.close()
    result = TrainResult(
        steps=step, tokens=tokens, seconds=elapsed(), best_val_loss=best_val, last_val_loss=last_val,
        train_loss=last_train_loss, stopped_by=stopped_by, train_accuracy=accuracy, history=log_metrics.history,
    )
    reporter.on_end({**counters(), "stopped_by": stopped_by})
    return result
