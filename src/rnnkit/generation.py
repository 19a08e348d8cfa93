"""Sampling from a recurrent language model, one token at a time with carried state.

Works on token ids and knows nothing about tokenizers. The prime is read
once (one forward pass over it); after that each new token costs exactly one
recurrent step, because the state after the prime summarises everything
before it. Randomness comes only from the explicit ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rnnkit.errors import RnnkitError


def check_sampling(*, temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise RnnkitError(f"temperature must be >= 0 (0 means greedy), got {temperature:g}")
    if top_k < 0:
        raise RnnkitError(f"top-k must be >= 0 (0 means off), got {top_k}")
    if not 0 < top_p <= 1:
        raise RnnkitError(f"top-p must be in (0, 1], got {top_p:g}")


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the top one always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one id per row of (B, V) logits; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prime: Sequence[int],
    *,
    length: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    window: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield ``length`` steps of new ids, each a (num_samples,) tensor on the CPU.

    All samples share the prime and are generated together as one batch.
    ``window`` N > 0 is for many-to-one models, trained to read exactly N tokens
    from a zero state: each step then re-reads the last N tokens, as the model
    was trained (a carried state would take it where training never went).
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if len(prime) == 0:
        raise RnnkitError("the prime is empty: give at least one token to start from")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        ids = torch.as_tensor(list(prime), dtype=torch.long, device=device)
        if window:
            yield from _generate_windowed(model, ids, length=length, temperature=temperature, top_k=top_k,
                                          top_p=top_p, num_samples=num_samples, generator=generator, window=window)
            return
        logits, state = model(ids.unsqueeze(0))  # prime once: (1, P, V)
        state = tuple(s.repeat(1, num_samples, 1) for s in state)  # (L, N, H)
        logits = logits[:, -1].expand(num_samples, -1)  # (N, V)
        for _ in range(length):
            # Sampling runs on the CPU so that a seeded CPU generator gives the same text on any device.
            nxt = sample_next(
                logits.float().cpu(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )
            yield nxt
            logits, state = model(nxt.to(device).unsqueeze(1), state)  # one step: (N, 1, V)
            logits = logits[:, -1]
    finally:
        model.train(was_training)


def _generate_windowed(model: nn.Module, ids: torch.Tensor, *, length: int, temperature: float, top_k: int,
                       top_p: float, num_samples: int, generator: torch.Generator | None,
                       window: int) -> Iterator[torch.Tensor]:
    recent = ids[-window:].unsqueeze(0).repeat(num_samples, 1)  # (N, <=W)
    for _ in range(length):
        logits, _ = model(recent)  # a fresh zero state every step: (N, W, V)
        nxt = sample_next(logits[:, -1].float().cpu(), temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        yield nxt
        recent = torch.cat([recent, nxt.to(recent.device).unsqueeze(1)], dim=1)[:, -window:]


def generate_ids(model: nn.Module, prime: Sequence[int], **kwargs) -> list[list[int]]:
    """Collect :func:`generate` into one list of new ids per sample."""
    steps = list(generate(model, prime, **kwargs))
    if not steps:
        return [[] for _ in range(kwargs.get("num_samples", 1))]
    return torch.stack(steps, dim=1).tolist()
