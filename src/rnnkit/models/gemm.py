"""The fp32 matrix product of a whole window's input projection, on the CPU's faster library.

PyTorch multiplies float32 matrices on the CPU with Intel MKL's ``sgemm``. On AMD
processors MKL runs a narrower code path than the chip supports: on a 2-core
AMD EPYC (Zen 5, AVX-512) a (6400, 512) x (512, 1024) product ran at 175 GFLOP/s
through ``F.linear`` and at 445 GFLOP/s through oneDNN (PyTorch's own bundled
library, which picks AVX-512 kernels by the CPU's flags, whatever its vendor); the
two backward products gained 2.3x and 1.5x. In bf16 PyTorch already uses oneDNN,
and so does ``nn.LSTM``'s CPU kernel; the minGRU/minLSTM window projection was
the one big product left on MKL.

:func:`linear` is ``F.linear`` with that choice made: on a CPU float32 input with
no autocast it runs forward and backward through oneDNN when :func:`cpu_gemm`
says so, and ``F.linear`` otherwise (CUDA, half precision, tracing and ONNX
export, small products). ``RNNKIT_GEMM=onednn|blas|auto`` overrides the choice;
``auto`` (the default) is oneDNN on AMD CPUs and MKL elsewhere: on Intel MKL is
the tuned library, and the choice is made from the vendor, never from a timing,
so every process of a run (a resumed one included) computes the same bits.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["GEMMS", "cpu_gemm", "linear"]

GEMMS = ("auto", "onednn", "blas")
_MIN_ROWS = 64  # below this many rows (a few tokens: generation, tiny tests) the library call dominates either way


@functools.cache
def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                return value.strip()
    except OSError:
        pass
    return "unknown"


@functools.cache
def _onednn_linear_available() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.ones(2, 3)
        return bool(torch.equal(op(x, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError):
        return False


def cpu_gemm() -> str:
    """Which library :func:`linear` uses for CPU float32 products: ``onednn`` or ``blas`` (MKL).

    ``RNNKIT_GEMM`` (auto, onednn, blas) chooses; auto is oneDNN on an AMD CPU.
    oneDNN is used only where this PyTorch build has its linear operator.
    """
    choice = os.environ.get("RNNKIT_GEMM", "auto").strip().lower() or "auto"
    if choice not in GEMMS:
        from rnnkit.errors import RnnkitError

        raise RnnkitError(f"RNNKIT_GEMM must be one of {', '.join(GEMMS)}, got {choice!r}")
    if choice == "auto":
        choice = "onednn" if _cpu_vendor() == "AuthenticAMD" else "blas"
    return "onednn" if choice == "onednn" and _onednn_linear_available() else "blas"


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b and its two backward products, each one oneDNN call (x as rows, (N, I))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = _onednn(grad_y, weight.t(), None) if ctx.needs_input_grad[0] else None  # (N, O) x (O, I)
        # dW = dy^T x, formed as (x^T dy)^T: oneDNN copies a strided first operand to rows, and x^T
        # is the smaller one to copy (measured 21 ms against 24 for dy^T x, MKL 36, on (6400, 512|1024)).
        grad_w = _onednn(x.t(), grad_y.t(), None).t() if ctx.needs_input_grad[1] else None
        grad_b = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for a large CPU float32 product when :func:`cpu_gemm` says so."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or rows < _MIN_ROWS
            or torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export() or cpu_gemm() != "onednn"):
        return F.linear(x, weight, bias)
    y = _OneDNNLinear.apply(x.reshape(rows, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
