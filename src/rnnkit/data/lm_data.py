"""Text for language modelling: read, tokenize, split, and cache the ids next to the run.

The split is deterministic and contiguous: the first part of the text trains,
the next ``val_fraction`` validates and the last ``test_fraction`` tests, so
validation text never overlaps training text. Encoded ids are cached as
``.npy`` files in ``RUN/data/`` keyed by a hash of the text and the settings
that shape them, so re-running on the same text skips the encoding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnkit.config import DataConfig
from rnnkit.data import corpora
from rnnkit.data.tokenizers import Tokenizer, build_tokenizer, count_ids, tokenizer_from_dict
from rnnkit.errors import RnnkitError
from rnnkit.files import atomic_folder

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str  # what the text is, for logs and the checkpoint
    chars: int  # characters in the whole text
    cache_key: str = ""
    from_cache: bool = False

    @property
    def chars_per_token(self) -> float:
        total = len(self.train) + len(self.val) + len(self.test)
        return self.chars / max(total, 1)


def read_source(config: DataConfig, *, log: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Return (text, description) for ``--text`` or ``--corpus``."""
    if config.text and config.corpus:
        raise RnnkitError("give either --text or --corpus, not both")
    if config.text:
        return corpora.read_text(config.text, encoding=config.encoding), str(config.text)
    if config.corpus:
        path = corpora.fetch(config.corpus, log=log)
        return corpora.read_text(path), f"corpus {config.corpus}"
    raise RnnkitError("no training text: pass --text FILE_OR_FOLDER or --corpus NAME (see `rnnkit corpora list`)")


def split_ids(ids: np.ndarray, *, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous split: train | validation | test, by tail fractions."""
    n = len(ids)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    n_train = n - n_val - n_test
    return ids[:n_train], ids[n_train : n_train + n_val], ids[n_train + n_val :]


def _cache_key(text: str, config: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(text.encode("utf-8"))
    # Everything that changes the ids: the tokenizer's settings and the split.
    h.update(json.dumps([CACHE_VERSION, config.level, config.lowercase, config.eos, config.min_freq, config.max_vocab,
                         config.vocab_size, config.val_fraction, config.test_fraction]).encode())
    return h.hexdigest()


def _load_cache(folder: Path, key: str) -> tuple[Tokenizer, dict[str, np.ndarray], int] | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        arrays = {s: np.load(folder / f"{s}.npy", allow_pickle=False) for s in SPLITS}
        return tokenizer_from_dict(meta["tokenizer"]), arrays, int(meta["chars"])
    except (OSError, ValueError, KeyError, RnnkitError):
        return None  # a missing or damaged cache is simply rebuilt


def _save_cache(folder: Path, key: str, tokenizer: Tokenizer, arrays: dict[str, np.ndarray], chars: int, source: str) -> None:
    try:
        with atomic_folder(folder, replace=True) as tmp:
            for split, arr in arrays.items():
                np.save(tmp / f"{split}.npy", arr, allow_pickle=False)
            meta = {"key": key, "source": source, "chars": chars, "tokenizer": tokenizer.to_dict(),
                    "sizes": {s: int(len(a)) for s, a in arrays.items()}, "dtype": str(arrays["train"].dtype)}
            (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    except OSError:
        pass  # a cache is an optimisation: failing to write it is not fatal


def save_lm_cache(data: LMData, cache_dir: str | Path) -> None:
    """Store the encoded splits so the next run on the same text skips encoding."""
    if not data.from_cache:
        arrays = {"train": data.train, "val": data.val, "test": data.test}
        _save_cache(Path(cache_dir), data.cache_key, data.tokenizer, arrays, data.chars, data.source)


def prepare_lm_data(
    config: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> LMData:
    """Read, tokenize and split the training text (reading the cache in ``cache_dir`` when valid).

    Nothing is written here; call :func:`save_lm_cache` once the run is known to start.
    """
    text, source = read_source(config, log=log)
    key = _cache_key(text, config)
    folder = Path(cache_dir) if cache_dir is not None else None
    cached = _load_cache(folder, key) if folder is not None else None
    if cached is not None:
        tokenizer, arrays, chars = cached
        from_cache = True
    else:
        if log is not None and len(text) >= 1_000_000:  # only where it takes a noticeable moment
            log(f"building the {config.level} vocabulary and encoding {len(text):,} characters ...")
        tokenizer = build_tokenizer(config, text)
        ids = tokenizer.encode(text)
        # How often the model sees each token (after <unk> mapping): shown by `rnnkit vocab`.
        tokenizer.counts = count_ids(ids, tokenizer.vocab_size)
        train, val, test = split_ids(ids, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
        arrays = {"train": train, "val": val, "test": test}
        chars = len(text)
        from_cache = False
    data = LMData(tokenizer=tokenizer, source=source, chars=chars, cache_key=key, from_cache=from_cache, **arrays)
    if len(data.train) < config.seq_len + 1:
        raise RnnkitError(
            f"{source} gives {len(data.train)} training tokens, fewer than one window of {config.seq_len} + 1; "
            "use a longer text or a smaller --seq-len (or --window)"
        )
    if config.val_fraction > 0 and len(data.val) < 2:
        raise RnnkitError(
            f"the validation split of {source} has {len(data.val)} tokens; use a longer text or a larger --val-fraction"
        )
    return data
