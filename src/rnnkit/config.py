"""Typed run configuration: defaults in one place, TOML loading, dotted overrides.

A run is described by :class:`RunConfig`, made of three sections (``data``,
``model``, ``train``) plus the output directory. Every knob has its default
and a one-line help text here and nowhere else; the CLI builds its flags from
the same help texts. Loading a TOML file or applying an override checks the
key exists and the value has the right type, so a typo is an error instead of
a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from rnnkit.errors import RnnkitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib


def knob(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (read by the CLI and the docs)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DataConfig:
    """Where the text comes from and how it is cut into training batches."""

    text: str | None = knob(
        None, "a UTF-8 text file or folder of .txt files (classify: a TSV/CSV or label folders)", aliases=("--data",),
        metavar="PATH",
    )
    corpus: str | None = knob(None, "a named corpus (see `rnnkit corpora list`), fetched and cached")
    level: Literal["char", "word", "bpe"] = knob("char", "tokenization level: characters, words, or byte-level BPE")
    lowercase: bool = knob(
        False, "lower-case the text (char, word and bpe levels); saved with the tokenizer, so generation, "
               "eval and serving lower-case their input the same way"
    )
    eos: bool = knob(False, "word level: add an <eos> token at each line end (keeps line breaks)")
    min_freq: int = knob(1, "word level: words seen fewer times become <unk>")
    max_vocab: int = knob(0, "word level: keep at most this many tokens, specials included (0: no limit)")
    vocab_size: int = knob(2000, "bpe level: vocabulary size to train")
    bpe_sample_mb: float = knob(
        4.0, "bpe level: train the vocabulary on about this many MB of the text, taken in whole lines from 16 "
              "places spread over it (a longer text is still read whole and encoded whole; 0: train on all of it)",
        metavar="MB",
    )
    encoding: str = knob("utf-8", "text encoding of --text")
    val_fraction: float = knob(0.05, "fraction of the text (its tail) held out for validation")
    test_fraction: float = knob(0.0, "fraction of the text (the very end) held out for testing")
    seq_len: int = knob(100, "window length T: tokens per training sequence (echo: the BPTT window)",
                        aliases=("--bptt",))
    batch_size: int = knob(64, "sequences per batch B")
    sampling: Literal["random", "sequential"] = knob(
        "sequential",
        "random: independent windows, state reset per batch; "
        "sequential: B parallel streams, state carried and detached (truncated BPTT)",
    )
    target: Literal["all", "last"] = knob(
        "all", "all: predict every next token (many-to-many); last: only the window's last next token"
    )
    label_column: str = knob("label", "classify: the label column of a TSV/CSV file")
    text_column: str = knob("text", "classify: the text column of a TSV/CSV file")
    max_len: int = knob(80, "classify: keep at most this many tokens of each text")
    truncate: Literal["pre", "post"] = knob("pre", "classify: pre drops the start of a long text, post its end")
    window: int = knob(
        0, "many-to-one windows: N tokens in, the next one out (sets seq_len=N, target=last, random sampling)"
    )
    series_length: int = knob(50_000, "echo: steps in each generated series (a new series every epoch)")
    echo_step: int = knob(3, "echo: the target repeats the input this many steps later (longer than --bptt: "
                             "the delayed-copy variant, out of reach of truncated BPTT)")
    symbols: int = knob(2, "echo: how many distinct symbols (2: a bit stream; k: symbols 0..k-1)")


@dataclass
class ModelConfig:
    """The network: input encoding, recurrent stack, output head."""

    cell: Literal["lstm", "gru", "rnn", "mingru", "minlstm"] = knob(
        "lstm", "recurrent cell type (mingru/minlstm: Feng et al. 2024, gates from the input only)", flag="--model"
    )
    nonlinearity: Literal["tanh", "relu"] = knob("tanh", "activation of the vanilla rnn cell")
    input: Literal["embedding", "onehot"] = knob("embedding", "how tokens enter the network")
    embedding_dim: int = knob(0, "embedding size (0: same as --hidden)")
    hidden: int = knob(512, "hidden units per layer")
    layers: int = knob(2, "stacked recurrent layers")
    dropout: float = knob(0.0, "dropout between layers and before the head")
    dropout_at: Literal["input+head", "input"] = knob(
        "input+head",
        "classifier: where --dropout applies; input+head: every recurrent layer's input (the embedding, then "
        "each layer's output) and the pooled state before the head; input: the layers' inputs only "
        "(Keras's SimpleRNNCell(dropout=...))",
    )
    dropout_mask: Literal["element", "sequence"] = knob(
        "element",
        "classifier: a fresh dropout mask for every element (element), or one mask per text and feature kept "
        "for all its time steps (sequence: Keras's recurrent-cell dropout)",
    )
    tie_weights: bool = knob(False, "share the embedding matrix with the output head")
    softmax: Literal["full", "adaptive"] = knob(
        "full", "language model output: full softmax over the vocabulary, or adaptive (Grave et al. 2017: the "
                "frequent words in a small head, rarer ones in narrower clusters; word level, for large "
                "vocabularies; scores are then log-probabilities)"
    )
    cutoffs: list[int] = knob([], "--softmax adaptive: the ids where the shortlist and each cluster end, increasing "
                                  "(e.g. 2000 10000 or 2000,10000; default: V/16 and V/4 of the V-word vocabulary)")
    div_value: float = knob(4.0, "--softmax adaptive: each cluster's projection is this many times narrower than "
                                 "the one before (hidden/4, hidden/16, ...)")
    bidirectional: bool = knob(False, "classifier: read each text both ways")
    pooling: Literal["last", "mean", "max"] = knob("last", "classifier: how the outputs over time become one vector")
    backend: Literal["fused", "scratch"] = knob(
        "fused",
        "fused: PyTorch's nn.LSTM/GRU/RNN kernels; scratch: rnnkit's hand-written cells "
        "(same weights and results; checkpoints load into either)",
    )
    init: Literal["default", "normal", "keras"] = knob(
        "default",
        "weights: PyTorch's default (recurrent uniform +-1/sqrt(H), embedding N(0, 1)); normal(0, 0.01) with zero "
        "biases (the d2l tutorial's); or Keras's defaults (embedding uniform +-0.05, input weights and head "
        "Glorot uniform, recurrent weights orthogonal, biases zero, LSTM forget-gate bias 1)",
    )
    block: Literal["plain", "residual"] = knob(
        "plain", "language models: plain stacks the recurrent layers; residual wraps each in a pre-norm residual "
                 "block (x + dropout(layer(LayerNorm(x))), a final LayerNorm before the head, a Linear input "
                 "projection when the input width is not --hidden), as the minGRU paper's and nanoGPT's models"
    )
    mlp_ratio: float = knob(
        0.0, "residual blocks: after each recurrent sub-block, a pre-norm residual MLP of this many times --hidden "
             "units with GELU (e.g. 4; 0: no MLP; at most 64)"
    )
    scan: Literal["auto", "parallel", "sequential"] = knob(
        "auto", "mingru/minlstm, fused backend: parallel is the log-space scan, sequential an elementwise loop "
                "over gates computed for the whole window (same function); auto picks by device, as measured: "
                "sequential on CPU, parallel on CUDA"
    )

    def stack_name(self) -> str:
        """The network in a few words for titles: ``LSTM 2x256``, ``MINGRU 2x256 residual, MLP x4``."""
        name = f"{self.cell.upper()} {self.layers}x{self.hidden}"
        if self.block == "residual":
            name += " residual" + (f", MLP x{self.mlp_ratio:g}" if self.mlp_ratio else "")
        return name


@dataclass
class TrainConfig:
    """Optimisation, stopping, evaluation and logging."""

    optimizer: Literal["adam", "adamw", "rmsprop", "sgd", "adagrad"] = knob("adam", "optimizer")
    patience: int = knob(0, "classify: stop after this many epochs without a better validation accuracy (0: off)")
    lr: float = knob(2e-3, "learning rate")
    weight_decay: float = knob(0.0, "weight decay")
    clip: float = knob(5.0, "clip the global gradient norm to this value (0: no clipping)")
    lr_schedule: Literal["plateau", "constant", "cosine"] = knob(
        "plateau", "plateau: multiply the rate by --lr-decay when validation stops improving; constant; cosine: "
                   "anneal from --lr to --min-lr over whichever budget binds (--max-steps/--epochs, or --max-time "
                   "by elapsed training time)"
    )
    warmup: int = knob(0, "steps of linear warm-up from --lr/N to --lr at the start (any schedule; 0: none)")
    min_lr: float = knob(0.0, "cosine: the learning rate at the end of the budget")
    lr_decay: float = knob(0.5, "multiply the learning rate by this when validation stops improving")
    lr_patience: int = knob(2, "evaluations without improvement before the learning rate decays")
    max_steps: int = knob(0, "stop after this many optimizer steps (0: no limit)")
    max_time: float = knob(0.0, "stop after this many seconds of training (0: no limit)")
    epochs: float = knob(0.0, "stop after this many passes over the training text (0: no limit)")
    seed: int = knob(0, "random seed: the same seed and settings give the same run on CPU")
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto picks CUDA when available")
    threads: int = knob(0, "CPU threads for torch (0: torch's default)")
    eval_every: int = knob(500, "validate every N steps (and at the end)")
    eval_max_tokens: int = knob(200_000, "validate on at most this many tokens (0: all)")
    log_every: int = knob(50, "print a progress line every N steps when stderr is not a terminal")
    sample_every: int = knob(0, "print samples every N steps (0: only at evaluations)")
    sample_prefixes: list[str] = knob([], "prefixes to continue when sampling during training")
    sample_length: int = knob(200, "tokens per training-time sample")
    sample_temperature: float = knob(0.8, "temperature of training-time samples")
    save_every: int = knob(0, "also save a checkpoint every N steps (0: only at evaluations and the end)")
    save_every_seconds: float = knob(600.0, "also save a checkpoint after this many seconds without one (0: off)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = knob(
        "auto", "arithmetic of the forward pass (torch.autocast): auto is bf16 on a CUDA GPU that has it, else fp32; "
                "fp16 needs CUDA and uses a gradient scaler; weights and checkpoints stay fp32"
    )
    grad_accum: int = knob(1, "micro-batches per optimizer step: each process's share of --batch-size is cut into "
                              "this many (the same update in less memory)")
    on_nan: Literal["stop", "skip"] = knob(
        "stop", "a NaN/inf loss or gradient: stop the run (keeping the last good checkpoint), or skip the batch"
    )
    live_plot: str | None = knob(None, "echo: redraw this PNG during training (loss and the current window)",
                                 metavar="FILE.png")
    plot_every: int = knob(200, "echo: redraw the live plot every N steps (a redraw takes ~0.25 s)")
    show: bool = knob(False, "echo: also show the live plot in a window (needs a display)")


@dataclass
class RunConfig:
    """A whole training run."""

    task: Literal["language_model", "classify", "echo"] = knob(
        "language_model",
        "language_model: predict the next token; classify: label whole texts; "
        "echo: per-step labelling of a generated series (the echo task)",
    )
    out: str | None = knob(None, "run directory: checkpoints, logs and the encoded-data cache", metavar="PATH")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        config = cls()
        apply_mapping(config, data, source=source)
        validate(config)
        return config

    @classmethod
    def build(cls, *, recipe: str | Path | None = None, overrides: list[str] | None = None,
              settings: dict[str, Any] | None = None) -> RunConfig:
        """Defaults, then a TOML ``recipe``, then ``KEY=VALUE`` ``overrides``, then dotted ``settings``, checked."""
        config = cls()
        if recipe:
            apply_mapping(config, load_toml(recipe), source=str(recipe))
        for item in overrides or []:
            key, value = parse_override(item)
            set_value(config, key, value, source="--set")
        settings = settings or {}
        for key, value in settings.items():
            set_value(config, key, value, source="command line")
        # A text source given last replaces the recipe's, whichever kind the recipe had.
        if "data.text" in settings and "data.corpus" not in settings:
            config.data.corpus = None
        if "data.corpus" in settings and "data.text" not in settings:
            config.data.text = None
        validate(config)
        return config

    def to_toml(self) -> str:
        """The full configuration as a recipe that `rnnkit train --config` accepts."""
        data = self.to_dict()
        lines = ["# the full configuration of this run; re-run it with `rnnkit train --config THIS_FILE`"]
        lines += [f"{k} = {toml_value(v)}" for k, v in data.items() if k not in SECTIONS and v is not None]
        for section in SECTIONS:
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in data[section].items() if v is not None]
        return "\n".join(lines) + "\n"


SECTIONS = ("data", "model", "train")


@dataclass(frozen=True)
class ServeLimits:
    """What one request to ``rnnkit serve`` may ask for, and how many sessions the server keeps."""

    max_length: int = knob(1000, "most tokens one request may generate")
    max_samples: int = knob(8, "most samples one /generate may ask for")
    max_texts: int = knob(64, "most texts one /classify may send")
    max_request_bytes: int = knob(1024 * 1024, "largest request body accepted, in bytes (bounds a prime, a feed "
                                               "and the texts to classify)", metavar="BYTES")
    max_request_seconds: float = knob(60.0, "longest a request may take, its wait for a worker included: 503 if "
                                            "no worker came free in time, 504 if its work ran over",
                                      metavar="SECONDS")
    max_client_requests: int = knob(8, "requests one client (its API key, or its address when there are no keys) "
                                       "may have in progress at once; more get 429")
    max_sessions: int = knob(256, "live sessions kept; a new one evicts the least recently used")
    max_session_mib: float = knob(256.0, "memory all sessions may hold together (recurrent states, recent "
                                          "tokens), in MiB; over it the least recently used are evicted",
                                  metavar="MIB")
    session_idle: float = knob(900.0, "seconds a session may sit unused before it is dropped", metavar="SECONDS")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value <= 0:
                raise RnnkitError(f"--{f.name.replace('_', '-')} must be positive, got {value:g}")


def generation_window(config: RunConfig) -> int:
    """How many tokens a model trained this way reads per prediction (0: all, with carried state).

    A many-to-one model (``target = "last"``) learned from windows of ``seq_len``
    tokens that start from a zero state, so it generates from such windows too.
    """
    d = config.data
    return d.seq_len if d.target == "last" else 0


def toml_value(value: Any) -> str:
    """One value written as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL character.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and gently convert) one value against a field's annotated type."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except RnnkitError:
                continue
        raise RnnkitError(f"{source}: '{key}' must be {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise RnnkitError(
                f"{source}: '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if origin is list:
        (item_type,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise RnnkitError(f"{source}: '{key}' must be a list, got {value!r}")
        if item_type is int and all(isinstance(v, str) for v in value):  # "2000,10000" as well as 2000 10000
            value = [p.strip() for v in value for p in v.split(",")]
        return [_coerce(v, item_type, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise RnnkitError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RnnkitError(f"{source}: '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise RnnkitError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise RnnkitError(f"{source}: '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RnnkitError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RnnkitError(f"{source}: '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _unknown(key: str, known: list[str], source: str) -> RnnkitError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return RnnkitError(f"{source}: unknown config key {key!r}{hint}")  # repr: a key may hold a line break


@dataclass(frozen=True)
class Knob:
    """One setting as a command line shows it (see :func:`knobs`)."""

    key: str  # dotted: ``model.hidden``, or ``out`` at the top level
    section: str  # "data", "model", "train", or "run" for the top level
    flag: str  # --hidden
    aliases: tuple[str, ...]
    kind: str  # "choice", "bool", "list", "int", "float" or "str"
    choices: tuple[Any, ...]
    default: Any
    help: str
    metavar: str


def knobs() -> list[Knob]:
    """Every setting with its flag, kind, default and help text, in declaration order."""
    defaults = RunConfig()
    owners = [("run", defaults, [f for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS])]
    owners += [(s, getattr(defaults, s), list(dataclasses.fields(getattr(defaults, s)))) for s in SECTIONS]
    out = []
    for section, owner, fields in owners:
        hints = _hints(owner)
        for f in fields:
            tp = hints[f.name]
            kind = ("choice" if get_origin(tp) is Literal else "bool" if tp is bool else
                    "list" if get_origin(tp) is list else {int: "int", float: "float"}.get(tp, "str"))
            out.append(Knob(key=f.name if section == "run" else f"{section}.{f.name}", section=section,
                            flag=f.metadata.get("flag", "--" + f.name.replace("_", "-")),
                            aliases=tuple(f.metadata.get("aliases", ())), kind=kind,
                            choices=get_args(tp) if kind == "choice" else (), default=getattr(owner, f.name),
                            help=f.metadata.get("help", ""), metavar=f.metadata.get("metavar", f.name.upper())))
    return out


def all_keys() -> list[str]:
    """Every dotted key a config accepts, e.g. ``model.hidden``."""
    keys = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for section in SECTIONS:
        section_obj = getattr(RunConfig(), section)
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(section_obj)]
    return keys


def set_value(config: RunConfig, dotted: str, value: Any, *, source: str = "override") -> None:
    """Set one dotted key (``train.lr``) after checking it exists and its type."""
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] not in SECTIONS:
        target, name = config, parts[0]
    elif len(parts) == 2 and parts[0] in SECTIONS:
        target, name = getattr(config, parts[0]), parts[1]
    else:
        raise _unknown(dotted, all_keys(), source)
    hints = _hints(target)
    if name not in hints or name in SECTIONS:
        raise _unknown(dotted, all_keys(), source)
    setattr(target, name, _coerce(value, hints[name], dotted, source))


def apply_mapping(config: RunConfig, data: dict[str, Any], *, source: str) -> None:
    """Apply a nested mapping (as parsed from TOML or JSON) onto ``config``."""
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise RnnkitError(f"{source}: '{key}' must be a table of settings")
            for sub, sub_value in value.items():
                set_value(config, f"{key}.{sub}", sub_value, source=source)
        else:
            set_value(config, key, value, source=source)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as TOML when it parses, else as a string."""
    if "=" not in text:
        raise RnnkitError(f"--set expects KEY=VALUE, got {text!r} (e.g. --set model.hidden=256)")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, str) and _takes_text(key):
        value = raw  # a path or name that looks like a number (data.text=2024) is still text
    return key, value


def _takes_text(dotted: str) -> bool:
    """Whether the config key ``dotted`` holds a string (or an optional one)."""
    section, _, name = dotted.rpartition(".")
    owner = getattr(RunConfig(), section, None) if section else RunConfig()
    if section and section not in SECTIONS or owner is None:
        return False
    tp = _hints(owner).get(name)
    return tp is str or (get_origin(tp) in (Union, types.UnionType) and str in get_args(tp))


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RnnkitError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise RnnkitError(f"config path is a folder, not a TOML file: {path}") from None
    except PermissionError:
        raise RnnkitError(f"cannot read config file {path}: permission denied") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RnnkitError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise RnnkitError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(path: str | Path) -> RunConfig:
    """Read a TOML recipe into a checked :class:`RunConfig`."""
    return RunConfig.from_dict(load_toml(path), source=str(path))


def _check_adaptive(config: RunConfig) -> None:
    """--softmax adaptive: a word-level language model with an untied head (the cut-offs need V: see the model)."""
    d, m = config.data, config.model
    if config.task != "language_model":
        raise RnnkitError(f"--softmax adaptive is for the language model; --task {config.task} has no vocabulary "
                          "softmax to approximate")
    if d.level != "word":
        # Its clusters must split frequent from rare ids: only word vocabularies are ranked by frequency.
        raise RnnkitError(f"--softmax adaptive needs --level word (its cut-offs split the frequency-ranked word "
                          f"ids; {d.level} ids are not ranked by frequency)")
    if m.tie_weights:
        raise RnnkitError("--softmax adaptive cannot --tie-weights (its clusters have no single output matrix to "
                          "share); drop one of the two")
    if not m.div_value > 1:
        raise RnnkitError(f"'model.div_value' must be greater than 1, got {m.div_value:g}")


def validate(config: RunConfig) -> None:
    """Check value ranges that types alone cannot express."""
    d, m, t = config.data, config.model, config.train
    positive = {
        "data.seq_len": d.seq_len,
        "data.batch_size": d.batch_size,
        "data.max_len": d.max_len,
        "model.hidden": m.hidden,
        "model.layers": m.layers,
        "train.eval_every": t.eval_every,
        "train.log_every": t.log_every,
        "train.sample_length": t.sample_length,
        "train.plot_every": t.plot_every,
        "data.series_length": d.series_length,
        "data.echo_step": d.echo_step,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RnnkitError(f"'{key}' must be a positive number, got {value}")
    non_negative = {
        "model.embedding_dim": m.embedding_dim,
        "data.window": d.window,
        "data.max_vocab": d.max_vocab,
        "data.bpe_sample_mb": d.bpe_sample_mb,
        "train.patience": t.patience,
        "train.clip": t.clip,
        "train.weight_decay": t.weight_decay,
        "train.max_steps": t.max_steps,
        "train.max_time": t.max_time,
        "train.epochs": t.epochs,
        "train.threads": t.threads,
        "train.eval_max_tokens": t.eval_max_tokens,
        "train.sample_every": t.sample_every,
        "train.sample_temperature": t.sample_temperature,
        "train.save_every": t.save_every,
        "train.save_every_seconds": t.save_every_seconds,
        "train.warmup": t.warmup,
        "train.min_lr": t.min_lr,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise RnnkitError(f"'{key}' must not be negative, got {value}")
    if d.window:
        # --window N is shorthand for the classic many-to-one set-up.
        d.seq_len, d.target, d.sampling = d.window, "last", "random"
    if not 2 <= d.symbols <= 36:
        raise RnnkitError(f"'data.symbols' must be between 2 and 36, got {d.symbols}")
    if t.live_plot is not None and not t.live_plot.lower().endswith(".png"):
        raise RnnkitError(f"--live-plot writes a PNG; give a file name ending in .png, got {t.live_plot}")
    if t.grad_accum < 1:
        raise RnnkitError(f"'train.grad_accum' must be at least 1, got {t.grad_accum}")
    if d.min_freq < 1:
        raise RnnkitError(f"'data.min_freq' must be at least 1, got {d.min_freq}")
    if not t.lr > 0:
        raise RnnkitError(f"'train.lr' must be positive, got {t.lr}")
    if not 0 <= m.dropout < 1:
        raise RnnkitError(f"'model.dropout' must be in [0, 1), got {m.dropout}")
    if t.lr_schedule == "cosine" and t.min_lr > t.lr:
        raise RnnkitError(f"'train.min_lr' ({t.min_lr:g}) must not exceed 'train.lr' ({t.lr:g})")
    if not 0 < t.lr_decay <= 1:
        raise RnnkitError(f"'train.lr_decay' must be in (0, 1], got {t.lr_decay}")
    if not (0 <= d.val_fraction < 1 and 0 <= d.test_fraction < 1):
        raise RnnkitError("validation and test fractions must be in [0, 1)")
    if d.val_fraction + d.test_fraction >= 0.9:
        raise RnnkitError(
            f"val_fraction + test_fraction = {d.val_fraction + d.test_fraction:g} leaves too little "
            "text to train on; keep their sum below 0.9"
        )
    check_block(config)
    if m.softmax == "adaptive":
        _check_adaptive(config)
    if m.tie_weights:
        if m.input != "embedding":
            raise RnnkitError("--tie-weights needs --input embedding (a one-hot input has no matrix to share)")
        if m.embedding_dim not in (0, m.hidden):
            raise RnnkitError(
                f"--tie-weights needs --embedding-dim equal to --hidden ({m.hidden}), got {m.embedding_dim}"
            )


def check_block(config: RunConfig) -> None:
    """The residual-block knobs: a sensible MLP ratio, and only where the network has residual blocks."""
    m = config.model
    if not 0 <= m.mlp_ratio <= 64:  # also refuses NaN and infinity
        raise RnnkitError(f"'model.mlp_ratio' must be between 0 and 64, got {m.mlp_ratio:g} (0: no MLP; 4: a 4 x hidden MLP)")
    if m.mlp_ratio and m.block != "residual":
        raise RnnkitError(f"--mlp-ratio {m.mlp_ratio:g} adds an MLP to residual blocks; add --block residual "
                          "(or drop --mlp-ratio)")
    if m.mlp_ratio and round(m.mlp_ratio * m.hidden) < 1:
        raise RnnkitError(f"--mlp-ratio {m.mlp_ratio:g} x --hidden {m.hidden} gives an MLP of no units; "
                          "raise --mlp-ratio or use 0 for no MLP")
    if m.block == "residual" and config.task == "classify":
        raise RnnkitError("--block residual is for language models; the classifier stacks plain layers "
                          "(drop --block or use --block plain)")
