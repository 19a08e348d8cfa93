"""Evaluate a language model on a token stream with carried state."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import RnnkitError
from rnnkit.models import eval_mode


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module,
    ids: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int = 0,
    window: int = 0,
) -> tuple[float, int, float]:
    """Mean next-token cross-entropy (nats) over ``ids``, the number of tokens scored, and accuracy.

    The text is cut into up to ``batch_size`` parallel streams read window by
    window with the state carried, so every scored token sees all the text
    before it in its stream (as in training with sequential sampling).
    With ``window`` N (a many-to-one model) each token from the N-th on is
    scored from the N tokens before it and a zero state, as the model was trained.
    """
    if max_tokens and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
    if window:
        return _evaluate_windows(model, ids, window=window, batch_size=max(batch_size, 256))
    if len(ids) < 2:
        raise RnnkitError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    streams = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    stream_len = (len(ids) - 1) // streams
    device = next(model.parameters()).device
    # Windows are gathered from ``ids`` one at a time: a memory-mapped corpus is never copied whole.
    starts = np.arange(streams) * stream_len
    total, count, correct, state = 0.0, 0, 0, None
    with eval_mode(model):
        for k in range(0, stream_len, seq_len):
            t = min(seq_len, stream_len - k)
            index = starts[:, None] + k + np.arange(t + 1)  # (B, t+1)
            chunk = torch.from_numpy(ids[index].astype(np.int64)).to(device)
            logits, state = model(chunk[:, :-1], state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += chunk[:, 1:].numel()
            correct += (logits.argmax(-1) == chunk[:, 1:]).sum().item()
    return total / count, count, correct / count


@torch.inference_mode()
def _evaluate_windows(model: nn.Module, ids: np.ndarray, *, window: int, batch_size: int) -> tuple[float, int, float]:
    if len(ids) < window + 1:
        raise RnnkitError(f"need at least {window + 1} tokens to evaluate a {window}-token window model, got {len(ids)}")
    device = next(model.parameters()).device
    rows = np.lib.stride_tricks.sliding_window_view(ids, window + 1)  # (M, N+1), a view: no copy
    total, correct = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(rows), batch_size):
            chunk = torch.from_numpy(rows[start : start + batch_size].astype(np.int64)).to(device)
            logits, _ = model(chunk[:, :-1])
            total += F.cross_entropy(logits[:, -1].float(), chunk[:, -1], reduction="sum").item()
            correct += (logits[:, -1].argmax(-1) == chunk[:, -1]).sum().item()
    return total / len(rows), len(rows), correct / len(rows)
