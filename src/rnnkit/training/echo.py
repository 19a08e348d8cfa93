"""Training on the echo task: per-step labelling of a generated series with truncated BPTT.

The network is a :class:`~rnnkit.models.language_model.LanguageModel` whose
vocabulary is the task's symbols: at every step it reads one symbol and
predicts the symbol it read ``echo_step`` steps earlier (many-to-many). Each
epoch draws a fresh series (see :mod:`rnnkit.data.synthetic`); the state starts
at zero at its first window and is carried, detached, through the rest.
Validation runs the same way over one fixed held-out series and scores only
the steps whose echo lies inside their row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.config import RunConfig
from rnnkit.data.synthetic import SYMBOL_CHARS, EchoStreams, scored_mask
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.models import eval_mode
from rnnkit.models.language_model import LanguageModel
from rnnkit.training.loop import Reporter, Running, TrainResult, build_optimizer, prepare_run, session_step, step_budget
from rnnkit.training.session import Resume, Session, StopFlag, numpy_rng_accessors

TASK = "echo"
VALIDATION_SEED_OFFSET = 1_000_003  # the held-out series never equals a training one


def echo_tokenizer(symbols: int) -> CharTokenizer:
    """Symbols 0..k-1 written as the characters 0-9a-z, so a checkpoint describes itself."""
    return CharTokenizer(chars=list(SYMBOL_CHARS[:symbols]))


def streams_for(config: RunConfig, *, seed: int) -> EchoStreams:
    d = config.data
    return EchoStreams(series_length=d.series_length, echo_step=d.echo_step, symbols=d.symbols,
                       batch_size=d.batch_size, bptt=d.seq_len, seed=seed)


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


def train_echo(config: RunConfig, *, out_dir: str | Path, reporter: Reporter | None = None,
               stop: StopFlag | None = None, resume: Resume | None = None) -> TrainResult:
    """Train on the echo task as ``config`` says, writing checkpoints and metrics to ``out_dir``."""
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    d, t = config.data, config.train
    device = prepare_run(config)

    tokenizer = echo_tokenizer(d.symbols)
    model = LanguageModel(config=config.model, vocab_size=d.symbols).to(device)
    optimizer = build_optimizer(t.optimizer, model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=t.lr_decay, patience=t.lr_patience)
    streams = streams_for(config, seed=t.seed)
    val_streams = streams_for(config, seed=t.seed + VALIDATION_SEED_OFFSET)
    val_series = val_streams.series()
    steps_per_epoch = streams.steps_per_epoch
    max_steps = step_budget(t, steps_per_epoch)
    tokens_per_step = d.batch_size * d.seq_len
    session = Session(config=config, out_dir=out_dir, task=TASK, model=model, optimizer=optimizer,
                      tokenizer=tokenizer, scheduler=scheduler, stop=stop, resume=resume, on_save=reporter.on_save)
    session.refuse_if_finished(session.stopped_by(max_steps))
    extra = session.progress.extra
    for key in ("best_val_loss", "best_val_accuracy", "val_loss", "train_loss", "train_accuracy"):
        extra.setdefault(key, None)
    live = None
    if t.live_plot:
        from rnnkit.plots import LivePlot

        live = LivePlot(t.live_plot, symbols=d.symbols, show=t.show, warn=getattr(reporter, "print", None))

    out_dir.mkdir(parents=True, exist_ok=True)
    log_metrics = session.open_metrics()
    reporter.on_start({
        "device": str(device), "parameters": model.num_parameters(), "vocab_size": d.symbols,
        "train_tokens": d.series_length, "val_tokens": d.series_length, "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps, "max_time": t.max_time, "from_cache": False, "unit": "steps per series",
        "source": f"echo task ({d.symbols} symbols, echo after {d.echo_step} steps, window {d.seq_len})",
        "resumed_at": session.step if session.resumed else None,
    })
    # (steps, loss) of the progress records, for the live figure's loss curve.
    losses = ([r["step"] for r in log_metrics.history if "loss" in r],
              [r["loss"] for r in log_metrics.history if "loss" in r])
    running = Running(device)
    stopped_by = session.stopped_by(max_steps)
    title = (f"echo: {config.model.cell.upper()} {config.model.layers}x{config.model.hidden}, "
             f"{d.symbols} symbols, echo {d.echo_step}, window {d.seq_len}, batch {d.batch_size}")

    def evaluate_and_save() -> None:
        result = evaluate_echo(model, val_streams, val_series, device=device)
        extra["val_loss"] = result.loss
        improved = extra["best_val_loss"] is None or result.loss < extra["best_val_loss"]
        if improved:
            extra["best_val_loss"], extra["best_val_accuracy"] = result.loss, result.accuracy
        scheduler.step(result.loss)
        record = {"step": session.step, "time": round(session.elapsed(), 3), "lr": optimizer.param_groups[0]["lr"],
                  "val_loss": result.loss, "val_accuracy": result.accuracy, "val_scored": result.scored}
        reporter.on_eval({**record, "improved": improved})
        log_metrics(record)
        session.save(("best", "last") if improved else ("last",))

    model.train()
    try:
        while stopped_by is None:
            for batch in session.epochs(streams.epoch, *numpy_rng_accessors(streams.rng)):
                # A new series starts with batch.reset: train_step then starts from zeros;
                # otherwise it carries the previous window's state, detached (truncated BPTT).
                out = session_step(session, model, optimizer, batch, running, clip=t.clip, on_nan=t.on_nan,
                                   device=device, tokens=tokens_per_step)
                step = session.step
                if step % t.log_every == 0 or step == max_steps:
                    record = running.record(step, session.elapsed(), optimizer.param_groups[0]["lr"])
                    extra["train_loss"], extra["train_accuracy"] = record["loss"], record["accuracy"]
                    log_metrics(record)
                    losses[0].append(step)
                    losses[1].append(record["loss"])
                    reporter.on_step({**record, "max_steps": max_steps, "max_time": t.max_time,
                                      "epoch": step / steps_per_epoch, "example": None})
                if live is not None and step % t.plot_every == 0 and out.predictions is not None:
                    live.update(losses=losses, x=batch.x.numpy(), y=batch.y.numpy(),
                                predicted=out.predictions.cpu().numpy(), offset=batch.offset,
                                title=f"{title} — step {step}, epoch {step / steps_per_epoch:.1f}")
                stopped_by = session.stopped_by(max_steps)
                if stopped_by or step % t.eval_every == 0:
                    evaluate_and_save()
                if stopped_by:
                    break
                session.after_step()
    finally:
        log_metrics.close()
        if live is not None:
            live.close()
    seconds = session.elapsed()
    reporter.on_end({"step": session.step, "tokens": session.progress.tokens, "seconds": seconds, **extra,
                     "stopped_by": stopped_by})
    return TrainResult(steps=session.step, tokens=session.progress.tokens, seconds=seconds,
                       best_val_loss=extra["best_val_loss"], last_val_loss=extra["val_loss"],
                       train_loss=extra["train_loss"], stopped_by=stopped_by, train_accuracy=extra["train_accuracy"],
                       history=log_metrics.history)
