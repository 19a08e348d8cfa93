"""The echo task: per-step labelling of a generated series with truncated BPTT.

The network is a :class:`~rnnkit.models.language_model.LanguageModel` whose
vocabulary is the task's symbols: at every step it reads one symbol and
predicts the symbol it read ``echo_step`` steps earlier (many-to-many). Each
epoch draws a fresh series (see :mod:`rnnkit.data.synthetic`); the state starts
at zero at its first window and is carried, detached, through the rest.
Validation runs the same way over one fixed held-out series and scores only
the steps whose echo lies inside their row.
"""

from __future__ import annotations

from pathlib import Path

from rnnkit.config import RunConfig
from rnnkit.data.synthetic import SYMBOL_CHARS, EchoBatch, streams_for
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_echo
from rnnkit.training import engine
from rnnkit.training.engine import Forward, Validation
from rnnkit.training.events import EndEvent, Reporter, StartEvent
from rnnkit.training.lm import Running, TrainResult, WindowTask
from rnnkit.training.session import MetricsLog, Resume, Session, StopFlag, numpy_rng_accessors

VALIDATION_SEED_OFFSET = 1_000_003  # the held-out series never equals a training one


def echo_tokenizer(symbols: int) -> CharTokenizer:
    """Symbols 0..k-1 written as the characters 0-9a-z, so a checkpoint describes itself."""
    return CharTokenizer(chars=list(SYMBOL_CHARS[:symbols]))


class EchoTask(WindowTask):
    name = "echo"

    def __init__(self, config: RunConfig, *, warn=None) -> None:
        d, t = config.data, config.train
        self.tokenizer = echo_tokenizer(d.symbols)
        self.streams = streams_for(config, seed=t.seed)
        self.val_streams = streams_for(config, seed=t.seed + VALIDATION_SEED_OFFSET)
        self.val_series = self.val_streams.series()
        super().__init__(config, vocab_size=d.symbols, tokens_per_step=d.batch_size * d.seq_len,
                         steps_per_epoch=self.streams.steps_per_epoch)
        self.counters = dict.fromkeys(("best_val_loss", "best_val_accuracy", "val_loss", "train_loss",
                                       "train_accuracy"))
        self.warn = warn
        self.live = None
        self.title = (f"echo: {config.model.stack_name()}, "
                      f"{d.symbols} symbols, echo {d.echo_step}, window {d.seq_len}, batch {d.batch_size}")

    def setup(self, session: Session) -> None:
        super().setup(session)
        t = self.config.train
        if t.live_plot and session.group.main:
            from rnnkit.plots import LivePlot

            self.live = LivePlot(t.live_plot, symbols=self.config.data.symbols, show=t.show, warn=self.warn)

    def begin(self, session: Session, metrics: MetricsLog, out_dir: Path) -> StartEvent:
        d = self.config.data
        # (steps, loss) of the progress records, for the live figure's loss curve.
        self.losses = ([r["step"] for r in metrics.history if "loss" in r],
                       [r["loss"] for r in metrics.history if "loss" in r])
        self.running = Running(self.device)
        return StartEvent(device=engine.describe_device(self.device, self.config.train.precision), parameters=self.model.num_parameters(), vocab_size=d.symbols,
                          train_size=d.series_length, val_size=d.series_length, unit="steps per series",
                          steps_per_epoch=self.steps_per_epoch, max_steps=self.max_steps,
                          max_time=self.config.train.max_time, from_cache=False,
                          source=f"echo task ({d.symbols} symbols, echo after {d.echo_step} steps, window {d.seq_len})",
                          resumed_at=session.step if session.resumed else None)

    def epoch(self):
        return (self.streams.epoch, *numpy_rng_accessors(self.streams.rng))

    def progress(self, session: Session, lr: float):
        record, rate, unit = super().progress(session, lr)
        self.losses[0].append(record["step"])
        self.losses[1].append(record["loss"])
        return record, rate, unit

    def after_step(self, session: Session, batch: EchoBatch, forward: Forward) -> None:
        step = session.step
        out = self._last
        if self.live is not None and step % self.config.train.plot_every == 0 and out.predictions is not None:
            self.live.update(losses=self.losses, x=batch.x.numpy(), y=batch.y.numpy(),
                             predicted=out.predictions.cpu().numpy(), offset=batch.offset,
                             title=f"{self.title} — step {step}, epoch {step / self.steps_per_epoch:.1f}")

    def validate(self, session: Session) -> Validation:
        extra = session.progress.extra
        result = evaluate_echo(self.model, self.val_streams, self.val_series, device=self.device)
        extra["val_loss"] = result.loss
        improved = extra["best_val_loss"] is None or result.loss < extra["best_val_loss"]
        if improved:
            extra["best_val_loss"], extra["best_val_accuracy"] = result.loss, result.accuracy
        record = {**self.base_record(session), "val_loss": result.loss, "val_accuracy": result.accuracy,
                  "val_scored": result.scored}
        summary = f"validation loss {result.loss:.4f}  accuracy {result.accuracy:.4f}  lr {record['lr']:.3g}"
        return Validation(record=record, improved=improved, headline=f"step {session.step}", summary=summary,
                          plateau_loss=result.loss)

    def finish(self, session: Session, stopped_by: str, metrics: MetricsLog) -> tuple[EndEvent, TrainResult]:
        extra = session.progress.extra
        best = (("validation accuracy", extra["best_val_accuracy"]) if extra["best_val_accuracy"] is not None else
                ("validation loss", extra["best_val_loss"]) if extra["best_val_loss"] is not None else None)
        end = EndEvent(step=session.step, tokens=session.progress.tokens, seconds=session.elapsed(),
                       stopped_by=stopped_by, best=best)
        return end, self.result(session, stopped_by, metrics)

    def close(self) -> None:
        if self.live is not None:
            self.live.close()


def train_echo(config: RunConfig, *, out_dir: str | Path, reporter: Reporter | None = None,
               stop: StopFlag | None = None, resume: Resume | None = None) -> TrainResult:
    """Train on the echo task as ``config`` says, writing checkpoints and metrics to ``out_dir``."""
    task = EchoTask(config, warn=getattr(reporter, "print", None))
    return engine.train(task, out_dir=out_dir, reporter=reporter, stop=stop, resume=resume)


def make_task(config: RunConfig, *, out: Path, resume: Resume | None = None, log=None,
              live: bool | None = None) -> EchoTask:
    if config.data.text or config.data.corpus:
        raise RnnkitError("--task echo generates its own series; drop --text/--corpus "
                          "(shape it with --series-length, --echo-step, --symbols)")
    return EchoTask(config, warn=log)


def summary(result: TrainResult, out: Path) -> list[str]:
    best = result.history and max((r.get("val_accuracy", 0.0) for r in result.history), default=0.0)
    return [f"checkpoints in {out}/checkpoints (best validation accuracy {best:.4f}); "
            f"draw the run with `rnnkit plot {out}`"]
