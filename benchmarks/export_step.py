"""The ONNX step graph (onnxruntime, CPU) beside rnnkit's own bound step, and what int8 quantisation changes.

* speed: a 2 x 512 LSTM on a 65-character vocabulary (random weights: the
  work per token does not depend on them), batch 1, greedy: each new token is
  one call of rnnkit's ``model.stepper()`` / of ``step.onnx`` (float32, then
  int8 dynamic quantisation) with the carried state. chars/s, median of
  ``--repeats`` alternating runs.
* size and held-out loss: a small LSTM trained here for ``--train-steps`` on
  the head of ``--text`` (default: the shared tiny Shakespeare, else the
  built-in fable), exported float32 and int8; the validation tail's mean
  cross-entropy through each prefill graph, next to PyTorch's.

Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python benchmarks/export_step.py            # full run (~1 min on 2 cores)
    .venv/bin/python benchmarks/export_step.py --quick    # smoke run (a few seconds)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as common
import numpy as np
import onnxruntime as ort
import torch

from rnnkit.checkpoint import load_checkpoint
from rnnkit.cli import main as rnnkit_main
from rnnkit.config import ModelConfig
from rnnkit.export import export_checkpoint, export_step, quantize_int8
from rnnkit.models.language_model import LanguageModel

SHARED = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "tiny-shakespeare.txt"
BUILTIN = Path(__file__).resolve().parents[1] / "src" / "rnnkit" / "data" / "builtin" / "belling-the-cat.txt"


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options)


def rnnkit_chars_per_s(model: LanguageModel, tokens: int) -> float:
    step = model.stepper()
    ids, state = torch.zeros(1, dtype=torch.long), None
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(tokens):
            logits, state = step(ids, state)  # (1, V)
            ids = logits.argmax(-1)
    return tokens / (time.perf_counter() - start)


def onnx_chars_per_s(sess: ort.InferenceSession, layers: int, hidden: int, tokens: int) -> float:
    state = [np.zeros((layers, 1, hidden), np.float32) for _ in range(2)]
    ids = np.zeros((1, 1), np.int64)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, *state = sess.run(None, {"ids": ids, "state_0": state[0], "state_1": state[1]})  # (1, 1, V)
        ids = logits.argmax(-1).astype(np.int64)
    return tokens / (time.perf_counter() - start)


def speed(args, folder: Path) -> dict:
    config = ModelConfig(cell="lstm", hidden=512, layers=2)
    model = LanguageModel(config=config, vocab_size=65).eval()
    export_step(model, folder / "step.onnx")
    float_size = quantize_int8(folder / "step.onnx")  # step.onnx is now int8
    export_step(model, folder / "step-f32.onnx")
    f32, i8 = session(folder / "step-f32.onnx", args.threads), session(folder / "step.onnx", args.threads)
    runs = {"rnnkit_step": lambda: rnnkit_chars_per_s(model, args.tokens),
            "onnx_step": lambda: onnx_chars_per_s(f32, 2, 512, args.tokens),
            "onnx_step_int8": lambda: onnx_chars_per_s(i8, 2, 512, args.tokens)}
    for run in runs.values():
        run()  # warm-up
    figures: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order: the host's speed drifts
            figures[name].append(runs[name]())
            common.log(f"  {name}: {figures[name][-1]:,.0f} chars/s")
    out = {f"{name}_chars_per_s": round(common.median(v)) for name, v in figures.items()}
    out["onnx_vs_rnnkit"] = round(out["onnx_step_chars_per_s"] / out["rnnkit_step_chars_per_s"], 2)
    out["speed_model"] = "lstm 2x512, V=65, batch 1"
    out["step_onnx_float32_mb"] = round(float_size / 1e6, 2)
    out["step_onnx_int8_mb"] = round((folder / "step.onnx").stat().st_size / 1e6, 2)
    return out


def held_out_loss(sess: ort.InferenceSession, ids: np.ndarray, layers: int, hidden: int) -> float:
    state = {f"state_{i}": np.zeros((layers, 1, hidden), np.float32) for i in range(2)}
    logits = sess.run(None, {"ids": ids[None, :-1], **state})[0][0].astype(np.float64)  # (T, V)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def quality(args, folder: Path) -> dict:
    text = Path(args.text) if args.text else (SHARED if SHARED.is_file() else BUILTIN)
    head = folder / "head.txt"
    head.write_text(text.read_text(encoding="utf-8")[: args.chars], encoding="utf-8")
    common.log(f"training a {args.layers}x{args.hidden} LSTM for {args.train_steps} steps on {text.name} ...")
    assert rnnkit_main(["train", "--text", str(head), "--out", str(folder / "run"), "--hidden", str(args.hidden),
                        "--layers", str(args.layers), "--seq-len", "64", "--batch-size", "32", "--max-steps",
                        str(args.train_steps), "--eval-every", str(args.train_steps), "--threads",
                        str(args.threads), "--quiet"]) == 0
    ckpt = load_checkpoint(folder / "run")
    tail = ckpt.tokenizer.encode(head.read_text(encoding="utf-8")[-int(args.chars * ckpt.run_config.data.val_fraction):])
    ids = np.asarray(tail, dtype=np.int64)
    with torch.inference_mode():
        logits, _ = ckpt.model(torch.from_numpy(ids[None, :-1]))
        torch_loss = float(torch.nn.functional.cross_entropy(logits[0], torch.from_numpy(ids[1:])))
    out = {"quality_model": f"lstm {args.layers}x{args.hidden} trained {args.train_steps} steps on {text.name}",
           "held_out_tokens": int(len(ids) - 1), "pytorch_loss": round(torch_loss, 5)}
    for form, quantize in (("float32", None), ("int8", "int8")):
        report = export_checkpoint(ckpt, folder / form, quantize=quantize)
        out[f"{form}_loss"] = round(held_out_loss(session(folder / form / "prefill.onnx", args.threads), ids,
                                                  args.layers, args.hidden), 5)
        out[f"{form}_step_mb"] = round(report.sizes["step.onnx"] / 1e6, 3)
    out["int8_loss_change"] = round(out["int8_loss"] - out["float32_loss"], 5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=1000, help="tokens per speed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", default=None, help="text for the quality part")
    parser.add_argument("--chars", type=int, default=200_000, help="train on the text's first N characters")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few tokens, a tiny model")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats, args.chars, args.hidden, args.train_steps = 200, 1, 20_000, 32, 20
    common.setup(args.threads, 0)
    with tempfile.TemporaryDirectory() as tmp:
        result = {**speed(args, Path(tmp)), **quality(args, Path(tmp))}
    common.emit({**result, "load_average": common.load_average(), "environment": common.environment(args.threads)})


if __name__ == "__main__":
    main()
