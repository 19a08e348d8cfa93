"""Every kind of bad input the CLI can meet, in one table.

Each case runs ``rnnkit.cli.main`` and must end the same way: exit status 2,
exactly one line on stderr that starts ``rnnkit: error:`` and names the
problem, no traceback, and nothing half-written (a training run's --out never
appears; the files the command read are unchanged). A few cases also go
through the installed ``rnnkit`` command in a subprocess. The last tests cover
the one big input that must *work*: a 100 MB file without a line end.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from payloads import Payload
from rnnkit.cli import main

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 30
TINY = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch-size", "4", "--threads", "1",
        "--eval-every", "5", "--sample-length", "5"]
IS_ROOT = os.geteuid() == 0


def _quiet_main(argv: list[str]) -> None:
    assert main([str(a) for a in argv]) == 0


def _copy_checkpoint(run: Path, dest: Path) -> Path:
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    shutil.copytree(run / "checkpoints" / index["best"], dest)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs of every kind, good and bad, and two tiny trained runs, shared by all cases."""
    w = tmp_path_factory.mktemp("catalogue")
    files = {
        "good": ("good.txt", TEXT.encode()),
        "empty": ("empty.txt", b""),
        "binary": ("model.bin.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
        "latin": ("latin.txt", ("caf\xe9 au lait " * 50).encode("latin-1")),
        "unreadable": ("unreadable.txt", TEXT.encode()),
        "bad_toml": ("bad.toml", b"[model\nhidden = 3\n"),
        "unknown_toml": ("unknown.toml", b"[model]\nlayerz = 2\n"),
        "wrong_type_toml": ("wrong.toml", b'[model]\nhidden = "big"\n'),
        "reviews": ("reviews.tsv", ("label\ttext\n" + "pos\ta wonderful film\nneg\ta dull film\n" * 40).encode()),
        "extra_fields": ("extra.tsv", b"label\ttext\npos\ta fine\tfilm\nneg\ta dull film\n"),
        "no_label": ("nolabel.tsv", b"sentiment\ttext\npos\ta fine film\nneg\ta dull film\n"),
        "one_column": ("onecol.tsv", b"label text\npos a fine film\nneg a dull film\n"),
        "header_only": ("header-only.tsv", b"label\ttext\n"),
    }
    paths = {}
    for key, (name, data) in files.items():
        paths[key] = w / name
        paths[key].write_bytes(data)
    os.chmod(paths["unreadable"], 0)
    (w / "pictures").mkdir()
    (w / "pictures" / "cat.png").write_bytes(b"\x89PNG\r\n")
    paths["no_txt_dir"] = w / "pictures"
    paths["a_file"] = paths["good"]

    paths["lm"] = w / "lm-run"
    _quiet_main(["train", "--text", paths["good"], "--out", paths["lm"], "--max-steps", "3", "--quiet", *TINY])
    paths["clf"] = w / "clf-run"
    _quiet_main(["train", "--task", "classify", "--data", paths["reviews"], "--out", paths["clf"], "--epochs", "1",
                 "--hidden", "8", "--layers", "1", "--batch-size", "8", "--threads", "1", "--quiet"])

    paths["newer"] = _copy_checkpoint(paths["lm"], w / "ckpt-newer")
    config = json.loads((paths["newer"] / "config.json").read_text())
    config["format_version"] += 1
    (paths["newer"] / "config.json").write_text(json.dumps(config))

    paths["truncated"] = _copy_checkpoint(paths["lm"], w / "ckpt-truncated")
    weights = paths["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    paths["shape"] = _copy_checkpoint(paths["lm"], w / "ckpt-shape")
    config = json.loads((paths["shape"] / "config.json").read_text())
    config["run"]["model"]["hidden"] = 12  # the weights were trained with 8 units
    (paths["shape"] / "config.json").write_text(json.dumps(config))

    # Pickles whose loading would create w/pwned: by name, disguised as safetensors, and as torch.save's zip.
    paths["marker"] = w / "pwned"
    paths["pickle_beside"] = _copy_checkpoint(paths["lm"], w / "ckpt-pickle-beside")
    (paths["pickle_beside"] / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(paths["marker"])))
    paths["pickle_inside"] = _copy_checkpoint(paths["lm"], w / "ckpt-pickle-inside")
    (paths["pickle_inside"] / "model.safetensors").write_bytes(pickle.dumps(Payload(paths["marker"]), protocol=4))
    paths["zip_inside"] = _copy_checkpoint(paths["lm"], w / "ckpt-zip-inside")
    torch.save({"weights": Payload(paths["marker"])}, paths["zip_inside"] / "model.safetensors")
    paths["missing"] = w / "no-such-run"
    return paths


@pytest.fixture
def unreadable_for_root(world, monkeypatch):
    """chmod 000 does not stop root from reading: there, make reading that one file fail as it would."""
    if not IS_ROOT:
        return
    real = Path.open

    def open_(self, *args, **kwargs):
        if self == world["unreadable"]:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


TRAIN = ["train", "--out", "{out}", "--max-steps", "1", *TINY]
CLF = ["train", "--task", "classify", "--out", "{out}", "--epochs", "1", "--hidden", "8", "--layers", "1"]
GEN = ["generate", "--checkpoint", "{lm}", "--length", "5"]

# (argv with {placeholders} from the world fixture, a piece the one error line must contain)
CASES = [
    pytest.param([*TRAIN, "--text", "{empty}"], "is empty", id="empty-file"),
    pytest.param([*TRAIN, "--text", "{binary}"], "binary file (NUL byte at byte offset 8)", id="binary-file"),
    pytest.param([*TRAIN, "--text", "{latin}"], "byte 0xe9 at byte offset 3", id="invalid-utf8"),
    pytest.param([*TRAIN, "--text", "{no_txt_dir}"], "no .txt files", id="folder-without-text"),
    pytest.param([*TRAIN, "--text", "{unreadable}"], "permission denied", id="unreadable-file"),
    pytest.param([*TRAIN, "--text", "{missing}"], "no such file", id="missing-text"),
    pytest.param([*TRAIN, "--text", "{good}", "--out", "{a_file}"], "is a file", id="out-is-a-file"),
    pytest.param([*TRAIN, "--text", "{good}", "--config", "{bad_toml}"], "not valid TOML", id="bad-toml"),
    pytest.param([*TRAIN, "--text", "{good}", "--config", "{unknown_toml}"], "'model.layerz'", id="unknown-toml-key"),
    pytest.param([*TRAIN, "--text", "{good}", "--set", "train.speed=3"], "'train.speed'", id="unknown-set-key"),
    pytest.param([*TRAIN, "--text", "{good}", "--set", "model=3"], "unknown config key 'model'", id="set-a-section"),
    pytest.param([*TRAIN, "--text", "{good}", "--set", "hidden"], "KEY=VALUE", id="set-without-value"),
    pytest.param([*TRAIN, "--text", "{good}", "--set", "line\nbreak=1"], "unknown config key 'line\\nbreak'",
                 id="key-with-a-line-break"),
    pytest.param([*TRAIN, "--text", "{good}", "--config", "{wrong_type_toml}"], "'model.hidden' must be an integer",
                 id="wrong-type-toml"),
    pytest.param([*TRAIN, "--text", "{good}", "--softmax", "adaptive"], "--softmax adaptive needs --level word",
                 id="adaptive-softmax-at-char-level"),
    pytest.param([*TRAIN, "--text", "{good}", "--level", "word", "--softmax", "adaptive", "--tie-weights"],
                 "cannot --tie-weights", id="adaptive-softmax-tied"),
    pytest.param([*TRAIN, "--text", "{good}", "--level", "word", "--softmax", "adaptive", "--cutoffs", "3", "999"],
                 "--cutoffs must be increasing ids between 1 and", id="adaptive-cutoffs-past-the-vocabulary"),
    pytest.param([*TRAIN, "--text", "{good}", "--set", "train.lr=fast"], "'train.lr' must be a number",
                 id="wrong-type-set"),
    pytest.param([*TRAIN, "--text", "{good}", "--hidden", "many"], "argument --hidden: invalid int value",
                 id="wrong-type-flag"),
    pytest.param([*TRAIN, "--text", "{good}", "--model", "transformer"], "invalid choice: 'transformer'",
                 id="unknown-choice"),
    pytest.param([*TRAIN, "--text", "{good}", "--hidden", "0"], "'model.hidden' must be a positive", id="hidden-0"),
    pytest.param([*TRAIN, "--text", "{good}", "--hidden", "-4"], "'model.hidden' must be a positive",
                 id="hidden-negative"),
    pytest.param([*TRAIN, "--text", "{good}", "--layers", "0"], "'model.layers' must be a positive", id="layers-0"),
    pytest.param([*TRAIN, "--text", "{good}", "--seq-len", "0"], "'data.seq_len' must be a positive", id="seq-len-0"),
    pytest.param([*TRAIN, "--text", "{good}", "--batch-size", "-1"], "'data.batch_size' must be a positive",
                 id="batch-size-negative"),
    pytest.param([*TRAIN, "--text", "{good}", "--dropout", "1.5"], "'model.dropout' must be in [0, 1)",
                 id="dropout-too-big"),
    pytest.param([*TRAIN, "--text", "{good}", "--seq-len", "5000"], "fewer than one window", id="text-too-short"),
    pytest.param([*CLF, "--data", "{extra_fields}"], "line 2 has 3 tab-separated fields but the header names 2",
                 id="tsv-extra-field"),
    pytest.param([*CLF, "--data", "{no_label}"], "has no column 'label'", id="tsv-missing-label-column"),
    pytest.param([*CLF, "--data", "{one_column}"], "has no column 'label'", id="tsv-not-tab-separated"),
    pytest.param([*CLF, "--data", "{header_only}"], "has both a label and a text", id="tsv-header-only"),
    pytest.param([*GEN, "--length", "-1"], "--length must be >= 0", id="length-negative"),
    pytest.param([*GEN, "--num-samples", "0"], "--num-samples must be >= 1", id="num-samples-0"),
    pytest.param([*GEN, "--temperature", "-0.5"], "temperature must be >= 0", id="temperature-negative"),
    pytest.param([*GEN, "--top-p", "0"], "top-p must be in (0, 1]", id="top-p-0"),
    pytest.param([*GEN, "--top-p", "1.5"], "top-p must be in (0, 1]", id="top-p-above-1"),
    pytest.param([*GEN, "--top-k", "-1"], "top-k must be >= 0", id="top-k-negative"),
    pytest.param([*GEN, "--beam", "0"], "--beam must be >= 1", id="beam-0"),
    pytest.param([*GEN, "--beam", "2", "--num-samples", "3"], "more hypotheses than --beam 2",
                 id="beam-fewer-than-num-samples"),
    pytest.param([*GEN, "--beam", "2", "--temperature", "1"], "samples nothing", id="beam-with-temperature"),
    pytest.param(["generate", "--checkpoint", "{clf}", "--beam", "2"], "holds a classifier checkpoint",
                 id="beam-on-classifier"),
    pytest.param([*GEN, "--prime", "ROMEO 🙂"], "not in the model's vocabulary: '🙂'", id="prime-unseen-chars"),
    pytest.param(["generate", "--prime", "x"], "required: --checkpoint", id="checkpoint-flag-missing"),
    pytest.param(["generate", "--checkpoint", "{missing}"], "checkpoint not found", id="missing-checkpoint"),
    pytest.param(["generate", "--checkpoint", "{good}"], "must be a folder", id="checkpoint-is-a-file"),
    pytest.param(["generate", "--checkpoint", "{no_txt_dir}"], "no checkpoint in", id="folder-without-checkpoint"),
    pytest.param(["generate", "--checkpoint", "{newer}"], "newer than this rnnkit reads", id="newer-format"),
    pytest.param(["generate", "--checkpoint", "{truncated}"], "is truncated", id="truncated-safetensors"),
    pytest.param(["generate", "--checkpoint", "{shape}"], "do not match its config.json", id="shape-mismatch"),
    pytest.param(["generate", "--checkpoint", "{pickle_beside}"], "pytorch_model.bin, a pickle-based format",
                 id="pickle-beside-weights"),
    pytest.param(["generate", "--checkpoint", "{pickle_inside}"], "is a Python pickle, not safetensors",
                 id="pickle-as-safetensors"),
    pytest.param(["generate", "--checkpoint", "{zip_inside}"], "is a zip archive", id="torch-save-as-safetensors"),
    pytest.param(["vocab", "--checkpoint", "{pickle_beside}"], "pickle-based format", id="vocab-refuses-pickle"),
    pytest.param(["generate", "--checkpoint", "{clf}"], "holds a classifier checkpoint, but `rnnkit generate`",
                 id="generate-on-classifier"),
    pytest.param(["classify", "--checkpoint", "{lm}", "good"], "holds a language model checkpoint",
                 id="classify-on-language-model"),
    pytest.param(["eval", "--checkpoint", "{lm}", "--text", "{empty}"], "is empty", id="eval-empty-text"),
    pytest.param(["eval", "--checkpoint", "{lm}", "--text", "{good}", "--seq-len", "-3"], "--seq-len must be",
                 id="eval-seq-len-negative"),
    pytest.param(["eval", "--checkpoint", "{lm}", "--text", "{latin}", "--encoding", "latin-1"],
                 "not in the model's vocabulary", id="eval-unseen-chars"),
]


def _fill(argv: list[str], world: dict[str, Path], out: Path) -> list[str]:
    return [arg.format(out=out, **world) for arg in argv]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time: what "unchanged" means."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _one_error_line(err: str, match: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rnnkit: error: "), err
    assert match in lines[0], lines[0]


@pytest.mark.usefixtures("unreadable_for_root")
@pytest.mark.parametrize(("argv", "match"), CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, match, world, tmp_path, capsys):
    out = tmp_path / "run"
    before = _snapshot(world["good"].parent)
    code = main(_fill(argv, world, out))
    _, err = capsys.readouterr()
    assert code == 2, err
    _one_error_line(err, match)
    assert not out.exists(), "a run that never started must leave no --out folder"
    assert _snapshot(world["good"].parent) == before
    assert not world["marker"].exists(), "a pickle was executed"


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 20


def test_the_pickle_payload_is_live(tmp_path):
    """The refusals above mean something only if loading the payload would run code."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("case", ["invalid-utf8", "truncated-safetensors", "wrong-type-flag", "generate-on-classifier"])
def test_bad_input_through_the_installed_command(case, world, tmp_path):
    (argv, match), = [p.values for p in CASES if p.id == case]
    exe = str(Path(sys.executable).with_name("rnnkit"))
    env = {**os.environ, "RNNKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([exe, *_fill(argv, world, tmp_path / "run")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc.stderr, match)
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the big input that must work


BIG_BYTES = 100 * 1024 * 1024
MEASURE = """
import resource, sys
from rnnkit.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
sys.exit(code)
"""


@pytest.mark.slow
def test_a_100mb_file_without_line_ends_trains(tmp_path):
    """One 100 MB line is streamed through reading, encoding and training, in bounded memory."""
    big = tmp_path / "one-line.txt"
    piece = b"the quick brown fox jumps over the lazy dog; "
    with open(big, "wb") as f:
        for _ in range(BIG_BYTES // (len(piece) * 4096)):
            f.write(piece * 4096)
    size = big.stat().st_size
    assert size > 99 * 1024 * 1024
    env = {**os.environ, "RNNKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", MEASURE, "train", "--text", str(big), "--out", str(tmp_path / "run"),
                           "--max-steps", "1", "--eval-max-tokens", "1000", "--quiet", *TINY],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    peak_mb = int(proc.stdout.split()[-1]) / 1024
    # torch alone takes ~250 MB; the text is 100 MB as bytes, 100 MB as a str and 100 MB of uint8 ids.
    # An int64 copy of the whole text anywhere (800 MB) breaks the bound.
    assert peak_mb < 900, f"peak memory {peak_mb:.0f} MB for a {size / 2**20:.0f} MB text"
    assert (tmp_path / "run" / "checkpoints" / "index.json").is_file()
    train = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["sizes"]
    assert sum(train.values()) == size  # every character became one token


def test_bpe_pieces_of_a_text_without_line_ends_are_bounded_and_lossless():
    from rnnkit.data.tokenizers import _chunks

    text = ("word " * 100_000) + "x" * 50_000
    pieces = list(_chunks(text, size=1000))
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= 16 * 1000
    assert all(p.endswith(" ") for p in pieces[:-5])  # cut after a space where there is one


@pytest.mark.parametrize("command", ["generate", "eval", "classify"])
def test_negative_threads_is_a_one_line_error(command, tmp_path, capsys):
    extra = ["some text"] if command == "classify" else []
    code = main([command, *extra, "--checkpoint", str(tmp_path), "--threads", "-2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--threads must be 0" in err
