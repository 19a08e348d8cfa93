"""The task registry: every task rnnkit knows, and what each command means for it.

This is the only place that lists the tasks. The CLI, the server, the
checkpoint loader and the engine ask here: which network a checkpoint of a
task holds, which module trains it, what ``rnnkit eval`` does with it, and
whether it can ``generate`` or ``classify``. To add a task, write its module
(an engine task in ``training/``, see ``docs/architecture.md``) and add one
:class:`TaskSpec` below.

The entries name their training and evaluation code by module path, imported
on first use, so that loading a checkpoint or serving one never imports
the training code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rnnkit.config import ModelConfig
from rnnkit.errors import RnnkitError

if TYPE_CHECKING:
    from torch import nn


def _language_model(config: ModelConfig, vocab_size: int, meta: dict[str, Any]) -> nn.Module:
    from rnnkit.models.language_model import LanguageModel

    return LanguageModel(config=config, vocab_size=vocab_size)


def _classifier(config: ModelConfig, vocab_size: int, meta: dict[str, Any]) -> nn.Module:
    from rnnkit.models.classifier import Classifier

    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise RnnkitError("classifier checkpoint: config.json must list at least two 'labels'")
    return Classifier(config=config, vocab_size=vocab_size, num_classes=len(labels))


@dataclass(frozen=True)
class TaskSpec:
    name: str  # as in `--task NAME` and a checkpoint's config.json
    display: str  # "language model": what a checkpoint of this task is, in words
    build_model: Callable[[ModelConfig, int, dict[str, Any]], nn.Module]  # (model config, vocab size, config.json)
    training: str  # the module whose `make_task(config, out, log)` gives the engine task, `summary(...)` its last line
    evaluate: str  # "module:function" behind `rnnkit eval` (see rnnkit.evaluation)
    generates: bool = False  # `rnnkit generate`, POST /generate and sessions
    classifies: bool = False  # `rnnkit classify`, POST /classify
    figures: str | None = None  # "module:function" drawing extra figures for `rnnkit plot`
    inspects: str | None = None  # "module:function" behind `rnnkit inspect` (see rnnkit.views)


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(name="language_model", display="language model", build_model=_language_model,
             training="rnnkit.training.lm", evaluate="rnnkit.evaluation:evaluate_text", generates=True,
             inspects="rnnkit.views:inspect_units"),
    TaskSpec(name="classify", display="classifier", build_model=_classifier,
             training="rnnkit.training.classify", evaluate="rnnkit.evaluation:evaluate_labelled", classifies=True,
             inspects="rnnkit.views:inspect_words"),
    # A language model over the task's symbols, scored on a fresh series.
    TaskSpec(name="echo", display="echo-task model", build_model=_language_model,
             training="rnnkit.training.echo", evaluate="rnnkit.evaluation:evaluate_series",
             figures="rnnkit.plots:echo_figures"),
)}


def names() -> list[str]:
    return list(TASKS)


def get(name: str) -> TaskSpec:
    if name not in TASKS:
        raise RnnkitError(f"unknown task {name!r} (this rnnkit knows: {', '.join(TASKS)})")
    return TASKS[name]


def resolve(reference: str) -> Any:
    """The object a ``module:name`` (or plain module) reference names, imported now."""
    module, _, attribute = reference.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


class WrongTask(RnnkitError):
    """A checkpoint of one task was given to a command that needs another; ``needed`` names a task that fits."""

    def __init__(self, message: str, needed: str) -> None:
        super().__init__(message)
        self.needed = needed


def require(task: str, capability: str, *, what: str, where: str) -> TaskSpec:
    """The spec of ``task``, or :class:`WrongTask` when it lacks ``capability``.

    ``capability`` is a :class:`TaskSpec` field: ``generates``, ``classifies`` or ``inspects``.

    ``what`` names the command and ``where`` the checkpoint, in the caller's words.
    """
    spec = get(task)
    if not getattr(spec, capability):
        able = [s for s in TASKS.values() if getattr(s, capability)]
        raise WrongTask(f"{where} holds a {spec.display} checkpoint, but {what} needs "
                        + " or ".join(f"a {s.display}" for s in able), needed=able[0].name)
    return spec
