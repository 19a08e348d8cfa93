"""Tiny untrained checkpoints that several test modules build the same way (random weights are enough)."""

from __future__ import annotations

from pathlib import Path

import torch

from rnnkit.checkpoint import write_checkpoint
from rnnkit.config import RunConfig
from rnnkit.data.tokenizers import WordTokenizer
from rnnkit.models.classifier import Classifier


def classifier_checkpoint(path: Path) -> Path:
    """A word-level LSTM(16) sentiment classifier over an 11-word vocabulary, labels neg and pos."""
    torch.manual_seed(0)
    config = RunConfig(task="classify")
    config.data.level = "word"
    config.model.hidden, config.model.layers = 16, 1
    tok = WordTokenizer.fit("a good film . a bad film . great acting , dull plot")
    labels = ["neg", "pos"]
    model = Classifier(config=config.model, vocab_size=tok.vocab_size, num_classes=len(labels))
    return write_checkpoint(path, model=model, tokenizer=tok, task=config.task, run_config=config,
                            state={"step": 3, "best_val_accuracy": 0.75}, extra={"labels": labels})
