"""Random vs sequential sampling: the d2l from-scratch character-RNN experiment as one function.

:func:`compare_sampling` trains two copies of the same language model (same
configuration, same initial weights) side by side on the same text, one
epoch of each in turn:

* ``random``: every batch is B windows at random offsets, each starting from
  a zero state (``Batch.reset`` is true), so the model only ever learns from
  T characters of context;
* ``sequential``: the text is cut into B parallel streams read window after
  window; the state at the end of one batch is carried into the next and
  detached, so context flows across batches while gradients stop at the
  window edge (truncated backpropagation through time).

Both use the library's own pieces: :func:`~rnnkit.data.batching.make_batcher`,
:func:`~rnnkit.training.lm.train_step` (which resets or carries and detaches
the state as the batch says, and clips the global gradient norm to
``train.clip``), :func:`~rnnkit.training.engine.build_optimizer`,
:func:`~rnnkit.evaluation.evaluate_lm` and
:func:`~rnnkit.generation.generate_ids`. Every ``every`` epochs (and after
the last) it reports, for each sampling, the perplexity as d2l prints it, the
exponential of the mean training loss over that epoch, the validation
perplexity when the text has a validation split, the training time so far
(evaluation and sampling excluded) and greedy continuations of the prefixes
(d2l's ``分开`` and ``不分开``). A PNG of both perplexity curves can be written.

The epoch count is ``train.epochs`` (a whole number); ``train.max_steps`` and
``train.max_time`` do not apply here, nor does checkpointing: this is an
experiment, not a training run.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from rnnkit.config import DataConfig, RunConfig
from rnnkit.data.batching import make_batcher
from rnnkit.data.lm_data import LMData, prepare_lm_data, text_files
from rnnkit.errors import RnnkitError
from rnnkit.evaluation import evaluate_lm
from rnnkit.generation import generate_ids
from rnnkit.models.language_model import LanguageModel
from rnnkit.runtime import resolve_device, seed_everything, set_threads
from rnnkit.training.engine import build_optimizer
from rnnkit.training.lm import train_step

SAMPLINGS = ("random", "sequential")
D2L_PREFIXES = ("分开", "不分开")


@dataclass
class ComparisonRow:
    """One report line: where one sampling stands after ``epoch`` epochs."""

    epoch: int
    sampling: str  # "random" or "sequential"
    perplexity: float  # exp(mean training loss over this epoch), as d2l reports it
    val_perplexity: float | None  # on the validation split, from a cold state; None without one
    seconds: float  # training time of this sampling so far (evaluation and sampling excluded)
    continuations: dict[str, str] = field(default_factory=dict)  # prefix -> prefix + greedy continuation


@dataclass
class SamplingComparison:
    rows: list[ComparisonRow]
    # Per sampling, one (epoch, perplexity, seconds) per epoch: the curves of the plot.
    curves: dict[str, list[tuple[int, float, float]]]
    source: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    parameters: int
    plot_path: Path | None = None

    def table(self) -> str:
        """The rows as a Markdown table, then the continuations."""
        lines = ["| epoch | sampling | perplexity | val perplexity | training seconds |",
                 "| ---: | --- | ---: | ---: | ---: |"]
        for r in self.rows:
            val = f"{r.val_perplexity:.2f}" if r.val_perplexity is not None else "-"
            lines.append(f"| {r.epoch} | {r.sampling} | {r.perplexity:.2f} | {val} | {r.seconds:.1f} |")
        lines.append("")
        for r in self.rows:
            for text in r.continuations.values():
                lines.append(f"- epoch {r.epoch}, {r.sampling}: {one_line(text)}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["plot_path"] = str(self.plot_path) if self.plot_path is not None else None
        return data


class CompareReporter:
    """Receives the comparison's events; the default ignores them all."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_epoch(self, sampling: str, epoch: int, perplexity: float, seconds: float) -> None: ...

    def on_row(self, row: ComparisonRow) -> None: ...

    def on_end(self, result: SamplingComparison) -> None: ...


class PrintReporter(CompareReporter):
    """Prints d2l-style progress lines (to stderr unless told otherwise)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        import sys

        self.stream = stream if stream is not None else sys.stderr

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def on_start(self, info: dict[str, Any]) -> None:
        self._print(
            f"comparing random and sequential sampling on {info['source']}: {info['train_tokens']:,} training / "
            f"{info['val_tokens']:,} validation tokens, vocabulary {info['vocab_size']}, "
            f"{info['parameters']:,} parameters, {info['epochs']} epochs of {info['steps_per_epoch']['random']} "
            f"(random) and {info['steps_per_epoch']['sequential']} (sequential) steps, on {info['device']}"
        )

    def on_row(self, row: ComparisonRow) -> None:
        val = f", validation perplexity {row.val_perplexity:.2f}" if row.val_perplexity is not None else ""
        self._print(f"epoch {row.epoch}, {row.sampling}: perplexity {row.perplexity:.2f}{val}, "
                    f"time {row.seconds:.1f} s")
        for text in row.continuations.values():
            self._print(f" - {one_line(text)}")


def one_line(text: str) -> str:
    """Line breaks shown as ↵, so a continuation stays on one line of a log or table."""
    return text.replace("\r", "").replace("\n", "↵")


def prepare_data(config: DataConfig, *, max_chars: int = 0, log=None) -> LMData:
    """The text of ``config`` tokenized and split by ``prepare_lm_data``, keeping only its first ``max_chars``.

    d2l's lyrics experiment trains on the first 10,000 characters of its
    corpus; ``max_chars`` is how to do the same with any text (0: all of it).
    Only that head is read; it goes through the same pipeline as a whole text.
    """
    if max_chars < 0:
        raise RnnkitError(f"max_chars must be >= 0, got {max_chars}")
    if not max_chars:
        return prepare_lm_data(config, log=log)
    files, source = text_files(config, log=log)
    head = ""
    for piece in files.pieces():  # only as much of the text as it takes
        head += piece
        if len(head) > max_chars:
            head, source = head[:max_chars], f"{source} (first {max_chars:,} characters)"
            break
    with tempfile.TemporaryDirectory(prefix="rnnkit-head-") as folder:
        path = Path(folder) / "head.txt"
        path.write_text(head, encoding="utf-8")
        data = prepare_lm_data(dataclasses.replace(config, text=str(path), corpus=None, encoding="utf-8"), log=log)
    data.source = source
    return data


def check_prefixes(data: LMData, prefixes: Sequence[str]) -> list[list[int]]:
    """Encode each prefix, or explain which characters the vocabulary lacks."""
    tokenizer = data.tokenizer
    encoded = []
    for prefix in prefixes:
        if not prefix:
            raise RnnkitError("an empty prefix has nothing to continue; give at least one character")
        missing = tokenizer.unknown_in(prefix)
        if missing:
            shown = " ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise RnnkitError(
                f"prefix {prefix!r}: {len(missing)} character(s) not in the vocabulary of {data.source}: {shown}; "
                "choose a prefix made of characters that occur in the training text"
            )
        encoded.append(tokenizer.encode(prefix).tolist())
    return encoded


def _check(config: RunConfig, *, every: int, length: int) -> int:
    """Refuse what the comparison cannot run; return its number of epochs."""
    epochs = config.train.epochs
    if epochs <= 0 or not float(epochs).is_integer():
        raise RnnkitError(f"the comparison needs a whole number of epochs (train.epochs / --epochs), got {epochs:g}")
    if every < 1:
        raise RnnkitError(f"every must be >= 1 epoch, got {every}")
    if length < 0:
        raise RnnkitError(f"the continuation length must be >= 0, got {length}")
    if config.data.target != "all":
        raise RnnkitError("the sampling comparison trains on every next token; use target 'all' (no --window)")
    return int(epochs)


def compare_sampling(
    config: RunConfig,
    *,
    data: LMData | None = None,
    max_chars: int = 0,
    every: int = 50,
    prefixes: Sequence[str] | None = None,
    length: int | None = None,
    reporter: CompareReporter | None = None,
    plot_path: str | Path | None = None,
) -> SamplingComparison:
    """Train with random and with sequential sampling; report every ``every`` epochs; optionally plot.

    ``data`` defaults to the text of ``config.data`` cut to ``max_chars``
    characters (see :func:`prepare_data`). The greedy continuations start from
    ``prefixes`` (default: ``train.sample_prefixes``, else d2l's 分开 and 不分开)
    and run ``length`` tokens (default: ``train.sample_length``). Returns the
    report rows, the per-epoch perplexity curves and, when ``plot_path`` is
    given, the PNG's path.
    """
    reporter = reporter or CompareReporter()
    d, t = config.data, config.train
    prefixes = list(prefixes if prefixes is not None else (t.sample_prefixes or D2L_PREFIXES))
    length = t.sample_length if length is None else length
    epochs = _check(config, every=every, length=length)
    set_threads(t.threads)
    device = resolve_device(t.device)
    if data is None:
        data = prepare_data(d, max_chars=max_chars)
    primes = check_prefixes(data, prefixes)  # before any training: a typo should not cost minutes
    runs = {sampling: _SamplingRun(config, data, sampling, device) for sampling in SAMPLINGS}
    parameters = runs["random"].model.num_parameters()
    _warm_up_optimizer(t.optimizer)
    reporter.on_start({
        "source": data.source, "vocab_size": data.tokenizer.vocab_size, "train_tokens": len(data.train),
        "val_tokens": len(data.val), "parameters": parameters, "epochs": epochs, "device": str(device),
        "steps_per_epoch": {s: r.batcher.steps_per_epoch for s, r in runs.items()},
    })

    rows: list[ComparisonRow] = []
    curves: dict[str, list[tuple[int, float, float]]] = {s: [] for s in SAMPLINGS}
    for epoch in range(1, epochs + 1):
        # One epoch of each in turn, so that both see the same drift in the host's speed.
        for sampling, run in runs.items():
            perplexity = run.train_epoch(epoch)
            curves[sampling].append((epoch, perplexity, run.seconds))
            reporter.on_epoch(sampling, epoch, perplexity, run.seconds)
            if epoch % every == 0 or epoch == epochs:
                row = ComparisonRow(epoch=epoch, sampling=sampling, perplexity=perplexity,
                                    val_perplexity=_val_perplexity(run.model, data, d), seconds=run.seconds,
                                    continuations=run.continuations(prefixes, primes, length))
                rows.append(row)
                reporter.on_row(row)

    result = SamplingComparison(rows=rows, curves=curves, source=data.source, vocab_size=data.tokenizer.vocab_size,
                                train_tokens=len(data.train), val_tokens=len(data.val), parameters=parameters)
    if plot_path is not None:
        result.plot_path = plot_perplexity(result, plot_path, title=_title(config))
    reporter.on_end(result)
    return result


class _SamplingRun:
    """One of the two models of the comparison, with its optimizer, batcher, carried state and clock."""

    def __init__(self, config: RunConfig, data: LMData, sampling: str, device: torch.device) -> None:
        d, t = config.data, config.train
        seed_everything(t.seed)  # the same initial weights for both
        self.sampling, self.device, self.data, self.clip = sampling, device, data, t.clip
        self.model = LanguageModel(config=config.model, vocab_size=data.tokenizer.vocab_size).to(device).train()
        self.optimizer = build_optimizer(t.optimizer, self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.batcher = make_batcher(data.train, sampling=sampling, seq_len=d.seq_len, batch_size=d.batch_size,
                                    target="all", seed=t.seed)
        self.state = None
        self.seconds = 0.0  # training time so far (evaluation and sampling excluded)

    def train_epoch(self, epoch: int) -> float:
        """One epoch; returns its perplexity, exp(mean training loss), as d2l reports it."""
        total = torch.zeros((), device=self.device)
        count = 0
        start = time.perf_counter()
        for batch in self.batcher.epoch():
            # train_step starts from zeros when batch.reset (every random batch, the first
            # sequential one of an epoch), else carries self.state detached (TBPTT).
            out = train_step(self.model, self.optimizer, batch, self.state, clip=self.clip, device=self.device)
            self.state = out.state
            total += out.loss * out.count
            count += out.count
        mean_loss = (total / count).item()
        self.seconds += time.perf_counter() - start
        if not math.isfinite(mean_loss):
            raise RnnkitError(f"{self.sampling} sampling: the training loss became {mean_loss} in epoch {epoch}; "
                              "lower --lr or clip harder (--clip)")
        return math.exp(min(mean_loss, 700.0))

    def continuations(self, prefixes: Sequence[str], primes: list[list[int]], length: int) -> dict[str, str]:
        """prefix -> prefix + its greedy continuation."""
        texts = {}
        for prefix, prime in zip(prefixes, primes, strict=True):
            new = generate_ids(self.model, prime, length=length, temperature=0)[0]  # greedy
            texts[prefix] = self.data.tokenizer.decode(prime + new)
        return texts


def _warm_up_optimizer(name: str) -> None:
    """Pay the one-off cost of a process's first ``optimizer.step()`` (lazy imports, seconds) off the clock."""
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = torch.zeros(1)
    build_optimizer(name, [p], lr=1e-3, weight_decay=0.0).step()


def _val_perplexity(model: torch.nn.Module, data: LMData, d: DataConfig) -> float | None:
    if len(data.val) < 2:
        return None
    loss, _, _ = evaluate_lm(model, data.val, batch_size=d.batch_size, seq_len=d.seq_len)
    return math.exp(min(loss, 700.0))


def _title(config: RunConfig) -> str:
    m, d, t = config.model, config.data, config.train
    return (f"{m.stack_name()}, {m.input} input, {m.backend} cells, "
            f"{t.optimizer.upper()} lr {t.lr:g}, clip {t.clip:g}, T={d.seq_len}, B={d.batch_size}")


def plot_perplexity(result: SamplingComparison, path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of both perplexity curves, against epochs and against training time."""
    from rnnkit.plots import check_png, pyplot, save_figure

    path = check_png(path)
    plt = pyplot()
    colours = {"random": "tab:orange", "sequential": "tab:blue"}
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for sampling, points in result.curves.items():
        if not points:
            continue
        epochs, ppl, seconds = zip(*points, strict=True)
        label = f"{sampling} (train)"
        by_epoch.plot(epochs, ppl, color=colours[sampling], linewidth=1.8, label=label)
        by_time.plot(seconds, ppl, color=colours[sampling], linewidth=1.8, label=label)
        val = [(r.epoch, r.val_perplexity, r.seconds) for r in result.rows
               if r.sampling == sampling and r.val_perplexity is not None]
        if val:
            v_epochs, v_ppl, v_seconds = zip(*val, strict=True)
            style = {"color": colours[sampling], "linestyle": "--", "marker": "o", "markersize": 4,
                     "label": f"{sampling} (validation)"}
            by_epoch.plot(v_epochs, v_ppl, **style)
            by_time.plot(v_seconds, v_ppl, **style)
    for ax, xlabel in ((by_epoch, "epoch"), (by_time, "training time (s)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    by_epoch.set_title("perplexity by epoch")
    by_time.set_title("perplexity by training time")
    fig.suptitle(f"random vs sequential sampling on {result.source}\n{title}", fontsize=11)
    try:
        return save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
