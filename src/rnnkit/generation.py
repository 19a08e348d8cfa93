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
from rnnkit.models import eval_mode


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
    logits = logits.float()
    if temperature < 1e-3:
        # Shift each row's top logit to 0 before dividing: softmax is unchanged, and a tiny
        # temperature then sends the others to -inf (greedy) instead of overflowing into inf - inf = nan.
        # (Above 1e-3 the quotient cannot overflow, and softmax shifts by the maximum itself.)
        logits = logits - logits.max(dim=-1, keepdim=True).values
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.softmax(filter_logits(logits, top_k=top_k, top_p=top_p), dim=-1)  # (B, V)
    # Inverse-CDF sampling: the first token whose cumulative probability reaches u ~ U(0, total].
    # Same distribution as torch.multinomial, in a quarter of its time for one row (it matters
    # when a small model generates one token at a time). A token of probability 0 adds nothing
    # to the sum, so it is never the first to reach u > 0.
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = (1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


# A long text is read in pieces of this many tokens: the logits of a piece, (N, T, V),
# stay small even for a large vocabulary, and the state carries across pieces.
READ_CHUNK = 4096


class Stream:
    """A text being read and written by one model: feed tokens, sample tokens, in any order.

    The recurrent state after the last token read ((L, N, H) tensors) and that
    token's logits (N, V) summarise everything before, so each new token costs
    one recurrent step, however long the text already is. The N rows start from
    one shared history (:meth:`fork`) and then go their own ways.

    ``window`` N > 0 is for many-to-one models, trained to read exactly N tokens
    from a zero state: the stream then keeps the last N tokens and each
    prediction re-reads them, as the model was trained (a carried state would
    take it where training never went).

    In eval mode each new token, sampled or fed on its own, is one call of the
    model's one-token step, bound (``model.stepper()``: the weights laid out for
    the step) once per :meth:`sample` call and once per lone fed token, so a
    stream follows the weights as they are at each call and keeps no copy of
    them between calls (a server holds many streams of one model).

    A stream is not thread-safe: one caller at a time (the model may be shared).
    """

    def __init__(self, model: nn.Module, *, window: int = 0, stepper=None) -> None:
        self.model = model
        self.window = window
        # A one-token step bound beforehand, for a model whose weights no longer change (a server
        # binds once per loaded model); None: bind once per sample call.
        self.stepper = stepper
        self.device = next(model.parameters()).device
        self.rows = 1
        self.tokens = 0  # tokens read so far (per row)
        self.state = None  # carried state; None before the first token
        self.logits: torch.Tensor | None = None  # (N, V) prediction after the last token read
        self.recent: torch.Tensor | None = None  # (N, <=window) the last tokens, windowed models only

    @torch.inference_mode()
    def feed(self, ids: Sequence[int] | torch.Tensor) -> None:
        """Read ``ids`` (the same for every row): one forward pass per chunk, from the carried state."""
        x = torch.as_tensor(ids, dtype=torch.long).to(self.device).reshape(1, -1).expand(self.rows, -1)  # (N, T)
        self._read(x)

    def fork(self, rows: int) -> None:
        """Turn the one row read so far into ``rows`` identical rows (independent samples from one prime)."""
        if self.rows != 1:
            raise RnnkitError("only a one-row stream can be forked")
        self.rows = rows
        if self.state is not None:
            self.state = tuple(s.repeat(1, rows, 1) for s in self.state)  # (L, N, H)
        if self.logits is not None:
            self.logits = self.logits.expand(rows, -1)  # (N, V)
        if self.recent is not None:
            self.recent = self.recent.expand(rows, -1)  # (N, <=W)

    @torch.inference_mode()
    def sample(
        self,
        *,
        length: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield ``length`` steps of new ids, each a (N,) tensor on the CPU, every one read before it is yielded.

        So the stream holds exactly the yielded tokens, even when the caller stops early.
        """
        check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
        if self.tokens == 0:
            raise RnnkitError("the stream has read nothing yet: feed at least one token to start from")
        # Eval mode: each new token is one call of the one-token step, bound here once per call.
        # A windowed model re-reads its window with forward instead; so does a model in training
        # mode (dropout on), one length-1 window per token, as training reads.
        step = None if self.window or self.model.training else self.stepper or self.model.stepper()
        for _ in range(length):
            # Sampling runs on the CPU so that a seeded CPU generator gives the same text on any device.
            nxt = sample_next(self._next_logits().float().cpu(), temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=generator)
            if step is not None:
                self._step(nxt.to(self.device), step)  # (N,)
            else:
                self._read(nxt.to(self.device).unsqueeze(1))  # (N, 1)
            yield nxt

    @torch.inference_mode()
    def advance(self, ids: torch.Tensor) -> None:
        """Read one token per row, each row its own: ids (N,) (a beam's chosen tokens)."""
        self._read(ids.to(self.device).reshape(self.rows, 1))  # (N, 1)

    @torch.inference_mode()
    def select(self, rows: torch.Tensor) -> None:
        """Keep rows (R,) of the stream, in that order, a row as often as it is named (a beam's parents).

        Everything the stream carries is reordered alike, so row i then continues row ``rows[i]``
        without re-reading any token.
        """
        index = rows.to(self.device)
        if self.state is not None:
            self.state = tuple(s.index_select(1, index) for s in self.state)  # (L, R, H)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)  # (R, V)
        if self.recent is not None:
            self.recent = self.recent.index_select(0, index)  # (R, <=W)
        self.rows = len(index)

    @torch.inference_mode()
    def next_logits(self) -> torch.Tensor:
        """The (N, V) logits of the token after everything read so far."""
        if self.tokens == 0:
            raise RnnkitError("the stream has read nothing yet: feed at least one token to start from")
        return self._next_logits()

    def _next_logits(self) -> torch.Tensor:
        if self.window:
            logits, _ = self.model(self.recent)  # a fresh zero state every step: (N, W, V)
            return logits[:, -1]
        return self.logits

    def _step(self, ids: torch.Tensor, step) -> None:
        """Advance every row by one token, ids (N,), with a bound one-token step."""
        self.tokens += 1
        self.logits, self.state = step(ids, self.state)  # (N, V)

    def _read(self, x: torch.Tensor) -> None:
        """Advance every row over x (N, T).

        A run of tokens is one pass of ``forward`` (in chunks). A single token in eval mode is one
        ``step``, the same arithmetic as a sampled token, so a token's numbers do not depend on
        whether it was fed or sampled. A windowed model only remembers the tokens.
        """
        if x.shape[1] == 0:
            return
        if self.window:
            self.tokens += x.shape[1]
            recent = x if self.recent is None else torch.cat([self.recent, x], dim=1)
            self.recent = recent[:, -self.window:]
            return
        if x.shape[1] == 1 and not self.model.training:
            self._step(x[:, 0], self.stepper or self.model.stepper())  # (N,)
            return
        self.tokens += x.shape[1]
        for chunk in x.split(READ_CHUNK, dim=1) if x.shape[1] > READ_CHUNK else (x,):
            logits, self.state = self.model(chunk, self.state)  # (N, T, V)
        self.logits = logits[:, -1]


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

    The prime is read once; all samples share it and are generated together as
    one batch. ``window``: see :class:`Stream`.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if len(prime) == 0:
        raise RnnkitError("the prime is empty: give at least one token to start from")
    with eval_mode(model):
        stream = Stream(model, window=window)
        stream.feed(list(prime))  # prime once, as one row
        stream.fork(num_samples)
        yield from stream.sample(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)


def generate_ids(model: nn.Module, prime: Sequence[int], **kwargs) -> list[list[int]]:
    """Collect :func:`generate` into one list of new ids per sample."""
    steps = list(generate(model, prime, **kwargs))
    if not steps:
        return [[] for _ in range(kwargs.get("num_samples", 1))]
    return torch.stack(steps, dim=1).tolist()
