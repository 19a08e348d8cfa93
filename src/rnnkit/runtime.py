"""Process-level settings shared by every command: device choice, threads, seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from rnnkit.errors import RnnkitError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RnnkitError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise RnnkitError(f"unknown device {name!r} (choose: auto, cpu, cuda)")
    return torch.device(name)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's operators (0: leave torch's default)."""
    if threads < 0:
        raise RnnkitError(f"--threads must be 0 (torch's default) or more, got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def exact_cpu_math() -> None:
    """Ask Intel MKL for results that do not depend on memory alignment (``MKL_CBWR=AUTO,STRICT``).

    By default MKL picks matrix-multiply kernels by the alignment of their
    inputs, so the same training step can round differently in a resumed process
    than in the uninterrupted one; strict mode makes resume bitwise exact. MKL
    reads the setting once, at its first call, so this works only before the
    process has multiplied any matrix. It costs training about 5% here (and
    one-token generation about 20%, so only `rnnkit train` asks for it). A
    user's own ``MKL_CBWR`` wins.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
