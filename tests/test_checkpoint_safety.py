"""Checkpoints under attack and under failure.

Loading treats a checkpoint folder as untrusted: pickles are refused before
anything reads them. Saving can fail (a full disk, a folder that is not
writable): then the error says so in one line and the run keeps its previous
complete checkpoint, with no temporary folders left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from payloads import Payload
from rnnkit import checkpoint
from rnnkit.checkpoint import load_checkpoint, read_index, save_to_run, write_checkpoint
from rnnkit.cli import main
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.models.language_model import LanguageModel

TEXT = "to be or not to be, that is the question.\n" * 40


def _parts(seed: int = 0):
    config = RunConfig()
    config.model.hidden, config.model.layers = 8, 1
    tok = CharTokenizer.fit(TEXT)
    torch.manual_seed(seed)
    return dict(model=LanguageModel(config=config.model, vocab_size=tok.vocab_size), tokenizer=tok,
                task="language_model", run_config=config, state={})


def _save(run: Path, step: int, names=("best", "last"), seed: int = 0) -> Path:
    return save_to_run(run, names=names, step=step, **_parts(seed))


def _listing(run: Path) -> dict[str, bytes]:
    """Every file of a run with its bytes: "intact" means exactly these."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _no_temporaries(run: Path) -> None:
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` refuse new entries, for real: chmod for users, the immutable flag for root.

    Root ignores permission bits, so under root chmod would test nothing; ``chattr +i``
    is enforced by the kernel even for root (on file systems that support it).
    """
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root, which ignores chmod, and chattr is not installed")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"running as root, which ignores chmod, and chattr +i is refused here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ------------------------------------------------------------------ untrusted checkpoints


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "weights.pkl", "model.pth", "last.ckpt"])
def test_a_pickle_file_in_the_folder_is_refused_unread(tmp_path, name):
    folder = _save(tmp_path / "run", 1)
    marker = tmp_path / "ran"
    (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(RnnkitError, match=f"{name}, a pickle-based format"):
        load_checkpoint(folder)
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_named_model_safetensors_is_refused_unread(tmp_path, writer):
    folder = _save(tmp_path / "run", 1)
    marker = tmp_path / "ran"
    weights = folder / "model.safetensors"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(Payload(marker), protocol=pickle.HIGHEST_PROTOCOL))
    else:
        torch.save({"w": Payload(marker)}, weights)
    with pytest.raises(RnnkitError, match="not safetensors; rnnkit never unpickles") as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # The payload is live: had anything unpickled it, the marker would exist.
    with open(weights, "rb") as f:
        torch.load(f, weights_only=False) if writer == "torch.save" else pickle.load(f)
    assert marker.exists()


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    # A header of 0x280 bytes begins the file with 80 02, the bytes that open a protocol-2 pickle.
    folder = _save(tmp_path / "run", 1)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    padded = next(n for n in (0x280, 0x10280) if n >= length)
    header = data[8 : 8 + length] + b" " * (padded - length)  # the format allows trailing spaces
    weights.write_bytes(struct.pack("<Q", padded) + header + data[8 + length :])
    assert weights.read_bytes()[:2] == b"\x80\x02"
    assert load_checkpoint(folder).path == folder


@pytest.mark.parametrize("keep", [0, 7, 8, 40, -1])
def test_truncated_weights_are_a_clear_error(tmp_path, keep):
    folder = _save(tmp_path / "run", 1)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:keep])
    with pytest.raises(RnnkitError, match="truncated"):
        load_checkpoint(folder)


def test_a_newer_format_version_is_refused(tmp_path):
    folder = _save(tmp_path / "run", 1)
    config = json.loads((folder / "config.json").read_text())
    config["format_version"] = checkpoint.FORMAT_VERSION + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RnnkitError, match="newer than this rnnkit reads"):
        load_checkpoint(folder)


@pytest.mark.parametrize(("key", "value"), [("hidden", 9), ("layers", 2), ("cell", "gru")])
def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, key, value):
    folder = _save(tmp_path / "run", 1)
    config = json.loads((folder / "config.json").read_text())
    config["run"]["model"][key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(RnnkitError, match="do not match its config.json") as info:
        load_checkpoint(folder)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ failures while saving


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"),
                                           (errno.EROFS, "the file system is read-only")])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, said):
    run = tmp_path / "run"
    first = _save(run, 10)
    before = _listing(run)
    monkeypatch.setattr(checkpoint, "save_model", _fail_with(code))
    with pytest.raises(RnnkitError, match="could not write checkpoint .*step-000000020") as info:
        _save(run, 20, seed=1)
    assert said in str(info.value) and "\n" not in str(info.value)
    assert _listing(run) == before
    _no_temporaries(run)
    monkeypatch.undo()
    assert load_checkpoint(run).path == first


def test_the_disk_filling_up_mid_file_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 10)
    before = _listing(run)
    real = checkpoint.save_model

    def half_then_full(model, filename, *args, **kwargs):
        real(model, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(checkpoint, "save_model", half_then_full)
    with pytest.raises(RnnkitError, match="the disk is full"):
        _save(run, 20, seed=1)
    assert _listing(run) == before
    _no_temporaries(run)


def test_a_failed_rename_or_index_update_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 10)
    before = _listing(run)
    real = os.replace
    for victim in ("step-000000020", checkpoint.INDEX):
        def replace(src, dst, *, victim=victim):
            if Path(dst).name == victim:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(src, dst)

        monkeypatch.setattr(checkpoint.os, "replace", replace)
        with pytest.raises(RnnkitError, match="the disk is full"):
            _save(run, 20, seed=1)
        monkeypatch.undo()
        assert _listing(run) == before, victim
        _no_temporaries(run)


def test_resaving_the_same_step_keeps_the_old_copy_when_the_write_fails(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _save(run, 10, names=("best",))
    before = _listing(run)
    monkeypatch.setattr(checkpoint, "save_model", _fail_with(errno.ENOSPC))
    with pytest.raises(RnnkitError, match="the disk is full"):
        _save(run, 10, names=("last",), seed=1)
    assert _listing(run) == before
    _no_temporaries(run)
    monkeypatch.undo()
    _save(run, 10, names=("last",), seed=1)  # and when it works, the new copy replaces the old
    assert read_index(run) == {"best": "step-000000010", "last": "step-000000010"}
    _no_temporaries(run)
    assert _listing(run)["checkpoints/step-000000010/model.safetensors"] != before[
        "checkpoints/step-000000010/model.safetensors"]


def test_a_read_only_run_directory(tmp_path):
    run = tmp_path / "run"
    _save(run, 10)
    before = _listing(run)
    with read_only(run / "checkpoints"):
        with pytest.raises(RnnkitError, match="could not write checkpoint") as info:
            _save(run, 20, seed=1)
        with pytest.raises(RnnkitError, match="could not write checkpoint"):
            write_checkpoint(run / "checkpoints" / "elsewhere", **_parts())
    assert "permission denied" in str(info.value) or "not permitted" in str(info.value)
    assert _listing(run) == before
    _no_temporaries(run)


# ------------------------------------------------------------------ the CLI


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


FAST = ["--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch-size", "4", "--threads", "1",
        "--sample-length", "5", "--quiet"]


def test_train_into_a_folder_it_cannot_write(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        code, err = _cli(["train", "--text", text, "--out", locked / "run", "--max-steps", "2", *FAST], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rnnkit: error: cannot write the run directory --out {locked / 'run'}: "), err
    assert list(locked.iterdir()) == []


def test_train_when_the_disk_fills_up_mid_run(tmp_path, monkeypatch, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    real, saves = checkpoint.save_model, []

    def second_save_fails(model, filename, *args, **kwargs):
        saves.append(filename)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        real(model, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", second_save_fails)
    run = tmp_path / "run"
    code, err = _cli(["train", "--text", text, "--out", run, "--max-steps", "6", "--eval-every", "3", *FAST], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "the disk is full" in err and "earlier checkpoints are untouched" in err
    monkeypatch.undo()
    _no_temporaries(run)
    assert load_checkpoint(run).meta["state"]["step"] == 3  # the last complete checkpoint
