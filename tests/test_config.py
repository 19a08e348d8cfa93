from pathlib import Path

import pytest

from rnnkit.config import RunConfig, all_keys, load_config, parse_override, set_value
from rnnkit.errors import RnnkitError


def test_toml_recipe_and_types(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('out = "runs/x"\n[data]\nseq_len = 50\n[model]\ncell = "gru"\nhidden = 64\n[train]\nlr = 1\n')
    config = load_config(path)
    assert config.data.seq_len == 50 and config.model.cell == "gru" and config.model.hidden == 64
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.data.batch_size == RunConfig().data.batch_size  # untouched defaults stay


@pytest.mark.parametrize(
    "toml, match",
    [
        ("[model]\nhiden = 3\n", "did you mean 'model.hidden'"),
        ("[modle]\nhidden = 3\n", "unknown config key"),
        ("[model]\nhidden = 'big'\n", "must be an integer"),
        ("[model]\ncell = 'transformer'\n", "must be one of lstm, gru, rnn"),
        ("[train]\nlr = -1.0\n", "must be positive"),
        ("[data]\nseq_len = 0\n", "positive"),
        ("[model]\ndropout = 1.5\n", "dropout"),
        ("model = 3\n", "table"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, toml, match):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(RnnkitError, match=match) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_overrides():
    config = RunConfig()
    set_value(config, *parse_override("train.eval_every=10"))
    set_value(config, *parse_override("model.tie_weights=true"))
    set_value(config, *parse_override("train.sample_prefixes=['a', 'b']"))
    set_value(config, *parse_override("data.text=some file.txt"))
    assert config.train.eval_every == 10 and config.model.tie_weights is True
    assert config.train.sample_prefixes == ["a", "b"] and config.data.text == "some file.txt"
    with pytest.raises(RnnkitError):
        set_value(config, "train.nope", 1)
    with pytest.raises(RnnkitError):
        parse_override("no-equals-sign")


def test_every_key_is_settable():
    for key in all_keys():
        assert key.count(".") <= 1


def test_tie_weights_needs_matching_sizes():
    with pytest.raises(RnnkitError, match="tie"):
        RunConfig.from_dict({"model": {"tie_weights": True, "input": "onehot"}})
    with pytest.raises(RnnkitError, match="embedding-dim"):
        RunConfig.from_dict({"model": {"tie_weights": True, "hidden": 32, "embedding_dim": 16}})


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
BUILTIN_CORPORA = ("belling-the-cat",)  # ship with rnnkit: no download, no --text needed


def _tiny_data(tmp_path: Path, config: RunConfig) -> list[str]:
    """--text of a few kB that every recipe of its task can read offline (its sample prefixes included)."""
    if config.task == "echo":
        return ["--series-length", "300"]
    if config.data.corpus in BUILTIN_CORPORA:
        return []
    if config.task == "classify":
        rows = ["label\ttext"] + [f"pos\tA Fine, Moving Film number {i}." if i % 2 else
                                    f"neg\tA Dull and Tired Film number {i}." for i in range(60)]
        path = tmp_path / "tiny.tsv"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        return ["--text", str(path)]
    prefixes = "\n".join(config.train.sample_prefixes)
    path = tmp_path / "tiny.txt"
    path.write_text(prefixes + "\n" + "The Cat Sat On The Mat. THE DOG SAT ON THE LOG.\n" * 600, encoding="utf-8")
    return ["--text", str(path)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_trains_a_few_steps(tmp_path, recipe):
    """Each recipe as shipped, on a tiny text of its kind, for 3 steps: its settings fit together."""
    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.cli import main

    config = load_config(recipe)
    assert config.task in ("language_model", "classify", "echo")
    out = tmp_path / "run"
    argv = ["train", "--config", str(recipe), "--out", str(out), "--quiet", "--threads", "1",
            "--max-steps", "3", "--eval-every", "3", "--eval-max-tokens", "200", "--sample-length", "5",
            *_tiny_data(tmp_path, config)]
    assert main(argv) == 0
    ckpt = load_checkpoint(out)
    assert ckpt.task == config.task and ckpt.run_config.model == config.model
    if config.data.lowercase and config.task != "echo":
        assert ckpt.tokenizer.lowercase and not any(c.isupper() for c in ckpt.tokenizer.decode(
            range(ckpt.tokenizer.vocab_size)))


def test_a_text_setting_that_looks_like_a_number_stays_text():
    assert parse_override("data.text=2024") == ("data.text", "2024")
    assert parse_override("out=007") == ("out", "007")
    assert parse_override("model.hidden=256") == ("model.hidden", 256)
    config = RunConfig()
    set_value(config, *parse_override("data.text=2024"), source="--set")
    assert config.data.text == "2024"
