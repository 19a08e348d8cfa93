"""Language-model metrics derived from the mean cross-entropy (in nats per token)."""

from __future__ import annotations

import math


def lm_metrics(loss: float, *, tokens: int, chars: int | None = None) -> dict[str, float | int]:
    """loss, perplexity, bits per token and bits per character (``chars`` defaults to tokens)."""
    chars = tokens if chars is None else chars
    bits_per_token = loss / math.log(2)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709 nats
        "bits_per_token": bits_per_token,
        "bits_per_char": bits_per_token * tokens / max(chars, 1),
        "tokens": tokens,
    }
