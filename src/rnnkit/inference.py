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
from rnnkit.errors import RnnkitError, UnknownTokens
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
    except UnknownTokens as exc:
        raise exc.within(f"prime {_clip(text)!r}") from None
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


def prime_warning(tokenizer: Tokenizer, prime: Prime, unknown: Unknown | None) -> str | None:
    """What became of the prime's pieces the vocabulary lacks, in one line (None: there were none)."""
    if not prime.unknown:
        return None
    what = "mapped to <unk>" if (unknown or tokenizer.default_unknown) == "unk" else "skipped"
    return (f"{what} {len(prime.unknown)} piece(s) of the prime not in the vocabulary: "
            + " ".join(repr(c) for c in prime.unknown[:8]))


DEFAULT_TEMPERATURE = 0.8


@dataclass
class GenerateRequest:
    """What ``rnnkit generate`` asks of a language-model checkpoint: samples, or with ``beam`` a beam search."""

    prime: str | None = None  # None: the model's default prime (saved at training)
    length: int = 500
    temperatures: Sequence[float] | None = None  # None: (DEFAULT_TEMPERATURE,); sampling only
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # samples; with beam, how many of the best hypotheses to return (at most beam)
    seed: int | None = None  # None: a random one
    unknown: Unknown | None = None
    echo_prime: bool = True  # the text starts with the prime
    beam: int | None = None  # None: sample; N: search with N hypotheses (deterministic, see rnnkit.beam)
    length_penalty: float = 0.0  # beam: rank by log_prob / length ** length_penalty
    no_repeat_ngram: int = 0  # beam: forbid repeating any K new tokens in a row (0: off)

    @property
    def sampling_temperatures(self) -> Sequence[float]:
        return self.temperatures if self.temperatures is not None else (DEFAULT_TEMPERATURE,)

    def check(self) -> None:
        """Refuse settings no model could honour."""
        from rnnkit.generation import check_sampling

        if self.length < 0:
            raise RnnkitError(f"--length must be >= 0, got {self.length}")
        if self.num_samples < 1:
            raise RnnkitError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.beam is not None:
            self._check_beam()
            return
        if self.length_penalty or self.no_repeat_ngram:
            raise RnnkitError("--length-penalty and --no-repeat-ngram rank beam hypotheses; add --beam N "
                              "(or drop them to sample)")
        for temperature in self.sampling_temperatures:
            check_sampling(temperature=temperature, top_k=self.top_k, top_p=self.top_p)

    def _check_beam(self) -> None:
        if self.temperatures is not None or self.top_k or self.top_p != 1.0:
            raise RnnkitError("--beam searches for the likeliest text and samples nothing: drop --temperature, "
                              "--top-k and --top-p (or drop --beam to sample)")
        if self.beam < 1:
            raise RnnkitError(f"--beam must be >= 1 hypothesis (leave it out to sample), got {self.beam}")
        if self.num_samples > self.beam:
            raise RnnkitError(f"--num-samples {self.num_samples} asks for more hypotheses than --beam {self.beam} "
                              "keeps; raise --beam or lower --num-samples")
        if not 0 <= self.length_penalty <= 10:
            raise RnnkitError(f"--length-penalty must be in [0, 10] (0: off, 1: mean per token), "
                              f"got {self.length_penalty:g}")
        if self.no_repeat_ngram < 0:
            raise RnnkitError(f"--no-repeat-ngram must be >= 0 (0: off), got {self.no_repeat_ngram}")


def _prime_ids(ckpt, request: GenerateRequest, warn: Callable[[str], None] | None) -> list[int]:
    """The request's prime (or the checkpoint's default), encoded; a warning for pieces the vocabulary lacks."""
    tok = ckpt.tokenizer
    prime_text = request.prime if request.prime is not None else ckpt.meta.get("state", {}).get("default_prime", "\n")
    encoded = encode_prime(tok, prime_text, unknown=request.unknown)
    if warn is not None and (message := prime_warning(tok, encoded, request.unknown)):
        warn(message)
    return encoded.ids


def generate_text(ckpt, request: GenerateRequest, *, warn: Callable[[str], None] | None = None) -> Iterable[str]:
    """The text of ``request``, piece by piece as it is generated (headers between samples and temperatures).

    Everything is checked before the first piece; a single sample per temperature
    streams token by token, several come whole, each under a header line. A beam
    search's hypotheses come whole when the search ends (see :func:`beam_text`).
    """
    from rnnkit import tasks
    from rnnkit.config import generation_window
    from rnnkit.generation import generate

    if request.beam is not None:
        yield from beam_text(ckpt, request, warn=warn)
        return
    request.check()
    tasks.require(ckpt.task, "generates", what="`rnnkit generate`", where=str(ckpt.path))
    tok = ckpt.tokenizer
    prime = _prime_ids(ckpt, request, warn)
    seed = request.seed if request.seed is not None else int(torch.seed() % 2**31)
    temperatures = request.sampling_temperatures
    headers = len(temperatures) > 1 or request.num_samples > 1
    for temperature in temperatures:
        steps = generate(ckpt.model, prime, length=request.length, temperature=temperature, top_k=request.top_k,
                         top_p=request.top_p, num_samples=request.num_samples,
                         generator=torch.Generator().manual_seed(seed), window=generation_window(ckpt.run_config))
        if request.num_samples == 1:
            if headers:
                yield f"----- temperature {temperature:g} -----\n"
            stream = StreamText(tok, prime, echo=request.echo_prime)
            yield stream.start()
            for ids in steps:  # each token as soon as it exists
                yield stream.push(ids.tolist())
            yield "\n"
            continue
        columns = torch.stack(list(steps), dim=1).tolist() if request.length else [[]] * request.num_samples
        for i, ids in enumerate(columns, 1):
            text = tok.decode(prime + ids) if request.echo_prime else continuation(tok, prime, ids)
            yield f"----- temperature {temperature:g}, sample {i} -----\n{text}\n"


def beam_hypotheses(ckpt, request: GenerateRequest, *, warn: Callable[[str], None] | None = None) -> dict:
    """Run the request's beam search: ``{"prime", "beam", ..., "hypotheses": [{text, tokens, log_prob, score}]}``.

    The hypotheses are the ``num_samples`` best, best first; ``text`` starts
    with the prime unless ``echo_prime`` is off.
    """
    from rnnkit import tasks
    from rnnkit.beam import beam_search
    from rnnkit.config import generation_window

    request.check()
    if request.beam is None:
        raise RnnkitError("a beam search needs --beam N")
    tasks.require(ckpt.task, "generates", what="`rnnkit generate --beam`", where=str(ckpt.path))
    tok = ckpt.tokenizer
    prime = _prime_ids(ckpt, request, warn)
    found = beam_search(ckpt.model, prime, length=request.length, beam=request.beam,
                        length_penalty=request.length_penalty, no_repeat_ngram=request.no_repeat_ngram,
                        num_return=request.num_samples, window=generation_window(ckpt.run_config))
    texts = [tok.decode(prime + h.ids) if request.echo_prime else continuation(tok, prime, h.ids) for h in found]
    return {"prime": tok.decode(prime), "beam": request.beam, "length_penalty": request.length_penalty,
            "no_repeat_ngram": request.no_repeat_ngram,
            "hypotheses": [{"text": text, "tokens": len(h.ids), "log_prob": h.log_prob, "score": h.score}
                           for text, h in zip(texts, found, strict=True)]}


def beam_text(ckpt, request: GenerateRequest, *, warn: Callable[[str], None] | None = None) -> Iterable[str]:
    """The best hypothesis's text, or several under a header line each with its log-probability and score."""
    result = beam_hypotheses(ckpt, request, warn=warn)
    hypotheses = result["hypotheses"]
    if len(hypotheses) == 1:
        yield hypotheses[0]["text"] + "\n"
        return
    for i, h in enumerate(hypotheses, 1):
        yield (f"----- beam {request.beam}, hypothesis {i}: log-prob {h['log_prob']:.4f}, "
               f"score {h['score']:.4f} -----\n{h['text']}\n")


def read_texts_to_classify(path: str, *, text_column: str = "text") -> list[str]:
    """One text per line, or the text column of a TSV/CSV file with a header."""
    import pathlib

    from rnnkit.data import corpora
    from rnnkit.data.classification import read_texts

    p = pathlib.Path(path)
    if p.suffix.lower() in (".tsv", ".csv"):
        return read_texts(p, text_column=text_column)
    lines = [line for line in corpora.read_text(p).split("\n") if line.strip()]
    if not lines:
        raise RnnkitError(f"{p} has no texts to classify")
    return lines


def classify_lines(ckpt, texts: Sequence[str], *, all_labels: bool = False,
                   warn: Callable[[str], None] | None = None) -> Iterable[str]:
    """``label<TAB>probability<TAB>text`` per text with tokens (and every label's probability with ``all_labels``)."""
    from rnnkit import tasks

    tasks.require(ckpt.task, "classifies", what="`rnnkit classify`", where=str(ckpt.path))
    labels = ckpt.meta["labels"]
    run = ckpt.run_config.data
    probs, index = classify_texts(ckpt.model, ckpt.tokenizer, labels, texts, max_len=run.max_len,
                                  truncate=run.truncate, log=warn)
    for i, p in zip(index, probs, strict=True):
        k = int(p.argmax())
        line = f"{labels[k]}\t{p[k]:.4f}\t{texts[i]}"
        if all_labels:
            line += "\t" + "  ".join(f"{label} {q:.4f}" for label, q in zip(labels, p, strict=True))
        yield line + "\n"


def load_for(path: str, *, device: str = "cpu", capability: str | None = None, what: str = ""):
    """Load a checkpoint for a command; with ``capability``, refuse one whose task cannot do the job."""
    from rnnkit import tasks
    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.runtime import resolve_device

    ckpt = load_checkpoint(path, device=resolve_device(device))
    if capability is not None:
        tasks.require(ckpt.task, capability, what=what, where=str(path))
    return ckpt


def vocabulary(tokenizer: Tokenizer, *, top: int = 50, sort: str = "count") -> tuple[dict, list[str]]:
    """A tokenizer's tokens with their training counts: the JSON form and the table's lines."""
    counts = tokenizer.counts or [None] * tokenizer.vocab_size
    rows = [(i, tokenizer.token(i), counts[i]) for i in range(tokenizer.vocab_size)]
    if sort == "count" and tokenizer.counts:
        rows.sort(key=lambda r: -r[2])
    shown = rows[:top] if top else rows
    data = {"level": tokenizer.kind, "size": tokenizer.vocab_size,
            "tokens": [{"id": i, "token": t, "count": c} for i, t, c in shown]}
    total = sum(c for c in counts if c) or None
    lines = [f"# {tokenizer.kind} vocabulary, {tokenizer.vocab_size} tokens"
             + (f", {total:,} in the training text" if total else ""),
             f"{'id':>6}  {'count':>10}  {'share':>6}  token"]
    for i, token, count in shown:
        share = f"{100 * count / total:5.2f}%" if total and count is not None else "     -"
        lines.append(f"{i:>6}  {count if count is not None else '-':>10}  {share}  {token!r}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more (--top 0 shows all)")
    return data, lines
