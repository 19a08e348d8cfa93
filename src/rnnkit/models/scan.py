"""Two algorithms for one linear recurrence over a window: h_t = a_t * h_{t-1} + b_t.

minGRU and minLSTM reduce to this recurrence once their gates are computed
for the whole window (their gates read x_t only; see
:func:`~rnnkit.models.cells.mingru_coefficients`). Both functions below take
the window batch-first, (B, T, H), and the state before it, h0 (B, H), and
return every h_t, (B, T, H); the last row is the final state.

* :func:`sequential_scan`: the elementwise loop, one ``addcmul`` per step.
  T small kernels, each over (B, H); on CPU the fastest way (measured 2.7x a
  log-space scan for a 2x512 minGRU, ``shared/PERF-NOTES.md``).
* :func:`parallel_scan`: Heinsen's log-space scan ("Efficient Parallelization
  of a Ubiquitous Sequential Computation", 2023): with A_t = a_1 ... a_t,

      h_t = A_t * h0 + sum_{s<=t} (A_t / A_s) * b_s
          = exp(log A_t) * h0 + exp(log A_t + logcumsumexp_s(log b_s - log A_s)),

  a ``cumsum`` and a ``logcumsumexp`` over T: O(log T) depth, for GPUs. It
  needs b > 0 (the cells guarantee it with the positive candidate g) but
  nothing of h0: the h0 term is carried linearly, outside the logarithms, so
  a zero or negative state is exact too.

Which one runs is :func:`choose_scan`'s business.
"""

from __future__ import annotations

import torch

SCANS = ("auto", "parallel", "sequential")


def sequential_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t for t = 1..T: a, b (B, T, H), h0 (B, H) -> (B, T, H)."""
    h = h0
    outputs = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):  # (B, H) each
        h = torch.addcmul(b_t, a_t, h)  # b_t + a_t * h
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def parallel_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The same recurrence from log a, log b (B, T, H) and h0 (B, H), in log space -> (B, T, H)."""
    log_a_star = torch.cumsum(log_a, dim=1)  # (B, T, H): log A_t, A_t = a_1 ... a_t
    log_h = log_a_star + torch.logcumsumexp(log_b - log_a_star, dim=1)  # log sum_{s<=t} (A_t / A_s) b_s
    return torch.exp(log_h) + torch.exp(log_a_star) * h0.unsqueeze(1)  # + A_t h0


def choose_scan(scan: str, device: torch.device) -> str:
    """``auto`` -> the algorithm measured faster on this device: sequential on CPU, parallel on CUDA."""
    if scan not in SCANS:
        raise ValueError(f"unknown scan {scan!r} (choose: {', '.join(SCANS)})")
    if scan != "auto":
        return scan
    return "parallel" if device.type == "cuda" else "sequential"
