import json

import pytest
import torch

from rnnkit.checkpoint import FORMAT_VERSION, load_checkpoint, read_index, save_to_run
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import CharTokenizer
from rnnkit.errors import RnnkitError
from rnnkit.models.language_model import LanguageModel


def saved(tmp_path, *, tie=False, step=10, names=("best", "last")):
    config = RunConfig()
    config.model.hidden, config.model.layers, config.model.tie_weights = 16, 2, tie
    tok = CharTokenizer.fit("hello world, 你好")
    torch.manual_seed(0)
    model = LanguageModel(config=config.model, vocab_size=tok.vocab_size)
    path = save_to_run(tmp_path / "run", names=names, step=step, model=model, tokenizer=tok,
                       task="language_model", run_config=config, state={"step": step})
    return model, tok, path


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model, tok, _ = saved(tmp_path, tie=tie)
    ckpt = load_checkpoint(tmp_path / "run")
    ids = torch.tensor([tok.encode("hello 你好").tolist()])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids)[0], ckpt.model(ids)[0])
    assert ckpt.tokenizer.chars == tok.chars
    assert ckpt.meta["format_version"] == FORMAT_VERSION
    if tie:
        assert ckpt.model.head.weight is ckpt.model.embedding.weight


def test_only_safe_files_are_written(tmp_path):
    _, _, path = saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_index_points_at_best_and_last_and_stale_folders_go(tmp_path):
    saved(tmp_path, step=10)
    saved(tmp_path, step=20, names=("last",))
    assert read_index(tmp_path / "run") == {"best": "step-000000010", "last": "step-000000020"}
    saved(tmp_path, step=30, names=("best", "last"))
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["index.json", "step-000000030"]
    assert load_checkpoint(tmp_path / "run").meta["state"]["step"] == 30


def test_missing_checkpoint(tmp_path):
    with pytest.raises(RnnkitError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RnnkitError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_incomplete_checkpoint(tmp_path):
    _, _, path = saved(tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(RnnkitError, match="missing tokenizer.json"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    _, _, path = saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RnnkitError, match="newer"):
        load_checkpoint(path)


def test_truncated_weights_and_mismatched_shapes(tmp_path):
    _, _, path = saved(tmp_path)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(RnnkitError, match="model.safetensors"):
        load_checkpoint(path)
    weights.write_bytes(good)
    config = json.loads((path / "config.json").read_text())
    config["run"]["model"]["hidden"] = 32
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(RnnkitError, match="do not match"):
        load_checkpoint(path)
