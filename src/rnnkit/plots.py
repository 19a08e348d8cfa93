"""PNG figures of training runs: loss and validation curves, and the echo task's classic figure.

matplotlib is an optional dependency (``pip install 'rnnkit[plot]'``); it is
imported on first use and draws with the file-only Agg backend unless a window
is asked for. Figures are written to a temporary file and renamed into place,
so an image viewer watching a live plot never reads half a PNG.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rnnkit.errors import RnnkitError
from rnnkit.files import atomic_file

DPI = 100


def has_display() -> bool:
    """Whether an interactive matplotlib window can open here."""
    if sys.platform in ("win32", "darwin"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pyplot(*, interactive: bool = False):
    try:
        import matplotlib
    except ImportError:
        raise RnnkitError("plots need matplotlib: pip install 'rnnkit[plot]'") from None
    if not interactive:
        matplotlib.use("Agg")  # files only, no display needed
    from matplotlib import pyplot as plt

    return plt


def check_png(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise RnnkitError(f"plots are written as PNG; give a file name ending in .png, got {path}")
    return path


def save_figure(fig, path: Path, *, dpi: int = DPI) -> Path:
    """Write ``fig`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as f:
            fig.savefig(f, dpi=dpi, format="png")
    except OSError as exc:
        raise RnnkitError(f"could not write {path}: {exc.strerror or exc}") from None
    return path


# ------------------------------------------------------------------ run curves


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``; a torn last line (a killed run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise RnnkitError(f"run directory not found: {run_dir}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RnnkitError(f"{run_dir} has no metrics.jsonl; pass a run directory made by `rnnkit train --out`") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the run was killed while writing its last line
            raise RnnkitError(f"{path} line {number} is not JSON") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise RnnkitError(f"{path} holds no records yet; train for at least one logging interval")
    return records


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))
              and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _wide_range(values: Sequence[float]) -> bool:
    """A log axis helps only when positive values span more than a factor of 20."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def plot_run(records: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Loss (training and validation) and accuracy against steps, one panel each."""
    path = check_png(path)
    plt = pyplot()
    has_accuracy = any(isinstance(r.get(k), (int, float)) for r in records for k in ("accuracy", "val_accuracy"))
    panels = 2 if has_accuracy else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels, 4.6), constrained_layout=True, squeeze=False)
    loss_ax = axes[0, 0]
    steps, loss = _series(records, "loss")
    if steps:
        loss_ax.plot(steps, loss, color="tab:blue", linewidth=1.4, label="training loss")
    v_steps, v_loss = _series(records, "val_loss")
    if v_steps:
        loss_ax.plot(v_steps, v_loss, color="tab:red", marker="o", markersize=4, linewidth=1.4,
                     label="validation loss")
    if _wide_range(loss + v_loss):
        loss_ax.set_yscale("log")
    # Mark where the learning rate changed (decay on a plateau), so a kink in the curve has a reason.
    lr_steps, lrs = _series(records, "lr")
    previous = None
    for step, lr in zip(lr_steps, lrs, strict=True):
        if previous is not None and lr != previous:
            loss_ax.axvline(step, color="grey", linestyle=":", linewidth=1)
            loss_ax.annotate(f"lr {lr:.2g}", (step, 1), xycoords=("data", "axes fraction"), fontsize=8,
                             rotation=90, va="top", ha="right", color="grey")
        previous = lr
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("loss")
    if has_accuracy:
        acc_ax = axes[0, 1]
        for key, colour, label in (("accuracy", "tab:blue", "training accuracy"),
                                   ("val_accuracy", "tab:red", "validation accuracy")):
            a_steps, acc = _series(records, key)
            if a_steps:
                style = {"marker": "o", "markersize": 4} if key == "val_accuracy" else {}
                acc_ax.plot(a_steps, acc, color=colour, linewidth=1.4, label=label, **style)
        acc_ax.set_xlabel("step")
        acc_ax.set_ylabel("accuracy")
        acc_ax.set_ylim(-0.02, 1.02)
        acc_ax.set_title("accuracy")
    for ax in axes[0]:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title, fontsize=11)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------ echo figure


class EchoFigure:
    """The echo tutorial's figure: the loss curve, then one panel per batch row.

    Each row panel shows three tracks over the current window: the input, the
    target (the input ``echo_step`` steps earlier) and the prediction, as bars
    whose height is the symbol (scaled to [0, 1]); wrong predictions are red
    (a wrong 0 as a short red bar).
    The axes and bars are built once and only their data change on
    :meth:`update`, which keeps a live plot cheap to redraw.
    """

    TRACKS = (("input", 2.4, "tab:blue"), ("target", 1.2, "tab:orange"), ("predicted", 0.0, "tab:green"))

    def __init__(self, fig, *, rows: int, width: int, symbols: int) -> None:
        self.fig, self.rows, self.width, self.scale = fig, rows, width, max(symbols - 1, 1)
        self.offset = 0
        grid = fig.add_gridspec(rows + 1, 1, height_ratios=[1.6] + [1.0] * rows, hspace=0.6,
                                top=0.95, bottom=0.06, left=0.09, right=0.98)
        self.loss_ax = fig.add_subplot(grid[0])
        (self.loss_line,) = self.loss_ax.plot([], [], color="tab:blue", linewidth=1.2)
        self.loss_ax.set_xlabel("step")
        self.loss_ax.set_ylabel("training loss")
        self.loss_ax.grid(True, which="both", alpha=0.3)
        self.row_axes, self.bars = [], []
        positions = np.arange(width)
        for r in range(rows):
            ax = fig.add_subplot(grid[r + 1])
            tracks = {}
            for name, base, colour in self.TRACKS:
                tracks[name] = ax.bar(positions, np.zeros(width), bottom=base, width=0.8, color=colour,
                                      edgecolor="none")
                ax.axhline(base, color="0.85", linewidth=0.8, zorder=0)
            ax.set_yticks([0.5, 1.7, 2.9], ["predicted", "target", "input"], fontsize=8)
            ax.set_ylim(-0.1, 3.5)
            ax.set_xlim(-0.6, width - 0.4)
            # Bars sit at 0..width-1; the tick labels show the step within the row.
            ax.xaxis.set_major_formatter(lambda value, _pos: f"{int(round(value)) + self.offset}")
            ax.tick_params(axis="x", labelsize=8)
            self.row_axes.append(ax)
            self.bars.append(tracks)
        self.row_axes[-1].set_xlabel("time step within the row (bar height: the symbol; blue: input, "
                                     "orange: target, green/red: predicted right/wrong)")

    def update(self, *, losses: tuple[Sequence[float], Sequence[float]], x: np.ndarray, y: np.ndarray,
               predicted: np.ndarray, offset: int = 0, title: str = "") -> None:
        self.offset = offset
        steps, values = losses
        self.loss_line.set_data(steps, values)
        if len(steps):
            self.loss_ax.set_yscale("log" if _wide_range(values) else "linear")
            self.loss_ax.relim()
            self.loss_ax.autoscale_view()
        self.loss_ax.set_title(title or "echo task", fontsize=11)
        for r in range(self.rows):
            for name, values_ in (("input", x[r]), ("target", y[r]), ("predicted", predicted[r])):
                for t, rect in enumerate(self.bars[r][name]):
                    height = values_[t] / self.scale
                    if name == "predicted":
                        right = predicted[r, t] == y[r, t]
                        rect.set_facecolor("tab:green" if right else "tab:red")
                        if not right:  # a wrong 0 would be a bar of no height: keep every mistake visible
                            height = max(height, 0.25)
                    rect.set_height(height)
            wrong = int((predicted[r] != y[r]).sum())
            self.row_axes[r].set_title(f"row {r}: {wrong} wrong of {self.width}", fontsize=9, loc="left")


def echo_figure_size(rows: int) -> tuple[float, float]:
    return 11.0, 3.0 + 1.35 * rows


def plot_echo(path: str | Path, *, symbols: int, **kwargs: Any) -> Path:
    """Write the echo figure (see :class:`EchoFigure`) to a PNG."""
    path = check_png(path)
    plt = pyplot()
    rows, width = kwargs["x"].shape
    fig = plt.figure(figsize=echo_figure_size(rows))
    try:
        EchoFigure(fig, rows=rows, width=width, symbols=symbols).update(**kwargs)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


class LivePlot:
    """The echo figure, redrawn during training into a PNG (and a window with ``show``)."""

    def __init__(self, path: str | Path, *, symbols: int, show: bool = False, warn=None) -> None:
        self.path = check_png(path)
        self.symbols = symbols
        self.show = show and has_display()
        if show and not self.show and warn is not None:
            warn("--show: no display here (DISPLAY is not set); writing the PNG only")
        self.plt = pyplot(interactive=self.show)
        self.figure: EchoFigure | None = None
        if self.show:
            self.plt.ion()

    def update(self, **kwargs: Any) -> None:
        if self.figure is None:
            rows, width = kwargs["x"].shape
            fig = self.plt.figure(figsize=echo_figure_size(rows))
            self.figure = EchoFigure(fig, rows=rows, width=width, symbols=self.symbols)
        self.figure.update(**kwargs)
        save_figure(self.figure.fig, self.path)
        if self.show:
            self.plt.pause(0.001)  # let the window redraw

    def close(self) -> None:
        if self.figure is not None:
            self.plt.close(self.figure.fig)
            self.figure = None


# ------------------------------------------------------------------ `rnnkit plot`


def plot_run_dir(run_dir: str | Path, *, out: str | Path | None = None, seed: int = 0,
                 task_figures: bool = True) -> list[Path]:
    """Draw a run's curves (to ``out``, default ``RUN/plots/curves.png``) and its task's own figures."""
    from rnnkit import tasks
    from rnnkit.checkpoint import load_checkpoint

    run = Path(run_dir)
    records = read_metrics(run)
    path = Path(out) if out else run / "plots" / "curves.png"
    written = [plot_run(records, path, title=run.resolve().name)]
    if task_figures and (run / "checkpoints").is_dir():
        ckpt = load_checkpoint(run, device="cpu")
        figures = tasks.get(ckpt.task).figures
        if figures:
            written += tasks.resolve(figures)(ckpt, records, path, seed=seed, name=run.resolve().name,
                                              beside=bool(out))
    return written


def echo_figures(ckpt, records: list[dict[str, Any]], curves: Path, *, seed: int, name: str,
                 beside: bool) -> list[Path]:
    """The echo figure of an echo checkpoint over the last window of a fresh series (seeded by ``seed``).

    Written as ``echo.png`` next to the curves, or ``CURVES-echo.png`` when the curves' file was named.
    """
    from rnnkit.data.synthetic import streams_for
    from rnnkit.evaluation import evaluate_echo

    streams = streams_for(ckpt.run_config, seed=seed)
    result = evaluate_echo(ckpt.model, streams, streams.series(), device=next(ckpt.model.parameters()).device)
    steps = [r["step"] for r in records if isinstance(r.get("loss"), (int, float))]
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    path = curves.with_name(f"{curves.stem}-echo.png") if beside else curves.with_name("echo.png")
    return [plot_echo(path, losses=(steps, losses), x=result.x.numpy(), y=result.y.numpy(),
                      predicted=result.predicted.numpy(), symbols=ckpt.run_config.data.symbols, offset=result.offset,
                      title=f"{name}: accuracy {result.accuracy:.4f} on a fresh series (last window shown)")]


# ------------------------------------------------------------------ `rnnkit inspect`

NEWLINE_GLYPH = "\u21b5"  # ↵: where a line ended (DejaVu Sans Mono has it)


def _text_grid(text: str, values: np.ndarray, *, width: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Lay ``text`` out in rows of at most ``width`` characters, breaking at newlines.

    Returns the (rows, width) grid of ``values`` (one per character, NaN where there is none)
    and each character's (row, column, glyph) to write on it.
    """
    cells, row, col = [], 0, 0
    for i, ch in enumerate(text):
        if col >= width:
            row, col = row + 1, 0
        cells.append((row, col, i, NEWLINE_GLYPH if ch == "\n" else ch))
        row, col = (row + 1, 0) if ch == "\n" else (row, col + 1)
    rows = max((r for r, _, _, _ in cells), default=0) + 1
    grid = np.full((rows, width), np.nan)
    for r, c, i, _ in cells:
        grid[r, c] = values[i]
    return grid, [(r, c, g) for r, c, _, g in cells]


def _diverging(values: np.ndarray) -> tuple[float, float]:
    """Colour limits: symmetric about 0 for a signed signal, about the middle of its range for a positive one."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return -1.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    if low < 0:
        m = max(abs(low), abs(high), 1e-6)
        return -m, m
    return low, max(high, low + 1e-6)


def _tint(cmap):
    """``cmap`` as :func:`plot_coloured_text` shows it (70% colour, 30% white), for its colour bar."""
    from matplotlib.colors import ListedColormap

    colours = cmap(np.linspace(0, 1, 256))
    colours[:, :3] = 0.3 + 0.7 * colours[:, :3]
    return ListedColormap(colours)


def plot_coloured_text(path: str | Path, panels: Sequence[tuple[str, str, np.ndarray]], *, width: int = 100,
                       title: str = "", cmap: str = "RdBu_r", colour_label: str = "activation",
                       limits: tuple[float, float] | None = None) -> Path:
    """One panel per (label, text, value per character): the text, each character on its value's colour.

    Each panel has its own colour scale (:func:`_diverging`), or all share ``limits``.
    """
    path = check_png(path)
    plt = pyplot()
    grids = [_text_grid(text, values, width=width) for _, text, values in panels]
    heights = [g.shape[0] for g, _ in grids]
    fig, axes = plt.subplots(len(panels), 1, figsize=(0.092 * width + 1.6, 0.2 * sum(heights) + 0.55 * len(panels)
                                                      + 0.6), height_ratios=heights, squeeze=False,
                             layout="constrained")
    colours = plt.get_cmap(cmap)
    for ax, (label, _, values), (grid, glyphs) in zip(axes[:, 0], panels, grids, strict=True):
        low, high = limits or _diverging(values)
        # The colour map's ends are too dark to read black text on: keep 70% of the colour, 30% white.
        tinted = colours(np.clip((grid - low) / (high - low), 0, 1))
        tinted[..., :3] = 0.3 + 0.7 * tinted[..., :3]
        tinted[np.isnan(grid)] = (1, 1, 1, 1)
        ax.imshow(tinted, aspect="auto", interpolation="nearest")
        image = plt.cm.ScalarMappable(norm=plt.Normalize(low, high), cmap=_tint(colours))
        for r, c, glyph in glyphs:
            if not glyph.isspace():
                ax.text(c, r, glyph, ha="center", va="center", family="DejaVu Sans Mono", fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9.5, loc="left", family="DejaVu Sans Mono")
        bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        bar.ax.tick_params(labelsize=7)
        bar.set_label(colour_label, fontsize=7)
    if title:  # wrapped to the figure's width (about 10 characters an inch at 11 pt), so a narrow text keeps it
        import textwrap

        fig.suptitle(textwrap.fill(title, max(30, int(fig.get_figwidth() * 10))), fontsize=11)
    return _save_closed(plt, fig, path)


def plot_heatmap(path: str | Path, rows: Sequence[tuple[str, np.ndarray]], ticks: Sequence[str], *,
                 title: str = "", cmap: str = "RdBu_r") -> Path:
    """Units (rows, each scaled to [-1, 1], see :func:`_diverging`) over time (columns, labelled with the tokens)."""
    path = check_png(path)
    plt = pyplot()
    scaled = []
    for _, v in rows:  # each unit to [-1, 1]: about 0 when it changes sign, else about the middle of its range
        low, high = _diverging(v)
        scaled.append(2 * (v - low) / (high - low) - 1)
    data = np.stack(scaled)  # (units, T)
    steps = data.shape[1]
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.11 * steps, 22.0), 1.2 + 0.42 * len(rows)), constrained_layout=True)
    image = ax.imshow(data, cmap=cmap, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], family="DejaVu Sans Mono", fontsize=8.5)
    shown = [NEWLINE_GLYPH if t == "\n" else (t if t.strip() else "\u2423") for t in ticks]  # ␣: a space
    ax.set_xticks(range(steps), shown, family="DejaVu Sans Mono", fontsize=7)
    ax.tick_params(axis="x", length=0)
    ax.set_xlabel("tokens read (\u2423 a space, \u21b5 a newline)", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    bar.set_label("activation, scaled per unit", fontsize=8)
    if title:
        ax.set_title(title, fontsize=11)
    return _save_closed(plt, fig, path)


def _save_closed(plt, fig, path: Path) -> Path:
    """Write an inspect figure (at 110 dpi: small monospace text stays sharp) and free it."""
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
