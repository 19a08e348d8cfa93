"""Evaluate a language model on a token stream with carried state."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import RnnkitError


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module,
    ids: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int = 0,
) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over ``ids`` and the number of tokens scored.

    The text is cut into up to ``batch_size`` parallel streams read window by
    window with the state carried, so every scored token sees all the text
    before it in its stream (as in training with sequential sampling).
    """
    if max_tokens and len(ids) > max_tokens + 1:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise RnnkitError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    streams = max(1, min(batch_size, (len(ids) - 1) // seq_len))
    stream_len = (len(ids) - 1) // streams
    device = next(model.parameters()).device
    data = torch.from_numpy(ids[: streams * stream_len + 1].astype(np.int64))
    starts = torch.arange(streams) * stream_len
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for k in range(0, stream_len, seq_len):
            t = min(seq_len, stream_len - k)
            index = starts[:, None] + k + torch.arange(t + 1)  # (B, t+1)
            window = data[index].to(device)
            logits, state = model(window[:, :-1], state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += window[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count, count
