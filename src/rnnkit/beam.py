"""Beam search over a recurrent language model: the likeliest continuations of a prime, deterministically.

Works on token ids, like :mod:`rnnkit.generation`, and reads the prime once
the same way (a :class:`~rnnkit.generation.Stream`). The N hypotheses are one
batch of N rows: each step is one call of the bound one-token step for all of
them, then the best N of the N x V one-token extensions are kept and the
carried state is reordered to follow them (``Stream.select``: an
``index_select`` of each (layers, N, H) tensor), so no token is ever read twice.

A hypothesis is ranked by its score, ``log_prob / length ** length_penalty``
(a plain length power, not GNMT's ``((5 + length) / 6) ** alpha``), where
``log_prob`` is the sum of the model's log-probabilities of its new tokens
given the prime and ``length`` counts them. Our vocabularies have no end
token, so every hypothesis runs the full ``length`` and the penalty changes
no ranking, only the reported score, unless ``no_repeat_ngram`` leaves a
hypothesis without any allowed next token: it then ends there, shorter, and
competes on its score with the others (0 keeps the plain sum, which favours
the short; 1 is the mean log-probability per token).

``no_repeat_ngram`` K > 0 forbids a hypothesis to repeat any K tokens in a
row that its own new tokens already hold (the prime does not count: it is the
user's text, and a short one would otherwise forbid much of a small
vocabulary). Ties are broken by the lower index (row, then token id), so the
same prime gives the same hypotheses on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import RnnkitError
from rnnkit.generation import Stream
from rnnkit.models import eval_mode


@dataclass(frozen=True)
class Hypothesis:
    """One continuation the search found."""

    ids: list[int]  # the new tokens, without the prime
    log_prob: float  # sum of log p(token | prime, tokens before it) over the new tokens
    score: float  # log_prob / len(ids) ** length_penalty: what the hypotheses are ranked by


def check_beam(*, beam: int, length_penalty: float = 0.0, no_repeat_ngram: int = 0, num_return: int = 1) -> None:
    """Refuse a search no model could run, in the library's words."""
    if beam < 1:
        raise RnnkitError(f"the beam must hold at least 1 hypothesis, got {beam}")
    if not 0 <= length_penalty <= 10:
        raise RnnkitError(f"the length penalty must be in [0, 10] (0: off, 1: mean per token), got {length_penalty:g}")
    if no_repeat_ngram < 0:
        raise RnnkitError(f"no-repeat-ngram must be >= 0 (0: off), got {no_repeat_ngram}")
    if not 1 <= num_return <= beam:
        raise RnnkitError(f"a beam of {beam} returns at most {beam} hypotheses, {num_return} were asked for")


def normalised(log_prob: float, length: int, length_penalty: float) -> float:
    """The ranking score of a hypothesis of ``length`` new tokens (an empty one keeps its 0)."""
    return log_prob / max(length, 1) ** length_penalty


def repeated_ngrams(seqs: torch.Tensor, size: int, vocab_size: int) -> torch.Tensor:
    """(R, V) True where appending that token to row r of seqs (R, T) would repeat a ``size``-gram of the row."""
    banned = torch.zeros(seqs.shape[0], vocab_size + 1, dtype=torch.bool)
    if size < 1 or seqs.shape[1] < size:
        return banned[:, :vocab_size]
    grams = seqs.unfold(1, size, 1)  # (R, T - size + 1, size): every size-gram of each row
    tail = seqs[:, seqs.shape[1] - size + 1:]  # (R, size - 1): what the next token would extend
    # A gram whose first size-1 tokens equal the tail: its last token must not come next.
    # (size 1: the empty tail matches every gram, so no token of the row may come again.)
    match = (grams[:, :, :-1] == tail.unsqueeze(1)).all(dim=-1)  # (R, T - size + 1)
    nxt = torch.where(match, grams[:, :, -1], vocab_size)  # vocab_size: the unused column
    return banned.scatter_(1, nxt, True)[:, :vocab_size]


def beam_search(
    model: nn.Module,
    prime: Sequence[int],
    *,
    length: int,
    beam: int,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
    num_return: int = 1,
    window: int = 0,
    stepper=None,
    check: Callable[[], None] | None = None,
) -> list[Hypothesis]:
    """The ``num_return`` best hypotheses of ``length`` new tokens after ``prime`` (fewer when fewer exist), best first.

    ``window``: see :class:`~rnnkit.generation.Stream`; ``stepper``: a one-token step bound beforehand
    (None: bound here); ``check`` is called before each step (a server's deadline).
    """
    check_beam(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram, num_return=num_return)
    if length < 0:
        raise RnnkitError(f"the length must be >= 0, got {length}")
    if len(prime) == 0:
        raise RnnkitError("the prime is empty: give at least one token to start from")
    with eval_mode(model):
        stream = Stream(model, window=window, stepper=stepper or (None if window else model.stepper()))
        stream.feed(list(prime))  # one row, read once
        seqs = torch.zeros(1, 0, dtype=torch.long)  # (R, T) the new tokens of each live hypothesis
        scores = torch.zeros(1, dtype=torch.float64)  # (R,) their summed log-probabilities
        ended: list[Hypothesis] = []
        for t in range(length):
            if check is not None:
                check()
            # Scores add up in float64 on the CPU: the same sums, and the same ties, on any device.
            logp = torch.log_softmax(stream.next_logits().double().cpu(), dim=-1)  # (R, V)
            if no_repeat_ngram:
                logp = logp.masked_fill(repeated_ngrams(seqs, no_repeat_ngram, logp.shape[1]), float("-inf"))
            candidates = scores.unsqueeze(1) + logp  # (R, V)
            stuck = torch.isneginf(candidates).all(dim=1)  # no allowed next token: the hypothesis ends here
            ended += [_hypothesis(seqs[r], scores[r], length_penalty) for r in stuck.nonzero().flatten().tolist()]
            flat = candidates.reshape(-1)  # (R * V,) row-major: index = row * V + token
            best = torch.sort(flat, descending=True, stable=True).indices[:beam]  # stable: ties by index
            best = best[torch.isfinite(flat[best])]
            if len(best) == 0:  # every hypothesis has ended
                seqs, scores = seqs[:0], scores[:0]
                break
            parents, tokens = best // logp.shape[1], best % logp.shape[1]  # (R',)
            seqs, scores = torch.cat([seqs[parents], tokens.unsqueeze(1)], dim=1), flat[best]
            if t + 1 < length:  # the last tokens need no step: nothing reads their prediction
                stream.select(parents)
                stream.advance(tokens)
        live = [_hypothesis(seq, score, length_penalty) for seq, score in zip(seqs, scores, strict=True)]
    # Python's sort is stable: equal scores keep the order above (ended first, then by beam rank).
    return sorted(ended + live, key=lambda h: -h.score)[:num_return]


def _hypothesis(seq: torch.Tensor, score: torch.Tensor, length_penalty: float) -> Hypothesis:
    log_prob = float(score)
    return Hypothesis(ids=seq.tolist(), log_prob=log_prob, score=normalised(log_prob, len(seq), length_penalty))
