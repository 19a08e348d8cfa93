"""The yardstick: a plain PyTorch loop training a char-level LSTM, nothing of rnnkit's.

What a user would write in 40 lines: characters -> ids, the last
``--val-fraction`` of the text held out, B parallel streams read window by
window with the state carried and detached (truncated BPTT), embedding ->
nn.LSTM -> linear, cross-entropy, Adam at a constant learning rate, gradient
clipping. It trains for ``--seconds`` of wall-clock, then scores every
held-out character the same way (B streams, state carried) and prints one
JSON object: tokens trained, tokens/s, held-out nats and bits per char.
It imports no rnnkit code, so the process runs with glibc's allocator and
MKL exactly as a normal Python process has them.

    python benchmarks/plain_loop.py --text shakespeare.txt --seconds 300
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.embedding(x), state)
        return self.head(out), state


def streams(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, L): the text cut into B equal consecutive streams (the remainder dropped)."""
    length = len(ids) // batch
    return ids[: batch * length].view(batch, length)


def score(model: CharLSTM, ids: torch.Tensor, batch: int, seq_len: int) -> tuple[float, int]:
    """Summed next-char nats over every held-out position reachable in B streams, and their count."""
    data = streams(ids, min(batch, max(1, (len(ids) - 1) // seq_len)))
    total, count, state = 0.0, 0, None
    model.eval()
    with torch.no_grad():
        for k in range(0, data.shape[1] - 1, seq_len):
            x, y = data[:, k : k + seq_len], data[:, k + 1 : k + seq_len + 1]
            x = x[:, : y.shape[1]]
            logits, state = model(x, state)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    text = open(args.text, encoding="utf-8").read()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    n_val = int(round(len(ids) * args.val_fraction))
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]

    model = CharLSTM(len(chars), args.hidden, args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data = streams(train, args.batch)
    tokens, state, k, start = 0, None, 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        if k + args.seq_len + 1 > data.shape[1]:
            k, state = 0, None  # a new epoch starts the streams (and their state) again
        x, y = data[:, k : k + args.seq_len], data[:, k + 1 : k + args.seq_len + 1]
        state = None if state is None else tuple(s.detach() for s in state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        tokens += x.numel()
        k += args.seq_len
    seconds = time.perf_counter() - start
    total, count = score(model, val, args.batch, args.seq_len)
    nats = total / count
    print(json.dumps({"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
                      "val_nats_per_char": round(nats, 4), "val_bits_per_char": round(nats / math.log(2), 4),
                      "val_tokens": count}))


if __name__ == "__main__":
    main()
