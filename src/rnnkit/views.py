"""Hidden-state views: what each recurrent unit does over a text, and which words moved a classifier.

For a language model (Karpathy, Johnson & Fei-Fei 2015, "Visualizing and
Understanding Recurrent Networks"): the text is read token by token with the
bound one-token step generation uses (``model.stepper()``, B = 1), the state
after every token is kept (h, plus c for an LSTM; the gates on request,
recomputed from the layer's weights), and every unit is ranked by the Pearson
correlation of its activation with simple features of the text: inside
quotes, inside brackets, position in the line, end of line, start of a word,
digit.

For a classifier: the probability of the predicted class after each prefix
of the text, so the change each token made to it (:func:`attribute`).

This module computes; :mod:`rnnkit.plots` draws (``inspect_figures``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.models import eval_mode
from rnnkit.models.blocks import ResidualStack
from rnnkit.models.cells import positive

# What each feature means, per character: the value after reading that character.
FEATURES: dict[str, str] = {
    "in_quotes": 'inside a "..." quotation (the opening quote counts as inside, the closing one not)',
    "in_brackets": "inside (...), [...] or {...} at any depth (the opening bracket counts, the closing one not)",
    "line_position": "characters read so far on this line (0 at a newline)",
    "end_of_line": "the last character before a newline",
    "word_start": "the first character of a word (a letter or digit after anything else)",
    "digit": "a digit",
}
# Gate names in PyTorch's order within W_ih / W_hh (and the cells' chunk order for minGRU/minLSTM).
GATE_NAMES: dict[str, tuple[str, ...]] = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n"),
                                          "mingru": ("z", "candidate"), "minlstm": ("f", "i", "candidate")}
OPEN, CLOSE = "([{", ")]}"


def char_features(text: str) -> dict[str, np.ndarray]:
    """Every feature of :data:`FEATURES` per character of ``text``: (len(text),) float arrays."""
    n = len(text)
    values = {name: np.zeros(n) for name in FEATURES}
    quoted, depth, column = False, 0, 0
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif ch == "\u201c":
            quoted = True
        elif ch == "\u201d":
            quoted = False
        depth = depth + 1 if ch in OPEN else max(depth - (ch in CLOSE), 0)
        column = 0 if ch == "\n" else column + 1
        # A closing quote or bracket ends the span: the state after reading it is outside again.
        values["in_quotes"][i] = quoted
        values["in_brackets"][i] = depth > 0
        values["line_position"][i] = column
        values["end_of_line"][i] = i + 1 < n and text[i + 1] == "\n"
        values["word_start"][i] = ch.isalnum() and (i == 0 or not text[i - 1].isalnum())
        values["digit"][i] = ch.isdigit()
    return values


def token_spans(tokenizer: Tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text the ids decode to and each token's (start, end) character span in it (spans tile the text)."""
    text = tokenizer.decode(ids)
    if tokenizer.kind == "char":
        return text, [(k, k + 1) for k in range(len(ids))]
    ends = _aligned_ends(tokenizer, ids, text)
    if ends is None:
        # Decoding re-spaced or merged pieces (a split multi-byte character): measure each prefix as
        # decoded whole, which is exact but O(T^2).
        ends = [len(tokenizer.decode(ids[: k + 1])) for k in range(len(ids) - 1)] + [len(text)]
        ends = np.maximum.accumulate(ends).tolist()
    return text, list(zip([0, *ends[:-1]], ends, strict=True))


def _aligned_ends(tokenizer: Tokenizer, ids: Sequence[int], text: str) -> list[int] | None:
    """Each token's end in ``text``: its own decoded piece found after the previous one, with only spaces
    between (word spacing depends on context: quotes open and close); None where a piece is not there."""
    ends, cursor = [], 0
    for i in ids:
        piece = tokenizer.decode([i]).strip()
        at = text.find(piece, cursor)
        if at < 0 or text[cursor:at].strip():
            return None
        cursor = at + len(piece)
        ends.append(cursor)
    if text[cursor:].strip():
        return None
    ends[-1] = len(text)  # trailing spaces belong to the last token
    return ends


def token_features(text: str, spans: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Features per token (T,): a state feature (quotes, brackets, line position) at the token's last
    character, an event (end of line, word start, digit) if any of its characters has it."""
    chars = char_features(text)
    out = {name: np.zeros(len(spans)) for name in FEATURES}
    for k, (a, b) in enumerate(spans):
        if b <= a:
            continue  # a token that decodes to nothing (e.g. <eos>) keeps zeros
        for name, values in chars.items():
            out[name][k] = values[b - 1] if name in ("in_quotes", "in_brackets", "line_position") else values[a:b].max()
    return out


@dataclass
class Trace:
    """A language model's activations over a text: ``signals[name]`` is (T, layers, H), one row per token."""

    ids: list[int]
    text: str  # what the ids decode to: the text the model read
    spans: list[tuple[int, int]]  # each token's characters in ``text``
    signals: dict[str, np.ndarray]  # "h", "c" (LSTM), and gates such as "f" with ``gates``


@torch.inference_mode()
def trace(model, tokenizer: Tokenizer, ids: Sequence[int], *, gates: bool = False) -> Trace:
    """Step ``model`` over ``ids`` one token at a time (B = 1) and keep the state after each token."""
    if not ids:
        raise RnnkitError("the text has no tokens the model knows; give text made of known tokens")
    device = next(model.parameters()).device
    with eval_mode(model):
        step = model.stepper()
        state = None
        kept: list[list[torch.Tensor]] = []
        for token in torch.tensor(list(ids), device=device).unsqueeze(1):  # (T, 1): one id per step
            _, state = step(token, state)
            kept.append([s[:, 0] for s in state])  # each (layers, H)
        names = ("h", "c") if len(kept[0]) == 2 else ("h",)
        stacked = {name: torch.stack([k[n] for k in kept]).float() for n, name in enumerate(names)}  # (T, L, H)
        if gates:
            stacked.update(gate_values(model, torch.tensor(list(ids), device=device), stacked["h"]))
    text, spans = token_spans(tokenizer, list(ids))
    return Trace(ids=list(ids), text=text, spans=spans,
                 signals={name: value.cpu().numpy() for name, value in stacked.items()})


def gate_values(model, ids: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer's gates at every step, from the weights: ids (T,), h (T, L, H) -> {gate: (T, L, H)}.

    Layer k's gates read what the layer read (:func:`layer_inputs`) and its own previous h;
    recomputing them all at once costs one product per layer.
    """
    cell = model.recurrent.cell
    if cell not in GATE_NAMES:
        raise RnnkitError(f"a vanilla RNN has no gates (this checkpoint's cell is {cell!r}); inspect it without gates")
    per_layer = []
    for k, (x, weights) in enumerate(layer_inputs(model, ids, h)):
        w_ih, w_hh, b_ih, b_hh = (w if w is None else w.to(h.dtype) for w in weights)
        previous = torch.cat([torch.zeros_like(h[:1, k]), h[:-1, k]])  # (T, H): h_{t-1}, zeros before the text
        gx = F.linear(x, w_ih, b_ih)  # (T, G*H)
        gh = F.linear(previous, w_hh, b_hh) if w_hh is not None else torch.zeros_like(gx)
        per_layer.append(_gates(cell, gx, gh))
    return {name: torch.stack([layer[name] for layer in per_layer], dim=1) for name in GATE_NAMES[cell]}


def layer_inputs(model, ids: torch.Tensor, h: torch.Tensor):
    """Yield each layer's input (T, I) over the text and its (W_ih, W_hh, b_ih, b_hh), given every h (T, L, H).

    Plain stack: layer 0 reads the embedding, layer k layer k-1's output. Residual blocks
    (:class:`~rnnkit.models.blocks.ResidualStack`, eval mode): block k's layer reads LN_k of the residual
    stream, which its output (h) and MLP then add to.
    """
    stack = model.recurrent
    x = model.embed(ids).to(h.dtype)  # (T, E)
    if not isinstance(stack, ResidualStack):
        for k in range(h.shape[1]):
            yield x, stack.layer_weights(k)
            x = h[:, k]
        return
    if stack.input_proj is not None:
        x = stack.input_proj(x)  # (T, H): the residual stream
    for k, block in enumerate(stack.blocks):
        yield block.norm(x), block.recurrent.layer_weights(0)
        x = x + h[:, k]
        if block.mlp_up is not None:
            x = x + block.mlp_down(F.gelu(block.mlp_up(block.mlp_norm(x))))


def _gates(cell: str, gx: torch.Tensor, gh: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's gates (T, H) each, from the input share gx and the recurrent share gh (T, G*H)."""
    if cell == "lstm":
        i, f, g, o = (gx + gh).chunk(4, dim=-1)
        return {"i": torch.sigmoid(i), "f": torch.sigmoid(f), "g": torch.tanh(g), "o": torch.sigmoid(o)}
    if cell == "gru":
        (x_r, x_z, x_n), (h_r, h_z, h_n) = gx.chunk(3, dim=-1), gh.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        return {"r": r, "z": torch.sigmoid(x_z + h_z), "n": torch.tanh(x_n + r * h_n)}
    if cell == "mingru":
        k_z, k_h = gx.chunk(2, dim=-1)
        return {"z": torch.sigmoid(k_z), "candidate": positive(k_h)}
    k_f, k_i, k_h = gx.chunk(3, dim=-1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    return {"f": f / (f + i), "i": i / (f + i), "candidate": positive(k_h)}  # normalised, as the cell uses them


def pearson(values: np.ndarray, feature: np.ndarray) -> np.ndarray:
    """Pearson r of every column of values (T, U) with feature (T,): (U,); 0 where either is constant."""
    v = values - values.mean(axis=0)
    f = feature - feature.mean()
    scale = np.sqrt((v * v).sum(axis=0) * (f * f).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (v * f[:, None]).sum(axis=0) / scale
    return np.where(scale > 1e-12, r, 0.0)


@dataclass
class Unit:
    """One unit of one signal of the inspected layer, and how it tracks a feature."""

    feature: str
    signal: str  # "h", "c" or a gate
    unit: int
    r: float  # Pearson correlation with the feature, with its sign

    @property
    def label(self) -> str:
        return f"{self.feature}: {self.signal}[{self.unit}] r={self.r:+.2f}"


@dataclass
class Inspection:
    """A layer's units ranked per feature: ``ranking[feature]`` is the top K by |r| (constant features left out)."""

    trace: Trace
    layer: int
    features: dict[str, np.ndarray]  # per token (T,)
    ranking: dict[str, list[Unit]]
    constant: list[str] = field(default_factory=list)  # features that never change in this text

    def activations(self, unit: Unit) -> np.ndarray:
        """(T,) the unit's activation after each token."""
        return self.trace.signals[unit.signal][:, self.layer, unit.unit]

    def shown(self, k: int) -> list[Unit]:
        """K distinct units to draw: each feature's best, then each feature's second, ... (by |r| within a rank)."""
        picked: list[Unit] = []
        seen: set[tuple[str, int]] = set()
        for rank in range(max((len(v) for v in self.ranking.values()), default=0)):
            row = sorted((v[rank] for v in self.ranking.values() if rank < len(v)), key=lambda u: -abs(u.r))
            for u in row:
                if (u.signal, u.unit) not in seen and len(picked) < k:
                    picked.append(u)
                    seen.add((u.signal, u.unit))
        return picked

    def unit(self, signal: str, unit: int) -> Unit:
        """A unit chosen by hand, with the feature it tracks best (its largest |r|)."""
        if signal not in self.trace.signals:
            raise RnnkitError(f"signal {signal!r} is not one of this inspection's: {', '.join(self.trace.signals)}")
        hidden = self.trace.signals[signal].shape[2]
        if not 0 <= unit < hidden:
            raise RnnkitError(f"unit {unit} is out of range: a layer has {hidden} units, 0..{hidden - 1}")
        values = self.trace.signals[signal][:, self.layer, unit : unit + 1]  # (T, 1)
        varying = [f for f in self.features if f not in self.constant] or list(self.features)
        rs = {f: float(pearson(values, self.features[f])[0]) for f in varying}
        best = max(rs, key=lambda f: abs(rs[f]))
        return Unit(best, signal, unit, rs[best])

    def view(self, unit: Unit) -> dict:
        """A unit with its activation after each token, as the server sends it."""
        return {"feature": unit.feature, "signal": unit.signal, "unit": unit.unit, "r": round(unit.r, 4),
                "values": [round(float(v), 4) for v in self.activations(unit)]}

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tokens": len(self.trace.ids), "signals": list(self.trace.signals),
                "constant_features": self.constant,
                "ranking": {f: [{"signal": u.signal, "unit": u.unit, "r": round(u.r, 4)} for u in units]
                            for f, units in self.ranking.items()}}


def check_layer_top(model, layer: int | None, top: int) -> int:
    """The layer to inspect (None: the top one); :class:`RnnkitError` for a layer or K out of range."""
    layers, hidden = model.recurrent.layers, model.recurrent.hidden
    chosen = layers - 1 if layer is None else layer
    if not 0 <= chosen < layers:
        raise RnnkitError(f"layer {layer} is out of range: this model has {layers} layer(s), 0..{layers - 1}")
    if not 1 <= top <= hidden:
        raise RnnkitError(f"top {top} is out of range: a layer has {hidden} units, so 1..{hidden}")
    return chosen


def rank_units(tr: Trace, *, layer: int, top: int) -> Inspection:
    """Rank the units of ``layer`` (every signal of the trace) by |r| with each feature; top K per feature."""
    feats = token_features(tr.text, tr.spans)
    names = list(tr.signals)
    values = np.concatenate([tr.signals[s][:, layer] for s in names], axis=1)  # (T, S*H)
    hidden = tr.signals["h"].shape[2]
    ranking, constant = {}, []
    for feature, column in feats.items():
        if np.ptp(column) == 0:
            constant.append(feature)
            continue
        r = pearson(values, column)
        best = np.argsort(-np.abs(r), kind="stable")[:top]
        ranking[feature] = [Unit(feature, names[j // hidden], int(j % hidden), float(r[j])) for j in best]
    return Inspection(trace=tr, layer=layer, features=feats, ranking=ranking, constant=constant)


def inspect_language_model(model, tokenizer: Tokenizer, text: str, *, layer: int | None = None, top: int = 5,
                           gates: bool = False, max_tokens: int = 0, unknown: str | None = None) -> Inspection:
    """Read ``text`` with the model's stepwise forward and rank the units of ``layer`` (None: the top one)."""
    chosen = check_layer_top(model, layer, top)
    try:
        ids = tokenizer.encode(text, unknown=unknown or tokenizer.default_unknown).tolist()
    except RnnkitError as exc:
        raise type(exc)(f"the text to inspect: {exc}") from None
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise RnnkitError(f"the text to inspect has {len(ids)} token(s) the model knows; give a longer text")
    return rank_units(trace(model, tokenizer, ids, gates=gates), layer=chosen, top=top)


# ---------------------------------------------------------------- classifiers


@dataclass
class Attribution:
    """Which tokens moved a classifier: p[k] is the predicted class's probability after reading tokens 0..k."""

    text: str  # the decoded text the classifier read
    tokens: list[str]  # each token as it appears in ``text``
    label: str  # the class predicted for the whole text
    probability: float
    before: float  # the class's probability with nothing read (the padding vector alone)
    p: np.ndarray  # (T,)

    @property
    def change(self) -> np.ndarray:
        """(T,) how much each token moved the predicted class's probability."""
        return np.diff(self.p, prepend=self.before)

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "probability": round(self.probability, 4),
                "before": round(self.before, 4),
                "tokens": [{"token": t, "p": round(float(q), 4), "change": round(float(d), 4)}
                           for t, q, d in zip(self.tokens, self.p, self.change, strict=True)]}


@torch.inference_mode()
def attribute(model, tokenizer: Tokenizer, labels: Sequence[str], text: str, *, max_len: int,
              truncate: str = "pre", unknown: str | None = None) -> Attribution:
    """The classifier on every prefix of ``text`` (one padded batch), cut to ``max_len`` tokens as the
    classifier reads it (``truncate="pre"`` keeps the last ones, ``"post"`` the first)."""
    try:
        ids = tokenizer.encode(text, unknown=unknown or tokenizer.default_unknown).tolist()
    except RnnkitError as exc:
        raise type(exc)(f"text {text[:40]!r}: {exc}") from None
    if not ids:
        raise RnnkitError(f"text {text[:40]!r} has no token the classifier knows; give text made of known tokens")
    ids = ids[-max_len:] if truncate == "pre" else ids[:max_len]
    device = next(model.parameters()).device
    n = len(ids)
    # Row 0 is the padding vector alone (nothing read); row k+1 holds the first k+1 tokens, post-padded.
    batch = torch.full((n + 1, n), model.pad_id, dtype=torch.long)
    for k in range(n):
        batch[k + 1, : k + 1] = torch.tensor(ids[: k + 1])
    with eval_mode(model):
        probs = torch.softmax(model(batch.to(device))[0].float(), -1).cpu().numpy()  # (n + 1, C)
    k = int(probs[-1].argmax())
    decoded, spans = token_spans(tokenizer, ids)
    return Attribution(text=decoded, tokens=[decoded[a:b] for a, b in spans], label=labels[k],
                       probability=float(probs[-1, k]), before=float(probs[0, k]), p=probs[1:, k])


# ---------------------------------------------------------------- `rnnkit inspect`: checkpoint in, report and PNGs out

MAX_TEXTS = 20  # a classifier's texts per inspection: each is one row of the figure


@dataclass
class InspectRequest:
    """What ``rnnkit inspect`` asks of a checkpoint."""

    text: str  # the text itself (already read from --text)
    layer: int | None = None  # None: the top layer
    top: int = 5  # units per feature in the ranking, and units drawn
    gates: bool = False
    max_tokens: int = 2000  # read only the first N tokens (0: all)
    out: Path | None = None  # folder for the PNGs; None: none drawn
    unknown: str | None = None

    def check(self) -> None:
        """Refuse settings no checkpoint could honour (the rest depends on the model)."""
        if self.top < 1:
            raise RnnkitError(f"top {self.top} is out of range: show at least 1")
        if self.max_tokens < 0:
            raise RnnkitError(f"max tokens must be >= 0 (0: all), got {self.max_tokens}")


@dataclass
class InspectReport:
    data: dict  # the JSON form
    lines: list[str]  # the table
    files: list[Path]  # PNGs written


def inspect_checkpoint(ckpt, request: InspectRequest) -> InspectReport:
    """Inspect a checkpoint as its task says (a language model's units, a classifier's words)."""
    from rnnkit import tasks

    request.check()
    spec = tasks.require(ckpt.task, "inspects", what="`rnnkit inspect`", where=str(ckpt.path))
    if request.out is not None:
        from rnnkit.plots import pyplot

        pyplot()  # matplotlib missing: say so before any work
        if request.out.exists() and not request.out.is_dir():
            raise RnnkitError(f"--out {request.out} is a file; give a folder for the PNGs")
    return tasks.resolve(spec.inspects)(ckpt, request)


def per_char(spans: Sequence[tuple[int, int]], values: np.ndarray, length: int) -> np.ndarray:
    """(length,) each character's token's value (NaN for characters no token covers)."""
    out = np.full(length, np.nan)
    for (a, b), v in zip(spans, values, strict=True):
        out[a:b] = v
    return out


def inspect_units(ckpt, request: InspectRequest) -> InspectReport:
    """A language model: the ranking table, its JSON, and ``units.png`` + ``heatmap.png`` in ``request.out``."""
    ins = inspect_language_model(ckpt.model, ckpt.tokenizer, request.text, layer=request.layer, top=request.top,
                                 gates=request.gates, max_tokens=request.max_tokens, unknown=request.unknown)
    lines = [f"# layer {ins.layer}, {len(ins.trace.ids)} tokens; signals: {', '.join(ins.trace.signals)}; "
             f"Pearson r with each feature, top {request.top} by |r|",
             f"{'feature':<14} {'rank':>4}  {'unit':<14} {'r':>6}"]
    for feature, units in ins.ranking.items():
        lines += [f"{feature if n == 0 else '':<14} {n + 1:>4}  {f'{u.signal}[{u.unit}]':<14} {u.r:+6.3f}"
                  for n, u in enumerate(units)]
    if ins.constant:
        lines.append(f"# constant in this text, not ranked: {', '.join(ins.constant)}")
    files = [] if request.out is None else unit_figures(ins, request.out, top=request.top)
    return InspectReport(data={**ins.to_dict(), "files": [str(f) for f in files]}, lines=lines, files=files)


def unit_figures(ins: Inspection, out: Path, *, top: int, chars: int = 700, steps: int = 120) -> list[Path]:
    """``units.png`` (the first ``chars`` characters coloured by each shown unit) and ``heatmap.png``."""
    from rnnkit.plots import plot_coloured_text, plot_heatmap

    tr, units = ins.trace, ins.shown(top)
    n, t = min(len(tr.text), chars), min(len(tr.ids), steps)
    panels = [(u.label, tr.text[:n], per_char(tr.spans, ins.activations(u), len(tr.text))[:n]) for u in units]
    where = f"layer {ins.layer}, Pearson r over {len(tr.ids)} tokens"
    width = min(100, max(len(line) for line in tr.text[:n].split("\n")) + 1)  # no wider than the longest line
    return [plot_coloured_text(out / "units.png", panels, width=width,
                               title=f"The units that best track a feature of the text ({where})"),
            plot_heatmap(out / "heatmap.png", [(u.label, ins.activations(u)[:t]) for u in units],
                         [tr.text[a:b] for a, b in tr.spans[:t]],
                         title=f"The same units over the first {t} tokens ({where})")]


def inspect_words(ckpt, request: InspectRequest) -> InspectReport:
    """A classifier: per text (one a line), how each token moved the predicted class; ``words.png``."""
    if request.layer is not None or request.gates:
        raise RnnkitError("a classifier's inspection shows which tokens moved it; layers and gates are for "
                          "language models")
    texts = [line for line in request.text.split("\n") if line.strip()]
    if not texts:
        raise RnnkitError("the text to inspect is empty; give one text to classify per line")
    if len(texts) > MAX_TEXTS:
        raise RnnkitError(f"the text holds {len(texts)} lines; a classifier inspects at most {MAX_TEXTS} "
                          "texts (one a line) at a time")
    labels, data = ckpt.meta["labels"], ckpt.run_config.data
    found = [attribute(ckpt.model, ckpt.tokenizer, labels, t, max_len=data.max_len, truncate=data.truncate,
                       unknown=request.unknown) for t in texts]
    lines = ["# the predicted class's probability before each text, then each token's change to it"]
    for a in found:
        moved = sorted(zip(a.tokens, a.change, strict=True), key=lambda x: -abs(x[1]))[:request.top]
        lines.append(f"{a.label} {a.probability:.3f} (from {a.before:.3f})  "
                     + "  ".join(f"{t.strip()!r} {d:+.3f}" for t, d in moved) + f"  | {a.text[:60]}")
    files = []
    if request.out is not None:
        from rnnkit.plots import plot_coloured_text

        panels = [(f"{a.label} {a.probability:.3f} (from {a.before:.3f} with nothing read)", a.text,
                   per_char(_spans(a.tokens), a.change, len(a.text))) for a in found]
        m = max(max(float(np.abs(a.change).max()) for a in found), 1e-6)  # one scale: rows compare, 0 is white
        files = [plot_coloured_text(request.out / "words.png", panels, cmap="RdBu", limits=(-m, m),
                                    colour_label="change in p", width=min(100, max(60, *(len(a.text) for a in found))),
                                    title="How each token moved the predicted class's probability\n"
                                          "(blue: towards it, red: away from it)")]
    data = {"texts": [a.to_dict() for a in found], "files": [str(f) for f in files]}
    return InspectReport(data=data, lines=lines, files=files)


def _spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Consecutive (start, end) spans of tokens laid end to end."""
    ends = np.cumsum([len(t) for t in tokens]).tolist()
    return [(e - len(t), e) for t, e in zip(tokens, ends, strict=True)]


def default_out(checkpoint: Path) -> Path:
    """``RUN/inspect`` for a checkpoint inside a run's ``checkpoints/`` folder, else ``CHECKPOINT/inspect``."""
    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint
    return run / "inspect"
