"""Process-level settings shared by every command: device choice, threads, seeding, the process group."""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass

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


def keep_freed_memory() -> bool:
    """Ask glibc to serve every block from the heap and keep freed memory (returns whether it did).

    By default glibc maps each large block (a training step's activations) with a
    fresh ``mmap`` and unmaps it on free, so every step faults its buffers in again:
    ~125k page faults a step for a 2x512 LSTM, 18-28% of its time here. With
    ``M_MMAP_MAX=0`` and a 1 GiB trim threshold the buffers are reused instead; the
    process keeps up to 1 GiB of freed heap. `rnnkit train` calls this once its data
    is read. Left alone when ``MALLOC_MMAP_MAX_``/``MALLOC_TRIM_THRESHOLD_`` are set
    (the user's choice), with ``RNNKIT_MALLOC=system``, or off glibc.
    """
    import ctypes
    import platform

    if os.environ.get("RNNKIT_MALLOC", "").lower() == "system" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    try:
        libc = ctypes.CDLL(None)
        return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return False


# ------------------------------------------------------------------ several processes (torchrun)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel group (one process alone: rank 0 of 1).

    ``torchrun`` describes the group in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); :func:`init_distributed` reads it.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Distributed()
_CURRENT: list[Distributed] = [SINGLE]


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0


def init_distributed(device: str = "auto") -> Distributed:
    """Join the process group torchrun started (gloo on CPU, nccl on CUDA); alone, do nothing.

    Called once per process; later calls return the same group.
    """
    if _CURRENT[0].active or "WORLD_SIZE" not in os.environ:
        return _CURRENT[0]
    try:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise RnnkitError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if world <= 1:
        return _CURRENT[0]
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise RnnkitError(f"WORLD_SIZE is {world} but {' and '.join(missing)} is not set: start the processes with "
                          "torchrun (e.g. torchrun --nproc-per-node 2 -m rnnkit train ...)")
    import datetime

    import torch.distributed as dist

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("RNNKIT_DIST_TIMEOUT", "300")))
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # Keys of this attempt only: after a torchrun restart the store still holds the last one's.
        store = dist.PrefixStore(f"rnnkit/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RnnkitError(f"could not join the process group at {os.environ['MASTER_ADDR']}:"
                          f"{os.environ['MASTER_PORT']} (rank {rank} of {world}): {first}") from None
    _CURRENT[0] = Distributed(rank=rank, world=world, local_rank=local_rank)
    # Leave the group before the interpreter goes: a gloo group still alive at exit can abort the
    # process ("terminate called without an active exception") after the work is done.
    atexit.register(_leave_group)
    return _CURRENT[0]


def exit_process(code: int) -> None:
    """End this process with ``code``; a member of a process group leaves it and skips the C++ teardown.

    gloo can abort a worker whose work is done and saved ("terminate called without an active
    exception", SIGABRT) while the interpreter destroys its objects at exit; after the group is left
    and the output flushed, ``os._exit`` ends the process before that.
    """
    if not _CURRENT[0].active:
        raise SystemExit(code)
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    _leave_group()
    os._exit(code)


def _leave_group() -> None:
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except (RuntimeError, ValueError):  # the group already broke (a peer died): nothing to leave
        pass
    _CURRENT[0] = SINGLE


def distributed() -> Distributed:
    """The group this process belongs to (rank 0 of 1 unless :func:`init_distributed` joined one)."""
    return _CURRENT[0]


def rank_rows(total: int, group: Distributed) -> slice:
    """This rank's contiguous share of ``total`` rows (streams, windows or examples)."""
    return slice(total * group.rank // group.world, total * (group.rank + 1) // group.world)
