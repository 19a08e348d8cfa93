"""Self-describing checkpoint directories, written atomically and loaded in one place.

A checkpoint is a folder holding

* ``config.json``: format version, task, model and run configuration, vocabulary size,
  training counters (step, tokens, epoch, losses);
* ``tokenizer.json``: the tokenizer, so a checkpoint needs nothing else to generate;
* ``model.safetensors``: the weights (never a pickle, so loading runs no code).

A run directory keeps its checkpoints under ``checkpoints/step-NNNNNNN/`` and
names the ``best`` and ``last`` ones in ``checkpoints/index.json``. A new
checkpoint is written to a temporary folder, fsynced and renamed into place;
only then is the index replaced (an atomic rename) and stale folders removed.
A crash at any moment leaves the previous index pointing at complete folders.
Every command that takes ``--checkpoint`` accepts either a checkpoint folder
or a run directory (its best checkpoint, else its last).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from rnnkit import __version__
from rnnkit.config import ModelConfig, RunConfig
from rnnkit.data.tokenizers import Tokenizer, tokenizer_from_dict
from rnnkit.errors import RnnkitError
from rnnkit.models.classifier import Classifier
from rnnkit.models.language_model import LanguageModel

FORMAT = "rnnkit-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")
INDEX = "index.json"


@dataclass
class Checkpoint:
    """What loading gives back: a ready model (eval mode), its tokenizer and metadata."""

    path: Path
    model: nn.Module
    tokenizer: Tokenizer
    task: str
    run_config: RunConfig
    meta: dict[str, Any]


def build_model(task: str, model_config: ModelConfig, vocab_size: int, meta: dict[str, Any]) -> nn.Module:
    """The untrained network a checkpoint of ``task`` holds (``meta`` is its config.json)."""
    if task in ("language_model", "echo"):  # echo: a language model over the task's symbols
        return LanguageModel(config=model_config, vocab_size=vocab_size)
    if task == "classify":
        labels = meta.get("labels")
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
            raise RnnkitError("classifier checkpoint: config.json must list at least two 'labels'")
        return Classifier(config=model_config, vocab_size=vocab_size, num_classes=len(labels))
    raise RnnkitError(f"unknown task {task!r} in checkpoint (this rnnkit knows: language_model, classify, echo)")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def write_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    tokenizer: Tokenizer,
    task: str,
    run_config: RunConfig,
    state: dict[str, Any],
    extra: dict[str, Any] | None = None,
    trainer: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write one complete checkpoint folder at ``path`` (which must not exist yet), atomically.

    ``trainer`` adds what resuming needs: ``trainer.json`` and ``trainer.safetensors``
    (see :mod:`rnnkit.training.session`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rnnkit_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "task": task,
            "vocab_size": tokenizer.vocab_size,
            "model": asdict(run_config.model),
            "run": run_config.to_dict(),
            "state": state,
            **(extra or {}),  # task-specific facts, e.g. a classifier's labels
        }
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "tokenizer.json", tokenizer.to_dict())
        # safetensors copies GPU tensors to the host, so a GPU-trained checkpoint loads anywhere.
        save_model(model, str(tmp / "model.safetensors"))
        written = ["model.safetensors"]
        if trainer is not None:
            trainer_json, trainer_tensors = trainer
            _write_json(tmp / "trainer.json", trainer_json)
            save_file(trainer_tensors, str(tmp / "trainer.safetensors"))
            written.append("trainer.safetensors")
        for name in written:
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RnnkitError(f"could not write checkpoint {path}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_index(run_dir: str | Path) -> dict[str, str]:
    index = Path(run_dir) / "checkpoints" / INDEX
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RnnkitError(f"cannot read {index}: {exc}") from None
    if not isinstance(data, dict):
        raise RnnkitError(f"{index} is not a JSON object")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def save_to_run(
    run_dir: str | Path,
    *,
    names: tuple[str, ...],
    step: int,
    **checkpoint_kwargs: Any,
) -> Path:
    """Save a checkpoint for ``step`` in a run directory and point ``names`` (best/last) at it."""
    folder = Path(run_dir) / "checkpoints"
    target = folder / f"step-{step:09d}"
    if target.exists():
        # Re-saving the same step (e.g. best and then last at the end of a run): replace it.
        shutil.rmtree(target)
    write_checkpoint(target, **checkpoint_kwargs)
    index = read_index(run_dir)
    for name in names:
        index[name] = target.name
    tmp = folder / f".{INDEX}.tmp"
    try:
        _write_json(tmp, index)
        os.replace(tmp, folder / INDEX)
        _fsync_dir(folder)
    except OSError as exc:
        raise RnnkitError(f"could not update {folder / INDEX}: {exc.strerror or exc}") from None
    # Remove checkpoint folders that nothing points at any more (and leftovers of crashes).
    keep = set(index.values())
    for child in folder.iterdir():
        if child.is_dir() and child.name not in keep and (child.name.startswith("step-") or child.name.startswith(".tmp-")):
            shutil.rmtree(child, ignore_errors=True)
    return target


def resolve(path: str | Path, *, prefer: str = "best") -> Path:
    """Turn a run directory or checkpoint folder into a checkpoint folder, or explain why not."""
    path = Path(path)
    if not path.exists():
        raise RnnkitError(f"checkpoint not found: {path} (pass a run directory made by `rnnkit train --out`)")
    if not path.is_dir():
        raise RnnkitError(f"checkpoint must be a folder, got a file: {path}")
    if (path / "config.json").exists():
        return path
    index = read_index(path)
    for name in (prefer, "best", "last"):
        if name in index and (path / "checkpoints" / index[name]).is_dir():
            return path / "checkpoints" / index[name]
    raise RnnkitError(f"no checkpoint in {path}: it has neither config.json nor checkpoints/{INDEX}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a checkpoint (or of a run directory's best one)."""
    folder = resolve(path)
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RnnkitError(f"incomplete checkpoint {folder}: missing tokenizer.json") from None
    except (OSError, ValueError) as exc:
        raise RnnkitError(f"unreadable {folder / 'tokenizer.json'}: {exc}") from None
    return tokenizer_from_dict(data)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu", prefer: str = "best") -> Checkpoint:
    """Load a checkpoint (or a run directory's best one) for inference. Never unpickles."""
    folder = resolve(path, prefer=prefer)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RnnkitError(f"incomplete checkpoint {folder}: missing {', '.join(missing)}")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tok_data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RnnkitError(f"unreadable checkpoint {folder}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RnnkitError(f"{folder / 'config.json'} is not an rnnkit checkpoint config")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RnnkitError(
            f"checkpoint {folder} has format version {version}, newer than this rnnkit reads "
            f"({FORMAT_VERSION}); upgrade rnnkit"
        )
    run_config = RunConfig.from_dict(config.get("run", {}), source=str(folder / "config.json"))
    tokenizer = tokenizer_from_dict(tok_data)
    vocab_size = config.get("vocab_size")
    if vocab_size != tokenizer.vocab_size:
        raise RnnkitError(
            f"checkpoint {folder}: config says {vocab_size} tokens but tokenizer.json has {tokenizer.vocab_size}"
        )
    model = build_model(config.get("task", ""), run_config.model, tokenizer.vocab_size, config)
    try:
        missing_keys, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise RnnkitError(f"cannot read {folder / 'model.safetensors'}: {exc} (truncated or not safetensors?)") from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise RnnkitError(f"weights in {folder} do not match its config.json: {first}") from None
    if missing_keys or unexpected:
        raise RnnkitError(
            f"weights in {folder} do not match its config.json "
            f"(missing: {sorted(missing_keys)[:3]}, unexpected: {sorted(unexpected)[:3]})"
        )
    model.to(device).eval()
    return Checkpoint(
        path=folder, model=model, tokenizer=tokenizer, task=config["task"], run_config=run_config, meta=config
    )
