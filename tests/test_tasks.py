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


def test_capabilities_and_the_wrong_task_error():
    assert tasks.require("language_model", "generates", what="x", where="y").name == "language_model"
    with pytest.raises(tasks.WrongTask) as error:
        tasks.require("classify", "generates", what="`rnnkit generate`", where="runs/c")
    assert str(error.value) == "runs/c holds a classifier checkpoint, but `rnnkit generate` needs a language model"
    assert error.value.needed == "language_model"
    with pytest.raises(RnnkitError, match="unknown task 'poetry'"):
        tasks.get("poetry")

