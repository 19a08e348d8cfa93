"""Shared helpers for the benchmark scripts: threads, seeding, timing, environment, JSON output.

Not part of the package; the scripts import it as a sibling module
(``python benchmarks/<script>.py`` puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch


def log(*parts: Any) -> None:
    """Progress goes to stderr; stdout carries exactly one JSON object."""
    print(*parts, file=sys.stderr, flush=True)


def setup(threads: int, seed: int) -> None:
    """Set torch's thread counts explicitly and seed Python, NumPy and torch."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synthetic_ids(n_tokens: int, vocab: int, seed: int) -> np.ndarray:
    """Uniform random token ids: the work per token does not depend on the text."""
    return np.random.default_rng(seed).integers(0, vocab, size=n_tokens, dtype=np.int64)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def minor_faults() -> int:
    """Minor page faults of this process so far (each first touch of freshly mapped memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# (mmap threshold, trim threshold, most mmapped blocks at once)
GLIBC_DEFAULT_MALLOC = (128 * 1024, 128 * 1024, 65536)  # a fresh process's settings
WARM_MALLOC = (32 * 1024 * 1024, 64 * 1024 * 1024, 65536)  # blocks up to 32 MiB reused from the heap
NO_MMAP_MALLOC = (32 * 1024 * 1024, 1024 * 1024 * 1024, 0)  # every block from the heap, kept up to 1 GiB free


def set_malloc(mmap_threshold: int, trim_threshold: int, mmap_max: int = 65536) -> bool:
    """Pin glibc's mmap and trim thresholds (and how many blocks may be mmapped); False when not on glibc.

    glibc serves blocks above the mmap threshold (128 KiB in a fresh process)
    with a fresh mmap and returns them on free, so a loop that allocates and
    frees big buffers on every call page-faults them in every time. glibc also
    raises the threshold by itself after some frees, so the same loop can run
    at different speeds depending on what the process did before; pinning
    both thresholds makes the figure depend on the setting only. Blocks above
    32 MiB (a training step's activations) are always mmapped unless
    ``mmap_max`` is 0.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_MAX, mmap_max), (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold)
            )
        )
    except (OSError, AttributeError):
        return False


def environment(threads: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
    }


def now() -> float:
    return time.perf_counter()


def cpu_time() -> float:
    """CPU seconds used by every thread of this process (user + system)."""
    return time.process_time()


def cpu_share(cpu_seconds: float, wall_seconds: float, threads: int) -> float:
    """How busy this process kept its threads: well below its usual value means another process took a core."""
    return round(cpu_seconds / max(wall_seconds * threads, 1e-9), 3)


def clean_repeats(shares: dict[str, list[float]], tolerance: float = 0.8) -> list[int]:
    """Indices of the repeats where every side kept its threads about as busy as in its best repeat.

    On a shared host another process taking a core shows as a drop in CPU share;
    figures from such repeats say more about the neighbour than about the code.
    """
    n = len(next(iter(shares.values())))
    best = {name: max(v) for name, v in shares.items()}
    return [i for i in range(n) if all(v[i] >= tolerance * best[name] for name, v in shares.items())]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON object on stdout."""
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()


def fill_defaults(args: Any, defaults: dict[str, tuple[Any, Any]]) -> Any:
    """Set every option left at None to its (full, quick) default."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


class ServeProcess:
    """``rnnkit serve ARGS`` in a subprocess on a free loopback port; its stderr is kept for the report."""

    def __init__(self, args: list[str], *, name: str, env: dict[str, str] | None = None) -> None:
        import re
        import subprocess
        import threading

        argv = [sys.executable, "-m", "rnnkit", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        first = self.proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        if not match:
            self.proc.kill()
            raise SystemExit(f"{name}: the server did not start: {first}{self.proc.stderr.read()}")
        self.port = int(match.group(1))
        self.log: list[str] = []
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)
        self._drain.start()

    def rss_mib(self) -> float | None:
        import re
        from pathlib import Path

        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:  # not Linux
            return None
        return round(int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024, 1)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop, which exits 0) and wait; returns the exit status."""
        self.proc.terminate()
        code = self.proc.wait(timeout=timeout)
        self._drain.join(timeout=5)
        return code


class KeepAliveClient:
    """One keep-alive HTTP connection to 127.0.0.1 with Nagle's algorithm off (as browsers and curl).

    A failed request closes the connection, opens a new one and answers status 0.
    """

    def __init__(self, port: int, *, timeout: float = 300) -> None:
        self.port, self.timeout = port, timeout
        self.conn = self._connect()

    def _connect(self):
        import http.client
        import socket

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        conn.connect()
        # http.client sends the headers and the body in two writes: without this the body waits for an ACK.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def send(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        import http.client

        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = self._connect()
            return 0, b""
