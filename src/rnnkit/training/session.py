"""What every training loop shares: counters, checkpoints with trainer state, exact resume, stopping.

A :class:`Session` keeps the bookkeeping beside the engine's loop
(:mod:`rnnkit.training.engine`): the step and token counters, the wall clock
across resumed segments, ``metrics.jsonl``, periodic checkpoints, the stop
requests sent by signals, and the count of non-finite steps.

Every checkpoint it writes carries, beside the weights, the *trainer state*:
``trainer.safetensors`` (optimizer tensors, torch RNG states, the carried
hidden state of sequential batching) and ``trainer.json`` (counters, optimizer
hyper-parameters, scheduler, Python/NumPy RNG states, the data position). The
data position is the batcher's RNG state at the start of the current epoch
plus the number of batches already consumed in it: a resumed run replays the
epoch's draws and skips the consumed batches, so it sees the very batches the
uninterrupted run would have seen. On CPU the weights then come out bitwise
identical.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from rnnkit import checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.files import write_atomic
from rnnkit.runtime import SINGLE, Distributed, rank_rows

TRAINER_FORMAT_VERSION = 1
#: Stop a ``--on-nan skip`` run after this many non-finite batches in a row: it is not recovering.
MAX_CONSECUTIVE_SKIPS = 50


# ------------------------------------------------------------------ stop requests


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves at the next step boundary and stops.

    Stopping between steps (never inside one) is what makes the saved state
    consistent. A second signal while the first is being honoured stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any = None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # asked twice: do not wait for the step to end
        self.signum = signum

    def request(self, signum: int = signal.SIGINT) -> None:
        """Ask the run to stop as a signal would (for embedding code and tests)."""
        self.signum = signum


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Route SIGINT and SIGTERM to ``flag`` while training (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(Exception):
    """Raised out of a training function after a stop request, once the run is saved."""

    def __init__(self, signum: int, step: int, out_dir: Path) -> None:
        super().__init__(f"stopped by signal {signum} at step {step}")
        self.signum, self.step, self.out_dir = signum, step, out_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class NonFinite(RnnkitError):
    """A loss or gradient became NaN or infinite."""


# ------------------------------------------------------------------ metrics log


class MetricsLog:
    """``RUN/metrics.jsonl``: one JSON record per line, flushed as written, and kept in memory."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: keep the records in memory only (ranks other than 0)
        self.history: list[dict[str, Any]] = []
        self._file = open(path, "a", encoding="utf-8") if path is not None else None

    def reopen(self) -> None:
        if self._file is not None and self._file.closed:
            self._file = open(self.path, "a", encoding="utf-8")

    def __call__(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ------------------------------------------------------------------ trainer state


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into JSON (hyper-parameters) and tensors (moments, step counts)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "plain_state": plain}, tensors


def _load_optimizer_state(optimizer: torch.optim.Optimizer, data: dict[str, Any],
                          tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for pid, entries in data["plain_state"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = []
    for saved, live in zip(data["param_groups"], optimizer.state_dict()["param_groups"], strict=True):
        # JSON turned tuples (Adam's betas) into lists; give them their type back.
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> list[Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


@dataclass
class Progress:
    """The counters a resumed run continues from."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training time of earlier segments of this run
    epoch: int = 0  # epochs started
    position: int = 0  # batches consumed in the current epoch
    skipped: int = 0  # non-finite batches skipped (--on-nan skip)
    epoch_data_state: dict[str, Any] = field(default_factory=dict)  # the batcher at the current epoch's start
    extra: dict[str, Any] = field(default_factory=dict)  # the loop's own counters (best loss, ...)


def load_trainer_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``trainer.json`` and ``trainer.safetensors`` of a checkpoint (no pickle involved)."""
    try:
        data = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
        checkpoint.refuse_pickles(folder)
        checkpoint.check_safetensors(folder / "trainer.safetensors")
        tensors = load_file(str(folder / "trainer.safetensors"))
    except FileNotFoundError as exc:
        raise RnnkitError(f"checkpoint {folder} has no trainer state ({Path(exc.filename).name}); it was saved "
                          "for inference only and cannot be resumed") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise RnnkitError(f"cannot read the trainer state in {folder}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise RnnkitError(f"{folder / 'trainer.json'} is not an rnnkit trainer state")
    if data["version"] > TRAINER_FORMAT_VERSION:
        raise RnnkitError(f"{folder} holds trainer state version {data['version']}, newer than this rnnkit reads "
                          f"({TRAINER_FORMAT_VERSION}); upgrade rnnkit")
    return data, tensors


@dataclass
class Resume:
    """Where ``rnnkit train --resume`` picks up: a checkpoint folder and its trainer state."""

    folder: Path
    data: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def from_run(cls, run_dir: str | Path) -> Resume:
        folder = checkpoint.resolve(run_dir, prefer="last")
        data, tensors = load_trainer_state(folder)
        return cls(folder=folder, data=data, tensors=tensors)


# ------------------------------------------------------------------ the session


class Session:
    """Bookkeeping for one training run (or one resumed segment of it)."""

    def __init__(
        self,
        *,
        config: RunConfig,
        out_dir: Path,
        task: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tokenizer: Tokenizer,
        scheduler: Any = None,
        generators: dict[str, torch.Generator] | None = None,
        extra: dict[str, Any] | None = None,
        stop: StopFlag | None = None,
        resume: Resume | None = None,
        on_save: Callable[[Path, tuple[str, ...]], None] | None = None,
        group: Distributed = SINGLE,
        scaler: Any = None,
    ) -> None:
        self.config, self.out_dir, self.task = config, out_dir, task
        self.model, self.optimizer, self.scheduler, self.tokenizer = model, optimizer, scheduler, tokenizer
        self.generators = generators or {}
        self.checkpoint_extra = extra or {}
        self.stop = stop or StopFlag()
        self.on_save = on_save
        self.group = group  # rank 0 alone writes; every rank takes part in saving the carried state
        self.scaler = scaler  # fp16's gradient scaler, saved and restored with the rest
        self._agreed: dict[str, Any] = {}  # what every rank decided at the end of the step (see step_end)
        self.progress = Progress()
        self.lr = optimizer.param_groups[0]["lr"]  # the learning rate of the latest step (the engine's schedule)
        self.carry: Any = None  # the hidden state carried into the next batch (sequential sampling)
        self.consecutive_skips = 0
        self._resume = resume
        self._replay: tuple[dict[str, Any], int] | None = None
        self._segment_start = time.perf_counter()
        self._last_save = self._segment_start
        self.metrics: MetricsLog | None = None
        if resume is not None:
            self._restore(resume)

    # ---- time and counters

    def elapsed(self) -> float:
        """Training seconds of the whole run, earlier segments included."""
        return self.progress.seconds + time.perf_counter() - self._segment_start

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def replaying(self) -> bool:
        """True until a resumed run has re-entered the epoch it stopped in."""
        return self._replay is not None

    @property
    def resumed(self) -> bool:
        return self._resume is not None

    def open_metrics(self) -> MetricsLog:
        """``metrics.jsonl``: on resume, keep the records up to the resumed step (later ones are redone)."""
        path = self.out_dir / "metrics.jsonl"
        kept: list[dict[str, Any]] = []
        if not self.group.main:
            self.metrics = MetricsLog(None)
            return self.metrics
        if self.resumed and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a torn last line of the killed run
                if isinstance(record, dict) and record.get("step", 0) <= self.progress.step:
                    kept.append(record)
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.metrics = MetricsLog(path)
        self.metrics.history[:0] = kept
        return self.metrics

    # ---- data position

    def epochs(self, make_epoch: Callable[[], Iterator[Any]], get_state: Callable[[], dict[str, Any]],
               set_state: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
        """Yield the batches of the current epoch, from where a resumed run stopped.

        ``make_epoch`` starts an epoch of the batcher; ``get_state``/``set_state``
        read and restore whatever decides its draws (an RNG state, an epoch number).
        """
        if self._replay is not None:
            state, skip = self._replay
            self._replay = None
            set_state(state)
            self.progress.epoch_data_state = state
        else:
            self.progress.epoch += 1
            self.progress.position = 0
            skip = 0
            self.progress.epoch_data_state = get_state()
        for index, batch in enumerate(make_epoch()):
            if index >= skip:
                yield batch

    # ---- one step

    def check_finite(self, finite: bool, *, skip: bool) -> bool:
        """After a step: False when its loss or gradient was not finite (and the update was not applied)."""
        if finite:
            self.consecutive_skips = 0
            return True
        step = self.progress.step + 1
        if not skip:
            raise NonFinite(
                f"the loss or a gradient became NaN/inf at step {step}; the run stopped and its last good "
                f"checkpoint is kept in {self.out_dir}. Lower --lr, use --clip, or pass --on-nan skip"
            )
        self.progress.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFinite(
                f"{self.consecutive_skips} batches in a row had a NaN/inf loss or gradient (up to step {step}); "
                f"the run is not recovering. Its last good checkpoint is kept in {self.out_dir}; lower --lr"
            )
        return False

    def advance(self, tokens: int) -> None:
        """Count one finished step (applied or skipped)."""
        self.progress.step += 1
        self.progress.position += 1
        self.progress.tokens += tokens

    def after_step(self) -> None:
        """Periodic checkpoints, then honour a stop request (at a step boundary, so the state is whole)."""
        t = self.config.train
        agreed = self._agreed or self._decide()
        self._agreed = {}
        # A checkpoint written since the clock was read (a validation's) resets the clock.
        clock_due = bool(agreed["save_due"]) and self._last_save <= agreed["decided_at"]
        due = bool(t.save_every and self.progress.step % t.save_every == 0) or clock_due
        if due:
            self.save(("last",))
        if agreed["signal"]:
            if not due:
                self.save(("last",))
            raise Stopped(agreed["signal"], self.progress.step, self.out_dir)

    def refuse_if_finished(self, how: str | None) -> None:
        """A resumed run that already met its stop condition has nothing to do: say so instead."""
        if self.resumed and how:
            raise RnnkitError(
                f"the run in {self.out_dir} already finished at step {self.progress.step} (stopped by {how}); "
                "pass a larger --max-steps, --epochs or --max-time to train it further"
            )

    def stopped_by(self, max_steps: int) -> str | None:
        t = self.config.train
        if max_steps and self.progress.step >= max_steps:
            return "steps"
        if t.max_time and self.elapsed() >= t.max_time:
            return "time"
        return None

    def step_end(self, max_steps: int) -> str | None:
        """After a step: whether the run stops now, decided alike on every rank.

        The clock (``--max-time``, ``--save-every-seconds``) and signals reach ranks at
        different moments; one all-reduce per step makes them agree, so that every rank
        saves, validates and stops at the same step.
        """
        self._agreed = self._decide()
        if max_steps and self.progress.step >= max_steps:
            return "steps"
        return "time" if self._agreed["time_up"] else None

    def _decide(self) -> dict[str, int]:
        t = self.config.train
        now = time.perf_counter()
        local = {"time_up": int(bool(t.max_time and self.elapsed() >= t.max_time)),
                 "save_due": int(bool(t.save_every_seconds and now - self._last_save >= t.save_every_seconds)),
                 "signal": self.stop.signum or 0}
        if self.group.active:
            import torch.distributed as dist

            flags = torch.tensor(list(local.values()), dtype=torch.int64)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            local = dict(zip(local, flags.tolist(), strict=True))
        return {**local, "decided_at": now}

    # ---- checkpoints

    def save(self, names: tuple[str, ...], state: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint (weights and trainer state) and point ``names`` at it."""
        info = {"step": self.progress.step, "tokens": self.progress.tokens, "epoch_index": self.progress.epoch,
                "seconds": round(self.elapsed(), 3), "skipped": self.progress.skipped, **self.progress.extra,
                **(state or {})}
        trainer = self._trainer_state()  # every rank: the carried state is gathered from all of them
        if not self.group.main:
            self._last_save = time.perf_counter()
            return self.out_dir / "checkpoints" / f"step-{self.progress.step:09d}"
        path = checkpoint.save_to_run(
            self.out_dir, names=names, step=self.progress.step, model=self.model, tokenizer=self.tokenizer,
            task=self.task, run_config=self.config, state=info, extra=self.checkpoint_extra,
            trainer=trainer,
        )
        self._last_save = time.perf_counter()
        if self.on_save is not None:
            self.on_save(path, names)
        return path

    def _trainer_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        progress = asdict(self.progress)
        progress["seconds"] = self.elapsed()
        optimizer, tensors = _optimizer_state(self.optimizer)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        for name, gen in self.generators.items():
            tensors[f"rng.generator.{name}"] = gen.get_state()
        for i, tensor in enumerate(gather_rows(self.carry, self.group) or ()):
            tensors[f"carry.{i}"] = tensor.detach().cpu().contiguous()
        data = {
            "version": TRAINER_FORMAT_VERSION,
            "progress": progress,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": {"python": _python_rng_state(), "numpy": _numpy_rng_state()},
        }
        return data, tensors

    def _restore(self, resume: Resume) -> None:
        data, tensors = resume.data, resume.tensors
        try:
            folder_model = checkpoint.load_checkpoint(resume.folder, device="cpu").model
            self.model.load_state_dict(folder_model.state_dict())
            _load_optimizer_state(self.optimizer, data["optimizer"], tensors)
            if self.scheduler is not None and data.get("scheduler") is not None:
                self.scheduler.load_state_dict(data["scheduler"])
            if self.scaler is not None and data.get("scaler") is not None:
                self.scaler.load_state_dict(data["scaler"])
            self.progress = Progress(**data["progress"])
            version, internal, gauss = data["rng"]["python"]
            random.setstate((version, tuple(internal), gauss))
            kind, keys, pos, has_gauss, cached = data["rng"]["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
            torch.set_rng_state(tensors["rng.torch"])
            cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)
            for name, gen in self.generators.items():
                if f"rng.generator.{name}" in tensors:
                    gen.set_state(tensors[f"rng.generator.{name}"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RnnkitError(f"the trainer state in {resume.folder} is incomplete or does not match this run "
                              f"({type(exc).__name__}: {exc})") from None
        carry = [tensors[f"carry.{i}"] for i in range(len([k for k in tensors if k.startswith("carry.")]))]
        device = next(self.model.parameters()).device
        # The saved state holds every stream; this rank carries its share (any world size that divides it).
        self.carry = shard_rows(tuple(t.to(device) for t in carry), self.group) if carry else None
        self._replay = (self.progress.epoch_data_state, self.progress.position)
        if self.progress.position == 0 and self.progress.epoch == 0:
            self._replay = None  # saved before the first epoch began
        self._segment_start = time.perf_counter()
        self._last_save = self._segment_start


def numpy_rng_accessors(rng: np.random.Generator) -> tuple[Callable[[], dict[str, Any]],
                                                           Callable[[dict[str, Any]], None]]:
    """``get_state``/``set_state`` for a batcher drawing from a NumPy generator."""

    def get() -> dict[str, Any]:
        return {"numpy_generator": rng.bit_generator.state}

    def put(state: dict[str, Any]) -> None:
        rng.bit_generator.state = state["numpy_generator"]

    return get, put


def no_data_state() -> tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]:
    """For batchers whose epochs are always the same (sequential streams)."""
    return dict, lambda state: None


# ------------------------------------------------------------------ the carried state across ranks


def shard_rows(state: tuple[torch.Tensor, ...], group: Distributed) -> tuple[torch.Tensor, ...]:
    """This rank's rows of a (layers, B, H) state."""
    if not group.active:
        return state
    rows = rank_rows(state[0].shape[1], group)
    return tuple(s[:, rows].contiguous() for s in state)


def gather_rows(state: tuple[torch.Tensor, ...] | None, group: Distributed) -> tuple[torch.Tensor, ...] | None:
    """Every rank's rows of a (layers, B_rank, H) state, in rank order: the state of all B streams."""
    if state is None or not group.active:
        return state
    import torch.distributed as dist

    whole = []
    for part in state:
        pieces = [torch.empty_like(part) for _ in range(group.world)]
        dist.all_gather(pieces, part.contiguous())
        whole.append(torch.cat(pieces, dim=1))
    return tuple(whole)
