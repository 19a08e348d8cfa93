"""Terminal output for the CLI: a rich progress bar on a terminal, plain log lines elsewhere.

Everything goes to stderr, so that stdout carries only what a command
produces (generated text, JSON).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rnnkit.training.loop import Reporter

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
        self.rate_unit = "tok/s"
        self.start = time.perf_counter()

    def print(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def on_start(self, info: dict[str, Any]) -> None:
        self.start = time.perf_counter()
        self.rate_unit = "examples/s" if info.get("unit") == "examples" else "tok/s"
        limits = []
        if info["max_steps"]:
            limits.append(f"{info['max_steps']} steps")
        if info["max_time"]:
            limits.append(f"{info['max_time']:g} s")
        self.print(
            f"[bold]training[/] {human(info['parameters'])} parameters on {escape(info['source'])} "
            f"({human(info['train_tokens'])} train / {human(info['val_tokens'])} validation "
            f"{info.get('unit', 'tokens')}, "
            f"vocabulary {info['vocab_size']}{', cached ids' if info['from_cache'] else ''}) "
            f"on {info['device']}; {info['steps_per_epoch']} steps per epoch; stop after {' or '.join(limits)}"
            + (f"; resuming at step {info['resumed_at']}" if info.get("resumed_at") is not None else "")
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
            total = info["max_steps"] or info["max_time"]
            self.task = self.progress.add_task("train", total=total, status="")
            self._by_time = not info["max_steps"]

    def on_step(self, info: dict[str, Any]) -> None:
        status = (
            f"step {info['step']}  epoch {info['epoch']:.2f}  loss {info['loss']:.4f}  "
            f"acc {info['accuracy']:.3f}  {human(info.get('examples_per_s', info['tokens_per_s']))} {self.rate_unit}"
        )
        if self.progress is not None:
            done = info["time"] if self._by_time else info["step"]
            if info["max_steps"] and info["max_time"]:
                # Whichever limit comes first decides how far along we are.
                done = max(info["step"] / info["max_steps"], info["time"] / info["max_time"]) * info["max_steps"]
            self.progress.update(self.task, completed=done, status=status)
        else:
            self.print(f"{status}  lr {info['lr']:.3g}  {info['time']:.0f}s")
        if info.get("example"):
            self.print(f"  {escape(info['example'])}")

    def on_eval(self, info: dict[str, Any]) -> None:
        mark = "  [green]best[/]" if info.get("improved") else ""
        if "val_perplexity" not in info:
            if "epoch" in info and "train_accuracy" in info:  # a classifier's epoch summary
                val = (f"  validation accuracy {info['val_accuracy']:.4f}  loss {info['val_loss']:.4f}"
                       if "val_accuracy" in info else "")
                self.print(f"[bold]epoch {info['epoch']}[/]  train accuracy {info['train_accuracy']:.4f}  "
                           f"loss {info['train_loss']:.4f}{val}{mark}")
            elif "val_accuracy" in info:  # per-step labelling (echo)
                self.print(f"[bold]step {info['step']}[/]  validation loss {info['val_loss']:.4f}  "
                           f"accuracy {info['val_accuracy']:.4f}  lr {info['lr']:.3g}{mark}")
            return
        self.print(
            f"[bold]step {info['step']}[/]  validation loss {info['val_loss']:.4f}  "
            f"perplexity {info['val_perplexity']:.2f}  bits/char {info['val_bits_per_char']:.3f}  "
            f"lr {info['lr']:.3g}{mark}"
        )

    def on_sample(self, prefix: str, text: str) -> None:
        self.print(f"[dim]--- sample from {escape(repr(prefix))}:[/]\n{escape(text)}")

    def on_save(self, path: Path, names: tuple[str, ...]) -> None:
        pass  # the end-of-run summary says where checkpoints are

    def on_end(self, info: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
        best = f", best validation loss {info['best_val_loss']:.4f}" if info["best_val_loss"] is not None else ""
        if info.get("best_val_accuracy") is not None:
            best = f", best validation accuracy {info['best_val_accuracy']:.4f}"
        tokens = f", {human(info['tokens'])} tokens" if info.get("tokens") else ""
        self.print(
            f"[bold]done[/]: {info['step']} steps{tokens} in {info['seconds']:.0f} s "
            f"(stopped by {info['stopped_by']}){best}"
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
