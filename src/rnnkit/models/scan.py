"""Two algorithms for one linear recurrence over a window: h_t = a_t * h_{t-1} + b_t.

minGRU and minLSTM reduce to this recurrence once their gates are computed
for the whole window (their gates read x_t only; see
:func:`~rnnkit.models.cells.mingru_coefficients`). Both functions below take
the window batch-first, (B, T, H), and the state before it, h0 (B, H), and
return every h_t, (B, T, H); the last row is the final state.

* :func:`sequential_scan`: the elementwise loop, one ``addcmul`` per step, with
  a hand-written backward (the adjoint loop, :class:`_SequentialScan`).
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
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return sequential_scan_autograd(a, b, h0)  # exporters record plain ops, not a Python Function
    return _SequentialScan.apply(a.transpose(0, 1), b.transpose(0, 1), h0).transpose(0, 1)


def sequential_scan_time_major(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The same recurrence time-major: a, b (T, B, H), h0 (B, H) -> (T, B, H), with no transposing copies."""
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return sequential_scan_autograd(a.transpose(0, 1), b.transpose(0, 1), h0).transpose(0, 1)
    return _SequentialScan.apply(a, b, h0)


def sequential_scan_autograd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The same loop left to autograd (one graph node per step): the reference the fast one is tested against."""
    h = h0
    outputs = []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):  # (B, H) each
        h = torch.addcmul(b_t, a_t, h)  # b_t + a_t * h
        outputs.append(h)
    return torch.stack(outputs, dim=1)


class _SequentialScan(torch.autograd.Function):
    """:func:`sequential_scan` with a hand-written backward: two loops of T ``addcmul``s, no per-step graph.

    Takes a and b time-major, (T, B, H). Forward walks them, writing each h_t
    into one (T, B, H) tensor. Backward runs the adjoint recurrence backwards, g_t = dL/dh_t (from the output) + a_{t+1} * g_{t+1}; then
    dL/db_t = g_t, dL/da_t = g_t * h_{t-1} (one product over the window) and
    dL/dh0 = a_1 * g_1.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:  # noqa: D102
        a_t = a.contiguous()  # (T, B, H): each step a contiguous (B, H) block
        out = b.clone(memory_format=torch.contiguous_format)  # becomes h, step by step, in place of b_t
        h = h0
        for t in range(out.shape[0]):
            h = out[t].addcmul_(a_t[t], h)  # h_t = b_t + a_t * h_{t-1}
        ctx.save_for_backward(a_t, out, h0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        a_t, out, h0 = ctx.saved_tensors
        g = grad.clone(memory_format=torch.contiguous_format)  # (T, B, H), turned into dL/dh_t in place
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a_t[t + 1], g[t + 1])
        grad_a = grad_h0 = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(g)  # g_t * h_{t-1}, written in two pieces (a cat of h measured slow)
            torch.mul(g[0], h0, out=grad_a[0])
            torch.mul(g[1:], out[:-1], out=grad_a[1:])
        if ctx.needs_input_grad[2]:
            grad_h0 = a_t[0] * g[0]
        return grad_a, g if ctx.needs_input_grad[1] else None, grad_h0


def mingru_scan_time_major(gx: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """A whole minGRU layer after its GEMM, time-major: gx (T, B, 2H) = [W_z x + b_z | W_h x + b_h], h0 (B, H) -> (T, B, H).

    The same function as ``sequential_scan_time_major(*mingru_coefficients(gx), h0)``, as one
    autograd node (:class:`_MinGRUScan`); exporters and tracing get that composition.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        from rnnkit.models.cells import mingru_coefficients_autograd

        a, b = mingru_coefficients_autograd(gx.transpose(0, 1))
        return sequential_scan_autograd(a, b, h0).transpose(0, 1)
    return _MinGRUScan.apply(gx, h0)


class _MinGRUScan(torch.autograd.Function):
    """minGRU's gates and scan with one backward: h_t = h_{t-1} + z_t (g_t - h_{t-1}).

    Forward: z = sigmoid(k_z), g = max(k_h + 1/2, sigmoid(k_h)) (the positive candidate map,
    see :class:`~rnnkit.models.cells._MinGRUCoefficients`), then one ``lerp`` per step,
    h_t = lerp(h_{t-1}, g_t, z_t) = (1 - z_t) h_{t-1} + z_t g_t: neither a = 1 - z nor
    b = z * g is formed. Backward: the adjoint g_t = dL/dh_t + (1 - z_{t+1}) g_{t+1}, and
    from it, as dL/da_t = g_t h_{t-1} and dL/db_t = g_t,
    dL/dk_z = g_t z (g - h_{t-1}) (1 - z) and dL/dk_h = g_t z g'(k_h), g' = 1 where
    g >= 1/2 (k_h >= 0) and g (1 - g) below.
    """

    @staticmethod
    def forward(ctx, gx: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:  # noqa: D102
        k_z, k_h = gx.chunk(2, dim=-1)
        z = torch.sigmoid(k_z)
        g = torch.maximum(k_h + 0.5, torch.sigmoid(k_h))
        out = torch.empty_like(z)
        h = h0
        for t in range(out.shape[0]):
            h = torch.lerp(h, g[t], z[t], out=out[t])
        ctx.save_for_backward(z, g, out, h0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        z, g, out, h0 = ctx.saved_tensors
        a = 1 - z
        adj = grad.clone(memory_format=torch.contiguous_format)  # (T, B, H), turned into dL/dh_t in place
        for t in range(adj.shape[0] - 2, -1, -1):
            adj[t].addcmul_(a[t + 1], adj[t + 1])
        grad_h0 = a[0] * adj[0] if ctx.needs_input_grad[1] else None
        grad_gx = torch.empty((*z.shape[:-1], 2 * z.shape[-1]), dtype=z.dtype, device=z.device)
        grad_kz, grad_kh = grad_gx.chunk(2, dim=-1)
        adj_z = adj.mul_(z)  # g_t z, shared by both halves
        torch.sub(g[0], h0, out=grad_kz[0])  # g - h_{t-1}, in two pieces (h_0 is not in out)
        torch.sub(g[1:], out[:-1], out=grad_kz[1:])
        grad_kz.mul_(adj_z).mul_(a)
        slope = torch.where(g >= 0.5, 1.0, a.copy_(g).mul_(1 - g))  # g'(k_h), in a's storage
        torch.mul(adj_z, slope, out=grad_kh)
        return grad_gx, grad_h0


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
