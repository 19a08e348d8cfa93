"""Self-describing checkpoint directories, written atomically and loaded in one place.

A checkpoint is a folder holding

* ``config.json``: format version, task, model and run configuration, vocabulary size,
  training counters (step, tokens, epoch, losses);
* ``tokenizer.json``: the tokenizer, so a checkpoint needs nothing else to generate;
* ``model.safetensors``: the weights (never a pickle, so loading runs no code).

Loading treats the folder as untrusted: it reads only JSON and safetensors,
refuses a folder that holds pickle-based files (``*.pt``, ``*.bin``, ``*.pkl``,
...), and checks that ``model.safetensors`` really is safetensors before
handing it to the library, so a renamed ``torch.save`` file or a truncated
download is a one-line error and never gets unpickled.

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
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from rnnkit import __version__, tasks
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import Tokenizer, tokenizer_from_dict
from rnnkit.errors import RnnkitError, describe_os_error
from rnnkit.files import atomic_folder, fsync_dir, write_atomic

FORMAT = "rnnkit-checkpoint"
FORMAT_VERSION = 1
REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")
INDEX = "index.json"
# Suffixes of formats that are (or wrap) Python pickles: torch.save, pickle, joblib, Lightning.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib")
# safetensors itself refuses headers above 100 MB; a larger claim means the file is something else.
MAX_HEADER_BYTES = 100_000_000


@dataclass
class Checkpoint:
    """What loading gives back: a ready model (eval mode), its tokenizer and metadata."""

    path: Path
    model: nn.Module
    tokenizer: Tokenizer
    task: str
    run_config: RunConfig
    meta: dict[str, Any]


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
    try:
        with atomic_folder(path) as tmp:
            _write_checkpoint_files(tmp, model=model, tokenizer=tokenizer, task=task, run_config=run_config,
                                    state=state, extra=extra, trainer=trainer)
    except OSError as exc:
        raise RnnkitError(f"could not write checkpoint {path}: {describe_os_error(exc)}; "
                          "earlier checkpoints are untouched") from None
    return path


def _write_checkpoint_files(tmp: Path, *, model, tokenizer, task, run_config, state, extra, trainer) -> None:
    """config.json, tokenizer.json, model.safetensors and (for resuming) the trainer state, fsynced."""
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
    existed = target.exists()
    if existed:
        # Re-saving the same step (e.g. best and then last at the end of a run): write the new
        # copy first and only then swap it in, so a full disk cannot cost the existing one.
        fresh, stale = folder / f".tmp-new-{target.name}", folder / f".tmp-old-{target.name}"
        for leftover in (fresh, stale):  # of an earlier crash
            shutil.rmtree(leftover, ignore_errors=True)
        write_checkpoint(fresh, **checkpoint_kwargs)
        try:
            os.replace(target, stale)
            try:
                os.replace(fresh, target)
            except OSError:
                os.replace(stale, target)  # put the old one back before reporting
                raise
        except OSError as exc:
            shutil.rmtree(fresh, ignore_errors=True)
            raise RnnkitError(f"could not replace checkpoint {target}: {describe_os_error(exc)}") from None
        shutil.rmtree(stale, ignore_errors=True)
    else:
        write_checkpoint(target, **checkpoint_kwargs)
    index = read_index(run_dir)
    for name in names:
        index[name] = target.name
    try:
        write_atomic(folder / INDEX, json.dumps(index, indent=2) + "\n")
        fsync_dir(folder)
    except OSError as exc:
        if not existed:  # a folder the index does not name would only be a puzzle
            shutil.rmtree(target, ignore_errors=True)
        raise RnnkitError(f"could not update {folder / INDEX}: {describe_os_error(exc)}; "
                          "it still names the previous checkpoints") from None
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


def refuse_pickles(folder: Path) -> None:
    """Refuse a checkpoint folder holding pickle-based files: rnnkit never writes or reads them."""
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise RnnkitError(
            f"refusing to load {folder}: it holds {', '.join(found[:3])}, a pickle-based format that can run code "
            "when loaded, and rnnkit reads only safetensors and JSON; remove those files or use another checkpoint"
        )


def check_safetensors(file: Path) -> None:
    """Check ``file`` is a complete safetensors file without trusting or unpickling anything in it.

    The format is an 8-byte little-endian header length N, N bytes of JSON
    naming each tensor's byte range, then the tensor bytes. Checking that here
    turns a renamed ``torch.save`` file or a cut-off download into a clear error.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        # What the file looks like if it is not safetensors. Only a guess for the message: a
        # real header length can begin with the same bytes, so the structure decides.
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            looks_like = "a Python pickle"
        elif head[:4] == b"PK\x03\x04":
            looks_like = "a zip archive (the torch.save format, which wraps a pickle)"
        else:
            looks_like = None

        def refuse(reason: str) -> RnnkitError:
            if looks_like:
                return RnnkitError(f"{file} is {looks_like}, not safetensors; rnnkit never unpickles checkpoint "
                                   "files because that can run arbitrary code: convert the weights to safetensors")
            return RnnkitError(f"{file} {reason}")

        if len(head) < 8:
            raise refuse(f"is truncated ({size} bytes, too short for a safetensors header); "
                         "copy or download the checkpoint again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES:
            raise refuse("is not a safetensors file (its first 8 bytes are no header length)")
        raw = f.read(header_len)
    if not raw.startswith(b"{"):
        raise refuse("is truncated or not a safetensors file (no header table after the first 8 bytes)")
    if 8 + header_len > size:
        raise refuse(f"is truncated: its header alone needs {8 + header_len} bytes but the file has {size}; "
                     "copy or download the checkpoint again")
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        needed = 8 + header_len + max((int(e) for e in ends), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise refuse("is not a safetensors file (its header is not a tensor table)") from None
    if needed > size:
        raise RnnkitError(f"{file} is truncated: its tensors need {needed} bytes but the file has {size}; "
                          "copy or download the checkpoint again")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a checkpoint (or of a run directory's best one)."""
    folder = resolve(path)
    refuse_pickles(folder)
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
    refuse_pickles(folder)
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
    model = tasks.get(config.get("task", "")).build_model(run_config.model, tokenizer.vocab_size, config)
    try:
        check_safetensors(folder / "model.safetensors")
        missing_keys, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False, device="cpu")
    except SafetensorError as exc:
        raise RnnkitError(f"cannot read {folder / 'model.safetensors'}: {exc} (truncated or not safetensors?)") from None
    except OSError as exc:
        raise RnnkitError(f"cannot read {folder / 'model.safetensors'}: {describe_os_error(exc)}") from None
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
