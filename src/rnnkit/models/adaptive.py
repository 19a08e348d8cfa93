"""The adaptive softmax head of a language model (Grave et al. 2017, "Efficient softmax approximation for GPUs").

The vocabulary is cut at ``cutoffs`` into a shortlist of the most frequent ids
and clusters of rarer ones. The head scores the shortlist plus one entry per
cluster; a cluster's ids are scored by a narrower projection (``hidden /
div_value**k`` for the k-th cluster) and only for the rows whose target lies in
it. A word's probability is p(its cluster) * p(word | cluster). This only pays
if the ids are ranked by frequency, as word-level vocabularies are (their
``<unk>``/``<eos>`` come last, in the rarest cluster).

``head(h)`` gives full log-probabilities, (N, H) -> (N, V), so that whatever
reads a model's scores (generation, beam search, the server) takes their
softmax as the distribution; ``nll(h, targets)`` is the training path that
never builds the (N, V) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import RnnkitError


def default_cutoffs(vocab_size: int) -> list[int]:
    """V/16 and V/4 (e.g. 1995 and 7981 for 31,925 words): the shortlist covers most tokens of Zipfian text."""
    return sorted({c for c in (vocab_size // 16, vocab_size // 4) if 0 < c < vocab_size})


def resolve_cutoffs(cutoffs: list[int], vocab_size: int, *, hidden: int, div_value: float) -> list[int]:
    """The cut-offs an adaptive head over ``vocab_size`` ids uses (``[]``: the default), checked."""
    chosen = list(cutoffs) or default_cutoffs(vocab_size)
    if not chosen:
        raise RnnkitError(f"a vocabulary of {vocab_size} tokens is too small for --softmax adaptive; "
                          "use --softmax full")
    if chosen != sorted(set(chosen)) or chosen[0] < 1 or chosen[-1] > vocab_size - 1:
        raise RnnkitError(f"--cutoffs must be increasing ids between 1 and {vocab_size - 1} (the vocabulary has "
                          f"{vocab_size} tokens), got {' '.join(map(str, chosen))}")
    if int(hidden // div_value ** len(chosen)) < 1:
        raise RnnkitError(f"--hidden {hidden} is too narrow for {len(chosen)} clusters at --div-value "
                          f"{div_value:g} (the last cluster's projection would have no units); lower --div-value "
                          "or give fewer --cutoffs")
    return chosen


class AdaptiveHead(nn.AdaptiveLogSoftmaxWithLoss):
    """``head(h) -> log-probabilities``, h (N, H) or (B, T, H) -> (N, V) or (B, T, V); ``nll(h, targets)``."""

    def __init__(self, *, hidden: int, vocab_size: int, cutoffs: list[int], div_value: float) -> None:
        # A bias on the head, as the full softmax has: it learns the unigram frequencies for free.
        super().__init__(hidden, vocab_size, cutoffs, div_value=div_value, head_bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        flat = h.reshape(-1, h.shape[-1]).float()  # (N, H): torch's log_prob takes rows only
        return self.log_prob(flat).reshape(*h.shape[:-1], self.n_classes)

    def nll(self, h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-log p(target) and the most likely id per row: h (N, H), targets (N,) -> (N,) float, (N,) ids.

        A cluster's words are scored only for the rows whose target lies in it, and
        for the argmax only for the rows whose head picks a cluster.
        """
        # float before every log-softmax: under autocast the projections give bf16/fp16 scores.
        head = F.log_softmax(self.head(h).float(), dim=-1)  # (N, shortlist + clusters)
        nll = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)  # (N,) -log p(word | cluster)
        entry = targets.clone()  # (N,) the head entry each row reads: its word, or its word's cluster
        for k in range(self.n_clusters):
            low, high = self.cutoffs[k], self.cutoffs[k + 1]
            rows = ((targets >= low) & (targets < high)).nonzero().squeeze(1)  # (n_k,) this cluster's rows
            if rows.numel() == 0:
                continue
            tail = F.log_softmax(self.tail[k](h[rows]).float(), dim=-1)  # (n_k, high - low)
            nll = nll.index_copy(0, rows, -tail.gather(1, (targets[rows] - low)[:, None])[:, 0])
            entry[rows] = self.shortlist_size + k
        return nll - head.gather(1, entry[:, None])[:, 0], self._argmax(h.detach(), head.detach())

    @torch.no_grad()
    def _argmax(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """(N, H) and the head's (N, shortlist + clusters) log-probabilities -> (N,) the most likely ids."""
        predicted = head.argmax(dim=-1)  # (N,)
        # A word of the shortlist is final: no word of a cluster is likelier than the cluster itself.
        rows = (predicted >= self.shortlist_size).nonzero().squeeze(1)  # (n,)
        if rows.numel() == 0:
            return predicted
        short = self.shortlist_size
        best, best_id = head[rows, :short].max(dim=-1)  # (n,) the likeliest word of the shortlist
        for k in range(self.n_clusters):
            tail = self.tail[k](h[rows]).float()  # (n, size of cluster k)
            top, where = tail.max(dim=-1)
            score = head[rows, short + k] + top - tail.logsumexp(dim=-1)  # log p(cluster) + log p(its best word)
            better = score > best  # ties keep the lower id, as an argmax over all V ids would
            best, best_id = torch.where(better, score, best), torch.where(better, where + self.cutoffs[k], best_id)
        return predicted.index_copy(0, rows, best_id)
