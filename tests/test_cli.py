"""The CLI end to end on tiny data, and every bad input of the char-level workload."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rnnkit.cli import main

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 30
FAST = ["--hidden", "32", "--layers", "1", "--seq-len", "16", "--batch-size", "4", "--eval-every", "20",
        "--log-every", "10", "--threads", "1", "--sample-length", "10"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One small run shared by the generate/eval tests."""
    folder = tmp_path_factory.mktemp("cli")
    text = folder / "play.txt"
    text.write_text(TEXT, encoding="utf-8")
    code = main(["train", "--text", str(text), "--out", str(folder / "run"), "--max-steps", "40", "--quiet", *FAST])
    assert code == 0
    return folder


def test_train_writes_a_complete_run(trained):
    run_dir = trained / "run"
    assert (run_dir / "checkpoints" / "index.json").is_file()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.toml").is_file()
    assert (run_dir / "data" / "ids.npy").is_file() and (run_dir / "data" / "meta.json").is_file()


def test_run_config_toml_is_a_valid_recipe(trained, capsys, tmp_path):
    code, _, err = run(["train", "--config", trained / "run" / "config.toml", "--out", tmp_path / "again",
                        "--max-steps", "2", "--quiet"], capsys)
    assert code == 0, err


def test_generate_prints_only_text_and_is_repeatable(trained, capsys):
    argv = ["generate", "--checkpoint", trained / "run", "--prime", "ROMEO:", "--length", "50", "--seed", "3"]
    code, out, err = run(argv, capsys)
    assert code == 0 and out.startswith("ROMEO:") and len(out) == len("ROMEO:") + 50 + 1
    assert run(argv, capsys)[1] == out
    code, cont, _ = run([*argv, "--continuation-only"], capsys)
    assert cont == out[len("ROMEO:"):]


def test_generate_several_temperatures_and_samples(trained, capsys):
    code, out, _ = run(["generate", "--checkpoint", trained / "run", "--prime", "JULIET", "--length", "20",
                        "--temperature", "0.2", "0.5", "1.0", "1.2", "--seed", "1"], capsys)
    headers = [line for line in out.splitlines() if line.startswith("----- temperature")]
    assert code == 0 and len(headers) == 4
    code, out, _ = run(["generate", "--checkpoint", trained / "run", "--length", "20", "--num-samples", "3",
                        "--temperature", "0", "--seed", "1"], capsys)
    samples = re.split(r"----- temperature 0, sample \d -----\n", out)[1:]
    assert code == 0 and len(samples) == 3 and len(set(samples)) == 1  # greedy: all the same


def test_eval_json(trained, capsys):
    code, out, _ = run(["eval", "--checkpoint", trained / "run", "--text", trained / "play.txt", "--json"], capsys)
    metrics = json.loads(out)
    assert code == 0 and set(metrics) >= {"loss", "perplexity", "bits_per_char", "tokens"}
    assert metrics["tokens"] > 1000 and metrics["perplexity"] > 1


def test_corpora_list_and_builtin_fetch(capsys):
    code, out, _ = run(["corpora", "list"], capsys)
    assert code == 0 and all(name in out for name in ("shakespeare", "nietzsche", "tiny-shakespeare"))
    code, out, _ = run(["corpora", "fetch", "belling-the-cat"], capsys)
    assert code == 0 and Path(out.strip()).read_text(encoding="utf-8").startswith("long ago")


def test_entry_point_and_module():
    exe = Path(sys.executable).with_name("rnnkit")
    for cmd in ([str(exe), "--help"], [sys.executable, "-m", "rnnkit", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "generate" in proc.stdout


# ------------------------------------------------------------------ bad input


def bad(argv, capsys, match):
    code, out, err = run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnkit: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


def test_train_bad_texts(tmp_path, capsys):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_txt = tmp_path / "folder"
    no_txt.mkdir()
    (no_txt / "image.png").write_bytes(b"\x89PNG")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("caf\xe9 " * 400).encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    common = ["--out", out, *FAST, "--max-steps", "2"]
    bad(["train", "--text", tmp_path / "missing.txt", *common], capsys, "no such file")
    bad(["train", "--text", empty, *common], capsys, "empty")
    bad(["train", "--text", no_txt, *common], capsys, ".txt")
    bad(["train", "--text", latin, *common], capsys, "offset 3")
    bad(["train", "--text", short, *common], capsys, "--seq-len")
    bad(["train", *common], capsys, "--text")
    bad(["train", "--text", short, "--corpus", "shakespeare", *common], capsys, "not both")
    bad(["train", "--corpus", "nope", *common], capsys, "nope")
    assert not out.exists(), "nothing may be written for a run that never started"
    # The error's advice works:
    code, _, err = run(["train", "--text", latin, "--encoding", "latin-1", *common, "--quiet"], capsys)
    assert code == 0, err


def test_train_bad_options(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\nlayerz = 2\n")
    common = ["--text", text, "--out", tmp_path / "out"]
    bad(["train", *common, "--config", recipe], capsys, "layerz")
    bad(["train", *common, "--config", tmp_path / "none.toml"], capsys, "not found")
    bad(["train", *common, "--hidden", "0"], capsys, "model.hidden")
    bad(["train", *common, "--set", "train.speed=3"], capsys, "train.speed")
    assert not (tmp_path / "out").exists()


def test_existing_run_needs_overwrite(trained, capsys):
    bad(["train", "--text", trained / "play.txt", "--out", trained / "run", *FAST], capsys, "--overwrite")


def test_generate_bad_inputs(trained, tmp_path, capsys):
    ckpt = ["--checkpoint", trained / "run"]
    bad(["generate", *ckpt, "--prime", "ROMEO: 🙂"], capsys, "'🙂'")
    bad(["generate", *ckpt, "--prime", "🙂", "--unknown", "skip"], capsys, "empty")
    bad(["generate", *ckpt, "--temperature", "-1"], capsys, "temperature")
    bad(["generate", *ckpt, "--top-p", "1.5"], capsys, "top-p")
    bad(["generate", *ckpt, "--top-p", "0"], capsys, "top-p")
    bad(["generate", "--checkpoint", tmp_path / "nothing"], capsys, "not found")
    (tmp_path / "empty").mkdir()
    bad(["generate", "--checkpoint", tmp_path / "empty"], capsys, "no checkpoint")


def test_generate_skips_unknown_characters_with_a_warning(trained, capsys):
    code, out, err = run(["generate", "--checkpoint", trained / "run", "--prime", "ROMEO 🙂", "--unknown", "skip",
                          "--length", "5", "--seed", "0"], capsys)
    assert code == 0 and out.startswith("ROMEO ") and "'🙂'" in err


def test_damaged_checkpoints(trained, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    src = trained / "run" / "checkpoints"
    index = json.loads((src / "index.json").read_text())
    shutil.copytree(src / index["best"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["format_version"] = 999
    (copy / "config.json").write_text(json.dumps(config))
    bad(["generate", "--checkpoint", copy], capsys, "newer")
    (copy / "model.safetensors").unlink()
    bad(["generate", "--checkpoint", copy], capsys, "missing model.safetensors")


def test_bad_input_through_the_real_entry_point(tmp_path):
    """A subprocess shows exactly what a user sees: one line on stderr, exit 2."""
    env = {**os.environ, "RNNKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "rnnkit", "train", "--text", str(tmp_path / "x.txt"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    assert proc.stdout == ""


def test_train_and_generate_through_the_installed_command(tmp_path):
    exe = str(Path(sys.executable).with_name("rnnkit"))
    env = {**os.environ, "RNNKIT_CACHE": str(tmp_path / "cache")}
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    train = subprocess.run([exe, "train", "--text", str(text), "--out", str(tmp_path / "run"), "--max-steps", "5",
                            *FAST], capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr
    assert train.stdout == ""  # progress goes to stderr
    assert "done: 5 steps" in train.stderr
    gen = subprocess.run([exe, "generate", "--checkpoint", str(tmp_path / "run"), "--prime", "JULIET:",
                          "--length", "30", "--seed", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("JULIET:") and len(gen.stdout) == len("JULIET:") + 31
