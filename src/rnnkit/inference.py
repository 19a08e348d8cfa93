"""Text in, predictions out: what the CLI and the server share between a tokenizer and a loaded model.

:mod:`rnnkit.generation` works on ids only; this module adds the text side:
encoding a prime (and saying which pieces the vocabulary lacks), turning a
growing list of generated ids into text increments for streaming, and
classifying raw texts with a classifier checkpoint. It sits below
``training/``, so serving a model never imports the training code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rnnkit.data.classification import BucketBatcher, Example, encode_examples
from rnnkit.data.tokenizers import Tokenizer, Unknown
from rnnkit.errors import RnnkitError
from rnnkit.models import eval_mode
from rnnkit.models.classifier import Classifier


@dataclass
class Prime:
    ids: list[int]
    unknown: list[str]  # distinct pieces of the text the vocabulary lacks (skipped, or mapped to <unk>)


def encode_prime(tokenizer: Tokenizer, text: str, *, unknown: Unknown | None = None) -> Prime:
    """Encode the text generation starts from; raises :class:`RnnkitError` when nothing usable is left."""
    try:
        ids = tokenizer.encode(text, unknown=unknown or tokenizer.default_unknown)
    except RnnkitError as exc:
        raise RnnkitError(f"prime {_clip(text)!r}: {exc}") from None
    if len(ids) == 0:
        raise RnnkitError(f"the prime {_clip(text)!r} is empty after tokenization; give text made of known tokens")
    return Prime(ids=ids.tolist(), unknown=tokenizer.unknown_in(text))


def _clip(text: str, limit: int = 60) -> str:
    """A long prime, shortened for an error message that must stay one line."""
    return text if len(text) <= limit else text[:limit] + "..."


def continuation(tokenizer: Tokenizer, context: Sequence[int], new: Sequence[int]) -> str:
    """The text ``new`` ids add after ``context``, decoded together (word spacing, multi-byte characters)."""
    head = tokenizer.decode(context)
    text = tokenizer.decode([*context, *new])
    # Re-spacing can change the end of the context itself (rare): then decode the new ids alone.
    return text[len(head):] if text.startswith(head) else tokenizer.decode(new)


class StreamText:
    """Turns a growing list of ids into text increments (word and BPE decoding needs context).

    ``context`` are ids already shown (a prime, or a session's recent history):
    they are decoded with the new ids, so spacing and multi-byte characters
    come out as in one decode of the whole, but only new text is returned.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int], *, echo: bool) -> None:
        self.tok = tokenizer
        self.ids = list(context)
        self.shown = "" if echo else tokenizer.decode(context)

    def start(self) -> str:
        return self.push([])

    def push(self, new: Iterable[int]) -> str:
        self.ids += new
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        if not text.startswith(self.shown):
            # Re-spacing changed earlier text (rare): show only what is new from here on.
            self.shown = text
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


@torch.inference_mode()
def predict_proba(model: Classifier, batches) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and true labels (N,) over ``(ids, lengths, labels)`` batches."""
    device = next(model.parameters()).device
    probs, labels = [], []
    with eval_mode(model):
        for ids, _, y in batches:
            logits, _ = model(ids.to(device))
            probs.append(torch.softmax(logits.float(), -1).cpu())
            labels.append(y)
    if not probs:
        return np.zeros((0, model.num_classes)), np.zeros(0, dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def classify_texts(
    model: Classifier,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    max_len: int,
    truncate: str = "pre",
    batch_size: int = 256,
    log: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C) for the texts that have tokens, and their positions (N,) in ``texts``.

    A text without any token is skipped (and reported through ``log``);
    :class:`RnnkitError` when no text is left.
    """
    # encode_examples wants labelled examples; the label is never read back.
    examples = [Example(text=t, label=labels[0]) for t in texts]
    encoded = encode_examples(examples, tokenizer=tokenizer, labels=labels, max_len=max_len, truncate=truncate,
                              log=log)
    batches = BucketBatcher(encoded, batch_size=batch_size, pad_id=model.pad_id, shuffle=False)
    probs, _ = predict_proba(model, batches)
    return probs, encoded.index
