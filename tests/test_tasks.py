"""The task registry is the one list of tasks, and every command asks it."""

import typing

import pytest

from rnnkit import tasks
from rnnkit.config import RunConfig
from rnnkit.errors import RnnkitError


def test_the_config_knows_exactly_the_registered_tasks():
    choices = typing.get_args(typing.get_type_hints(RunConfig)["task"])
    assert list(choices) == tasks.names()


@pytest.mark.parametrize("name", tasks.names())
def test_every_entry_resolves(name):
    spec = tasks.get(name)
    module = tasks.resolve(spec.training)
    assert callable(module.make_task) and callable(module.summary)
    assert callable(tasks.resolve(spec.evaluate))
    if spec.figures:
        assert callable(tasks.resolve(spec.figures))
    if spec.inspects:
        assert callable(tasks.resolve(spec.inspects))


def test_capabilities_and_the_wrong_task_error():
    assert tasks.require("language_model", "generates", what="x", where="y").name == "language_model"
    with pytest.raises(tasks.WrongTask) as error:
        tasks.require("classify", "generates", what="`rnnkit generate`", where="runs/c")
    assert str(error.value) == "runs/c holds a classifier checkpoint, but `rnnkit generate` needs a language model"
    assert error.value.needed == "language_model"
    with pytest.raises(RnnkitError, match="unknown task 'poetry'"):
        tasks.get("poetry")



def test_library_errors_leave_the_fix_to_the_caller(tmp_path, capsys):
    """The tokenizer says what is unknown in its own words; the CLI adds its flag (the server its field)."""
    from rnnkit.cli import main
    from rnnkit.data.tokenizers import CharTokenizer
    from rnnkit.errors import UnknownTokens
    from rnnkit.inference import encode_prime

    tok = CharTokenizer(chars=list("abc "))
    with pytest.raises(UnknownTokens) as error:
        encode_prime(tok, "abz", unknown="error")
    assert str(error.value) == "prime 'abz': 1 character(s) not in the model's vocabulary: 'z'"
    text = tmp_path / "t.txt"
    text.write_text("abc cab bac " * 40, encoding="utf-8")
    assert main(["train", "--text", str(text), "--hidden", "8", "--layers", "1", "--seq-len", "8", "--batch-size", "4",
                 "--max-steps", "2", "--threads", "1", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prime", "abz", "--length", "3"]) == 2
    assert capsys.readouterr().err.strip().endswith("'z'; remove them or pass --unknown skip")
