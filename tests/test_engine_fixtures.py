"""Training computes what it computed before the one-engine refactor: bitwise, on CPU.

The reference fingerprints (sha256 of every weight tensor) and the old checkpoint were
recorded by ``tests/fixtures/engine/make.py`` on main at 8c01ec8; see its docstring.
Bitwise holds on one kind of CPU (MKL and oneDNN pick kernels by ISA), so the
fingerprints are kept per kind (``hosts/<vendor>-<isa>/``: an Intel CPU with AMX, an
AMD Zen 5 with AVX512-BF16); on a kind none were recorded for, the bitwise test skips
and says how to record them.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "engine"
sys.path.insert(0, str(FIXTURES))

import make  # noqa: E402

from rnnkit.checkpoint import load_checkpoint  # noqa: E402
from rnnkit.cli import main  # noqa: E402
from rnnkit.generation import generate_ids  # noqa: E402


@pytest.mark.parametrize("name", list(make.RUNS))
def test_training_gives_bitwise_the_recorded_weights(tmp_path, name):
    recorded = make.fingerprints_folder() / f"{name}.json"
    if not recorded.exists():
        pytest.skip(f"no fingerprints recorded for this kind of CPU ({make.cpu_signature()}): run make.py "
                    "--fingerprints-only on 8c01ec8's code to record them")
    inputs = make.write_inputs(tmp_path)
    out = tmp_path / "run"
    assert main(make.argv(name, inputs, out)) == 0
    expected = json.loads(recorded.read_text(encoding="utf-8"))
    got = make.fingerprint(out)
    assert got["step"] == expected["step"] and got["tokens"] == expected["tokens"]
    differ = [k for k in expected["tensors"] if got["tensors"].get(k) != expected["tensors"][k]]
    assert got["tensors"].keys() == expected["tensors"].keys()
    assert not differ, f"weights differ from the recorded run: {differ}"


def test_old_checkpoint_loads_and_generates_the_recorded_text():
    expected = json.loads((FIXTURES / "old-checkpoint.json").read_text(encoding="utf-8"))
    ckpt = load_checkpoint(FIXTURES / "old-checkpoint")
    assert ckpt.task == "language_model"
    prime = ckpt.tokenizer.encode(expected["prime"]).tolist()
    for temperature, text in expected["texts"].items():
        ids = generate_ids(ckpt.model, prime, length=expected["length"], temperature=float(temperature),
                           generator=torch.Generator().manual_seed(expected["seed"]))[0]
        assert ckpt.tokenizer.decode(prime + ids) == text
