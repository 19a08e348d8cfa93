"""Terminal output for the CLI: a rich progress bar on a terminal, plain log lines elsewhere.

Everything goes to stderr, so that stdout carries only what a command
produces (generated text, JSON).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rnnkit.training.events import EndEvent, EvalEvent, Reporter, SampleEvent, StartEvent, StepEvent

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class ConsoleReporter(Reporter):
    """Shows training progress the way a person wants to read it."""

    def __init__(self, *, console: Console = stderr, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self.live = console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task = None
        self.start = time.perf_counter()

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def on_start(self, event: StartEvent) -> None:
        self.start = time.perf_counter()
        limits = []
        if event.max_steps:
            limits.append(f"{event.max_steps} steps")
        if event.max_time:
            limits.append(f"{event.max_time:g} s")
        self.print(
            f"[bold]training[/] {human(event.parameters)} parameters on {escape(event.source)} "
            f"({human(event.train_size)} train / {human(event.val_size)} validation {event.unit}, "
            f"vocabulary {event.vocab_size}{', cached ids' if event.from_cache else ''}) "
            f"on {event.device}; {event.steps_per_epoch} steps per epoch; stop after {' or '.join(limits)}"
            + (f"; resuming at step {event.resumed_at}" if event.resumed_at is not None else "")
        )
        if self.live:
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.max_steps or event.max_time, status="")
            self._by_time = not event.max_steps

    def on_step(self, event: StepEvent) -> None:
        status = (f"step {event.step}  epoch {event.epoch:.2f}  loss {event.loss:.4f}  "
                  f"acc {event.accuracy:.3f}  {human(event.rate)} {event.rate_unit}")
        if self.progress is not None:
            done = event.time if self._by_time else event.step
            if event.max_steps and event.max_time:
                # Whichever limit comes first decides how far along we are.
                done = max(event.step / event.max_steps, event.time / event.max_time) * event.max_steps
            self.progress.update(self.task, completed=done, status=status)
        else:
            self.print(f"{status}  lr {event.lr:.3g}  {event.time:.0f}s")
        if event.example:
            self.print(f"  {escape(event.example)}")

    def on_eval(self, event: EvalEvent) -> None:
        if event.summary is not None:
            mark = "  [green]best[/]" if event.improved else ""
            self.print(f"[bold]{escape(event.headline)}[/]  {escape(event.summary)}{mark}")

    def on_sample(self, event: SampleEvent) -> None:
        self.print(f"[dim]--- sample from {escape(repr(event.prefix))}:[/]\n{escape(event.text)}")

    def on_end(self, event: EndEvent) -> None:
        if self.progress is not None:
            self.progress.stop()
        best = f", best {event.best[0]} {event.best[1]:.4f}" if event.best is not None else ""
        tokens = f", {human(event.tokens)} tokens" if event.tokens else ""
        self.print(f"[bold]done[/]: {event.step} steps{tokens} in {event.seconds:.0f} s "
                   f"(stopped by {event.stopped_by}){best}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
