"""`rnnkit export --format onnx`: the graphs equal PyTorch, the numpy-only driver prints `rnnkit generate`'s text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from rnnkit.checkpoint import write_checkpoint  # noqa: E402
from rnnkit.cli import main  # noqa: E402
from rnnkit.config import ModelConfig, RunConfig  # noqa: E402
from rnnkit.data.tokenizers import CharTokenizer  # noqa: E402
from rnnkit.export import export_checkpoint, export_step, prefill_from_step, state_names  # noqa: E402
from rnnkit.models.classifier import Classifier  # noqa: E402
from rnnkit.models.language_model import LanguageModel  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 30
# For the word level: quotes, joiners and a contraction, each with its own rule in decoding.
WORDS = 'ROMEO: "But soft," said he - what light through yonder well-lit window breaks?\nJULIET: Ay me, can\'t.\n' * 30
# Enough training (150 steps at lr 0.01) for greedy text that is not one character repeated: a degenerate
# model would print the same text from a wrong driver too.
FAST = ["--hidden", "32", "--layers", "2", "--seq-len", "16", "--batch-size", "16", "--eval-every", "150",
        "--log-every", "50", "--threads", "1", "--sample-length", "10", "--lr", "0.01"]
V = 13


def _graphs(model, folder: Path) -> tuple[ort.InferenceSession, ort.InferenceSession, list[str]]:
    layout = export_step(model, folder / "step.onnx")
    prefill_from_step(folder / "step.onnx", folder / "prefill.onnx", state_count=layout["count"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = [ort.InferenceSession(str(folder / f), options) for f in ("step.onnx", "prefill.onnx")]
    return *sessions, state_names(layout["count"])[0]


def _run(session, ids: torch.Tensor, state, names):
    logits, *new = session.run(None, {"ids": ids.numpy(), **{n: s.numpy() for n, s in zip(names, state, strict=True)}})
    return logits, new


def _max_diff(onnx_out, torch_out) -> float:
    logits, state = onnx_out
    ref_logits, ref_state = torch_out
    return max(np.abs(logits - ref_logits.numpy()).max(), *(np.abs(a - b.numpy()).max() for a, b in
                                                             zip(state, ref_state, strict=True)))


@pytest.mark.parametrize("input_kind", ["embedding", "onehot"])
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mingru", "minlstm"])
def test_step_and_prefill_equal_pytorch_on_random_inputs_and_states(cell, layers, input_kind, tmp_path):
    torch.manual_seed(layers)
    config = ModelConfig(cell=cell, hidden=12, layers=layers, input=input_kind, embedding_dim=8, scan="sequential")
    model = LanguageModel(config=config, vocab_size=V).eval()
    step, prefill, names = _graphs(model, tmp_path)
    for batch, length in ((1, 1), (3, 7), (2, 1)):  # batch and length differ from the traced (2, 1)
        ids = torch.randint(0, V, (batch, length))
        state = tuple(torch.randn(layers, batch, 12) for _ in names)
        with torch.no_grad():
            expected = model(ids, state)
        assert _max_diff(_run(prefill, ids, state, names), expected) <= 1e-5
        if length == 1:
            assert _max_diff(_run(step, ids, state, names), expected) <= 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "mingru", "minlstm"])
def test_residual_blocks_export_through_the_same_forward(cell, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(cell=cell, hidden=12, layers=2, block="residual", mlp_ratio=2.0, scan="sequential")
    model = LanguageModel(config=config, vocab_size=V).eval()
    _, prefill, names = _graphs(model, tmp_path)
    ids = torch.randint(0, V, (3, 6))
    state = tuple(torch.randn(2, 3, 12) for _ in names)
    with torch.no_grad():
        expected = model(ids, state)
    assert _max_diff(_run(prefill, ids, state, names), expected) <= 1e-5


def _save(path: Path, model, tokenizer, config: RunConfig) -> Path:
    return write_checkpoint(path, model=model, tokenizer=tokenizer, task=config.task, run_config=config,
                            state={"step": 1, "default_prime": "ROMEO"})


def test_a_parallel_scan_model_exports_as_the_sequential_scan(tmp_path, capsys):
    import rnnkit

    assert rnnkit.export_checkpoint is export_checkpoint  # the library's name for what the CLI runs
    torch.manual_seed(0)
    config = RunConfig()
    config.model.cell, config.model.hidden, config.model.layers, config.model.scan = "mingru", 16, 2, "parallel"
    tok = CharTokenizer.fit(TEXT)
    model = LanguageModel(config=config.model, vocab_size=tok.vocab_size).eval()
    _save(tmp_path / "ckpt", model, tok, config)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    prefill = ort.InferenceSession(str(tmp_path / "out" / "prefill.onnx"))
    ids = torch.randint(0, tok.vocab_size, (2, 9))
    state = (torch.rand(2, 2, 16),)
    with torch.no_grad():
        expected = model(ids, state)  # the log-space scan
    assert _max_diff(_run(prefill, ids, state, ["state_0"]), expected) <= 1e-5
    meta = json.loads((tmp_path / "out" / "export.json").read_text(encoding="utf-8"))
    assert meta["state"]["count"] == 1 and meta["graphs"] == {"step": "step.onnx", "prefill": "prefill.onnx"}


def _train(folder: Path, *extra: str, words: str = TEXT) -> Path:
    text = folder / "play.txt"
    text.write_text(words, encoding="utf-8")
    assert main(["train", "--text", str(text), "--out", str(folder / "run"), "--max-steps", "150", "--quiet",
                 *FAST, *extra]) == 0
    return folder / "run"


# Runs the exported driver as a script, then checks it never imported torch (or rnnkit).
_NUMPY_ONLY = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    assert "torch" not in sys.modules and "rnnkit" not in sys.modules, "the driver imported torch or rnnkit"
"""


def _driver(folder: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", _NUMPY_ONLY, str(folder / "generate_onnx.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=folder.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "word", "char-window", "word-adaptive"])
def test_the_numpy_driver_prints_what_rnnkit_generate_prints(kind, tmp_path, capsys):
    level = {"char": [], "word": ["--level", "word", "--eos"], "char-window": ["--window", "8"],
             "word-adaptive": ["--level", "word", "--eos", "--softmax", "adaptive"]}[kind]
    run = _train(tmp_path, *level, words=WORDS if kind.startswith("word") else TEXT)
    prime = 'ROMEO: "But soft' if kind.startswith("word") else "JULIET"
    assert main(["generate", "--checkpoint", str(run), "--prime", prime, "--length", "200", "--temperature", "0"]) == 0
    expected = capsys.readouterr().out
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert "exported to" in printed.out and "prefill.onnx" in printed.out and "step graph" in printed.err
    assert _driver(tmp_path / "out", "--prime", prime, "--length", "200") == expected
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "generate_onnx.py" in readme and "state_0" in readme


@pytest.mark.slow
def test_int8_quantisation_shrinks_the_graphs_and_stays_close(tmp_path, capsys):
    run = _train(tmp_path, "--hidden", "128")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "f32"), "--quiet"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "i8"), "--quantize", "int8",
                 "--quiet"]) == 0
    assert "float32:" in capsys.readouterr().out
    for name in ("step.onnx", "prefill.onnx"):
        assert (tmp_path / "i8" / name).stat().st_size < 0.5 * (tmp_path / "f32" / name).stat().st_size
    ids = np.random.default_rng(0).integers(0, 20, (2, 30))
    state = {n: np.zeros((2, 2, 128), np.float32) for n in ("state_0", "state_1")}
    f32, i8 = (ort.InferenceSession(str(tmp_path / d / "prefill.onnx")).run(None, {"ids": ids, **state})[0]
               for d in ("f32", "i8"))
    assert 0 < np.abs(f32 - i8).max() < 0.5  # quantised, not the same numbers, but near them
    assert json.loads((tmp_path / "i8" / "export.json").read_text(encoding="utf-8"))["quantize"] == "int8"
    _driver(tmp_path / "i8", "--length", "20")


def _classifier(path: Path) -> Path:
    config = RunConfig(task="classify")
    config.model.hidden, config.model.layers = 8, 1
    tok = CharTokenizer.fit(TEXT)
    model = Classifier(config=config.model, vocab_size=tok.vocab_size, num_classes=2)
    return write_checkpoint(path, model=model, tokenizer=tok, task="classify", run_config=config,
                            state={"step": 1}, extra={"labels": ["neg", "pos"]})


def _bad(argv, capsys, match: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    config = RunConfig()
    config.model.hidden, config.model.layers = 8, 1
    tok = CharTokenizer.fit(TEXT)
    lm = _save(tmp_path / "lm", LanguageModel(config=config.model, vocab_size=tok.vocab_size), tok, config)
    classifier = _classifier(tmp_path / "cls")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine", encoding="utf-8")
    a_file = tmp_path / "a-file"
    a_file.write_text("x", encoding="utf-8")
    _bad(["export", "--checkpoint", classifier, "--out", tmp_path / "x"], capsys, "classifier")
    _bad(["export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x"], capsys, "nope")
    _bad(["export", "--checkpoint", lm, "--out", taken], capsys, "--overwrite")
    _bad(["export", "--checkpoint", lm, "--out", a_file], capsys, "is a file")
    _bad(["export", "--checkpoint", lm, "--out", a_file / "sub"], capsys, "could not write")
    _bad(["export", "--checkpoint", lm, "--out", tmp_path / "x", "--format", "tflite"], capsys, "invalid choice")
    _bad(["export", "--checkpoint", lm, "--out", tmp_path / "x", "--quantize", "int4"], capsys, "invalid choice")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cls", "lm", "taken"]  # no temporary folder left
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "onnxruntime", None)  # as if the `export` extra were not installed
        _bad(["export", "--checkpoint", lm, "--out", tmp_path / "x"], capsys, "pip install 'rnnkit[export]'")
    assert not (tmp_path / "x").exists()
    assert main(["export", "--checkpoint", str(lm), "--out", str(taken), "--overwrite", "--quiet"]) == 0
    assert "keep.txt" not in {p.name for p in taken.iterdir()} and (taken / "step.onnx").is_file()


def test_an_adaptive_softmax_model_exports_its_log_probabilities(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(hidden=16, layers=1, softmax="adaptive", cutoffs=[4, 9])
    model = LanguageModel(config=config, vocab_size=V).eval()
    step, prefill, names = _graphs(model, tmp_path)
    for batch, length in ((1, 1), (3, 7)):
        ids = torch.randint(0, V, (batch, length))
        state = tuple(torch.randn(1, batch, 16) for _ in names)
        with torch.no_grad():
            expected = model(ids, state)
        assert _max_diff(_run(prefill, ids, state, names), expected) <= 1e-5
        if length == 1:
            assert _max_diff(_run(step, ids, state, names), expected) <= 1e-5
    logits, _ = _run(prefill, ids, state, names)
    np.testing.assert_allclose(np.exp(logits).sum(-1), 1.0, rtol=1e-5)  # the graph's scores are log-probabilities
