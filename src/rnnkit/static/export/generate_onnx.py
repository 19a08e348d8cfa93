"""Generate text from an rnnkit ONNX export with numpy and onnxruntime only (no torch, no rnnkit).

    python generate_onnx.py --prime "ROMEO:" --length 200 --temperature 0

It does what ``rnnkit generate`` does: read the prime once with the prefill
graph (from a zero state), then one step-graph call per new token, carrying
the state; temperature 0 is greedy (argmax) and prints the same text as
``rnnkit generate --temperature 0``. Sampling (temperature > 0) uses numpy's
generator, so its text differs from rnnkit's for the same seed. BPE exports
also need the ``tokenizers`` package.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent


class Tokens:
    """Text <-> ids as the exported tokenizer.json describes (char, word or bpe)."""

    def __init__(self, data: dict) -> None:
        self.kind = data["kind"]
        self.lowercase = data["lowercase"]
        self.tokens = data["id_to_token"]
        self.ids = data["token_to_id"]
        self.rules = data.get("word_rules") or {}
        if self.kind == "bpe":
            from tokenizers import Tokenizer  # the one extra package a BPE export needs

            self.hf = Tokenizer.from_str(json.dumps(data["hf_tokenizer"]))

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        if self.kind == "char":
            missing = sorted({c for c in text if c not in self.ids})
            if missing:
                raise SystemExit(f"error: character(s) not in the model's vocabulary: {missing[:8]}")
            return [self.ids[c] for c in text]
        if self.kind == "bpe":
            return self.hf.encode(text, add_special_tokens=False).ids
        pattern = re.compile(self.rules["split_pattern"])
        pieces: list[str] = []
        lines = text.split("\n") if self.rules["eos"] else [text]
        for n, line in enumerate(lines):
            pieces += pattern.findall(line)
            if n < len(lines) - 1:
                pieces.append("<eos>")
        return [self.ids.get(p, self.rules["unk_id"]) for p in pieces]  # unknown words -> <unk>, as rnnkit does

    def decode(self, ids: list[int]) -> str:
        if self.kind == "char":
            return "".join(self.tokens[i] for i in ids)
        if self.kind == "bpe":
            return self.hf.decode(ids, skip_special_tokens=False)
        return self._decode_words(ids)

    def _decode_words(self, ids: list[int]) -> str:
        # rnnkit's WordTokenizer.decode, rewritten here because this file must not import rnnkit;
        # tests/test_export.py checks the two print the same text.
        before, after, joiners = (set(self.rules[k]) for k in ("no_space_before", "no_space_after", "joiners"))
        out: list[str] = []
        prev = None
        open_quote = False
        for i in ids:
            word = self.tokens[i]
            if word == "<eos>" and self.rules["eos"]:
                out.append("\n")
                prev = "\n"
                continue
            space = prev is not None and prev != "\n"
            if word in before or prev in after or word in joiners or prev in joiners:
                space = False
            if word == '"':  # a straight double quote opens or closes: no space inside the quotes
                if open_quote:
                    space = False
                open_quote = not open_quote
            elif prev == '"' and open_quote:
                space = False
            out.append((" " if space else "") + word)
            prev = word
        return "".join(out)


class Model:
    """The prefill and step graphs with the state carried between calls."""

    def __init__(self, folder: Path, meta: dict) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.prefill = ort.InferenceSession(str(folder / meta["graphs"]["prefill"]), options)
        self.step = ort.InferenceSession(str(folder / meta["graphs"]["step"]), options)
        self.state_shape = (meta["state"]["layers"], 1, meta["state"]["hidden"])
        self.count = meta["state"]["count"]

    def zeros(self) -> list[np.ndarray]:
        return [np.zeros(self.state_shape, dtype=np.float32) for _ in range(self.count)]

    def run(self, session: ort.InferenceSession, ids: list[int], state: list[np.ndarray]):
        """ids (1, T) from ``state`` -> the last logits (V,) and the new state."""
        feed = {"ids": np.asarray([ids], dtype=np.int64), **{f"state_{i}": s for i, s in enumerate(state)}}
        logits, *state = session.run(None, feed)  # (1, T, V), n x (L, 1, H)
        return logits[0, -1], state


def pick(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate(folder: Path, prime: str | None, length: int, temperature: float, seed: int | None) -> str:
    meta = json.loads((folder / "export.json").read_text(encoding="utf-8"))
    tokens = Tokens(json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")))
    model = Model(folder, meta)
    context = tokens.encode(meta["default_prime"] if prime is None else prime)
    if not context:
        raise SystemExit("error: the prime is empty after tokenization; give text made of known tokens")
    window, rng = meta["window"], np.random.default_rng(seed)
    # A many-to-one model (window N > 0) re-reads its last N tokens from a zero state for every prediction.
    logits, state = model.run(model.prefill, context[-window:] if window else context, model.zeros())
    new: list[int] = []
    for _ in range(length):
        new.append(pick(logits, temperature, rng))
        if window:
            logits, _ = model.run(model.prefill, (context + new)[-window:], model.zeros())
        else:
            logits, state = model.run(model.step, [new[-1]], state)
    return tokens.decode(context + new)


def main() -> None:
    parser = argparse.ArgumentParser(description="Generate text from this rnnkit ONNX export.")
    parser.add_argument("--prime", default=None, help="text to start from (default: the model's own)")
    parser.add_argument("--length", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    parser.add_argument("--seed", type=int, default=None, help="numpy seed for sampling")
    parser.add_argument("--folder", type=Path, default=HERE, help="the export folder (default: this file's)")
    args = parser.parse_args()
    sys.stdout.write(generate(args.folder, args.prime, args.length, args.temperature, args.seed) + "\n")


if __name__ == "__main__":
    main()
