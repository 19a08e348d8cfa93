"""Training runs on disk: the run directory, the rules of resuming, and one call that trains any task.

:func:`train_run` is what ``rnnkit train`` does once its flags are parsed: it
checks the run directory (a new run never silently replaces an old one; a
resumed run keeps its own settings), asks the task registry which module
trains the configured task, lets that module read its data into an engine
task, replaces an old run only once the new one is known to start, trains
with SIGINT/SIGTERM routed to a clean stop, and records the run's full
configuration as ``config.toml``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnkit import tasks
from rnnkit.checkpoint import load_tokenizer, read_index
from rnnkit.config import RunConfig, set_value, validate
from rnnkit.errors import RnnkitError, describe_os_error
from rnnkit.runtime import init_distributed, keep_freed_memory, resolve_device, restarted
from rnnkit.training.events import Reporter
from rnnkit.training.session import Resume, StopFlag, Stopped, stop_on_signals

#: What a resumed run may change: when and how the run stops and saves, never what it computes.
RESUME_OVERRIDES = ("train.max_steps", "train.max_time", "train.epochs", "train.save_every",
                    "train.save_every_seconds", "train.log_every", "train.threads", "train.on_nan")


def flag_name(key: str) -> str:
    """``train.max_steps`` as the CLI spells it: ``--max-steps``."""
    return "--" + key.rpartition(".")[2].replace("_", "-")


class ResumeRefused(RnnkitError):
    """A resume was asked to change what the run computes."""


def resume_config(run_dir: str | Path, *, changes: dict[str, Any], recipe: bool = False,
                  overwrite: bool = False) -> tuple[RunConfig, Resume]:
    """The configuration of the run in ``run_dir`` with ``changes`` (dotted keys) applied, and where it resumes.

    Only :data:`RESUME_OVERRIDES` may change; ``recipe`` (a recipe or overrides were given) and
    ``overwrite`` are refused too.
    """
    run = Path(run_dir)
    if (run / "config.json").is_file():
        parent = run.parent.parent if run.parent.name == "checkpoints" else "the run directory"
        raise RnnkitError(f"--resume takes a run directory (the --out of `rnnkit train`), not a checkpoint folder: "
                          f"pass {parent}")
    resume = Resume.from_run(run)
    meta = json.loads((resume.folder / "config.json").read_text(encoding="utf-8"))
    config = RunConfig.from_dict(meta.get("run", {}), source=str(resume.folder / "config.json"))
    refused = sorted(key for key in changes if key not in RESUME_OVERRIDES)
    if recipe or refused or overwrite:
        what = ", ".join(refused) or ("--config/--set" if recipe else "--overwrite")
        raise ResumeRefused(f"--resume continues a run with its own settings; it cannot change {what} "
                            f"(it can change: {', '.join(flag_name(k) for k in RESUME_OVERRIDES)})")
    for key, value in changes.items():
        set_value(config, key, value, source="command line")
    validate(config)
    config.out = str(run_dir)
    step = resume.data.get("progress", {}).get("step", 0)
    if config.train.max_steps and step >= config.train.max_steps:
        raise RnnkitError(f"{run_dir} is already at step {step}, its --max-steps {config.train.max_steps}; "
                          f"pass a larger --max-steps (or --epochs/--max-time) to train it further")
    return config, resume


def restart_point(config: RunConfig, *, log=None) -> Resume | None:
    """Where a worker that torchrun restarted picks up: its run's last checkpoint (None: there is none yet).

    The restarted process runs the same command line, so its settings must be the run's own.
    """
    if not config.out or "last" not in read_index(config.out):
        return None
    resume = Resume.from_run(config.out)
    meta = json.loads((resume.folder / "config.json").read_text(encoding="utf-8"))
    saved = RunConfig.from_dict(meta.get("run", {}), source=str(resume.folder / "config.json"))
    for key in (*RESUME_OVERRIDES, "out"):
        section, _, name = key.rpartition(".")
        setattr(getattr(saved, section) if section else saved, name,
                getattr(getattr(config, section) if section else config, name))
    if saved != config:
        raise RnnkitError(f"torchrun restarted this worker, but {config.out} holds a run with other settings; "
                          "restart it with its own command line, or pass another --out")
    if log is not None:
        log(f"restarted by torchrun: resuming {config.out} from step {resume.data.get('progress', {}).get('step', 0)}")
    return resume


def same_tokenizer(tokenizer, resume: Resume | None) -> None:
    """A resumed run must read its text exactly as before."""
    if resume is not None and load_tokenizer(resume.folder).to_dict() != tokenizer.to_dict():
        raise RnnkitError(f"the training text changed since {resume.folder} was saved (its vocabulary differs); "
                          "resume needs the same text")


def run_directory(config: RunConfig, *, resume: Resume | None, overwrite: bool) -> tuple[Path, list[Path]]:
    """The run directory, and what of an old run in it the new one replaces (only with ``overwrite``)."""
    if not config.out:
        raise RnnkitError("no run directory: pass --out DIR (checkpoints and logs go there)")
    out = Path(config.out)
    old: list[Path] = []
    if resume is None:
        if out.exists() and not out.is_dir():
            raise RnnkitError(f"--out {out} is a file; give a folder for the run")
        old = [p for p in (out / "checkpoints", out / "metrics.jsonl") if p.exists()]
        if old and not overwrite:
            raise RnnkitError(f"{out} already holds a training run; pass --overwrite to replace it, continue it "
                              f"with --resume {out}, or choose another --out")
    check_writable(out)
    return out, old


def check_writable(out: Path) -> None:
    """Fail before reading any data when the run directory cannot be written.

    A real probe (make and remove a folder) rather than ``os.access``, which says yes
    to root on a read-only mount; nothing is left behind when the probe succeeds.
    """
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rnnkit-probe-", dir=base))
    except OSError as exc:
        raise RnnkitError(f"cannot write the run directory --out {out}: {describe_os_error(exc)}") from None


@dataclass
class RunOutcome:
    exit_code: int  # 0, or 130/143 after SIGINT/SIGTERM (the run is saved and resumable)
    notice: str | None = None  # why it stopped early, and how to continue: always shown (rank 0)
    summary: list[str] = field(default_factory=list)  # where the results are: shown unless quiet
    result: Any = None  # the task's result object


_SIGNAL_NAMES = {2: "interrupted", 15: "terminated"}


def train_run(config: RunConfig, *, resume: Resume | None = None, overwrite: bool = False,
              reporter: Reporter | None = None, log=None, live: bool | None = None) -> RunOutcome:
    """Train the run ``config`` describes (or continue ``resume``) in its run directory.

    Under torchrun every process calls this; rank 0 alone writes and prints. A worker
    that torchrun restarts (``--max-restarts``) continues its run from the last checkpoint.
    """
    group = init_distributed(config.train.device)
    from rnnkit.training.engine import autocast_dtype

    autocast_dtype(config.train.precision, resolve_device(config.train.device))  # fp16 without CUDA: say so first
    if not group.main:
        reporter, log, live = Reporter(), None, False
    reporter = reporter or Reporter()
    if resume is None and restarted():
        resume = restart_point(config, log=log)
        # No checkpoint yet: what the run directory holds is this run's own first attempt.
        overwrite = overwrite or resume is None
    out, old = run_directory(config, resume=resume, overwrite=overwrite)
    group.barrier()  # every rank has looked at the run directory before rank 0 changes it
    module = tasks.resolve(tasks.get(config.task).training)
    task = module.make_task(config, out=out, resume=resume, log=log, live=live)  # reads and checks the data
    keep_freed_memory()  # the steps reuse their buffers instead of faulting them in anew (see runtime)
    from rnnkit.training import engine

    try:
        for path in old if group.main else ():  # only now that the new run is known to start
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        try:
            with stop_on_signals(StopFlag()) as stop:
                result = engine.train(task, out_dir=out, reporter=reporter, stop=stop, resume=resume)
        except Stopped as stopped:
            name = _SIGNAL_NAMES.get(stopped.signum, f"stopped by signal {stopped.signum}")
            return RunOutcome(stopped.exit_code, group.main and f"{name} at step {stopped.step}; the run is saved: "
                                                                f"continue it with `rnnkit train --resume {out}`")
        except KeyboardInterrupt:
            return RunOutcome(130, group.main and "interrupted before the step ended; continue from the last "
                                                  f"checkpoint with `rnnkit train --resume {out}`")
        finally:
            if group.main and (out / "checkpoints").is_dir():  # the run started: record its full configuration
                (out / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        return RunOutcome(0, summary=module.summary(result, out) if group.main else [], result=result)
    except OSError as exc:
        # By now the data is read: what fails is writing the run (logs, cache, config). Checkpoints
        # are written atomically, so whatever the index names is still complete.
        raise RnnkitError(f"could not write the run in {out}: {describe_os_error(exc)}") from None
    except RuntimeError as exc:
        if not group.active or not _lost_peer(exc):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise RnnkitError(f"rank {group.rank} lost contact with the rest of the process group ({first}); "
                          f"the last checkpoint is kept in {out}: restart the group with --resume {out}, or let "
                          "torchrun --max-restarts do it") from None


def _lost_peer(exc: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (gloo says so in a plain RuntimeError)."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError) or "/gloo/transport/" in str(exc)
