"""The ``rnnkit`` command: a thin shell over the library.

Subcommands: ``train``, ``compare-sampling``, ``generate``, ``eval``, ``classify``, ``vocab``, ``serve``,
``corpora``. Results go to
stdout; progress, warnings and errors go to stderr. A user mistake prints one
line ``rnnkit: error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any, Literal, get_origin

from rnnkit import __version__
from rnnkit.config import (
    SECTIONS,
    RunConfig,
    ServeLimits,
    apply_mapping,
    load_toml,
    parse_override,
    set_value,
    validate,
)
from rnnkit.errors import RnnkitError, describe_os_error

# ---------------------------------------------------------------- train flags


def _flag(name: str, meta: dict[str, Any]) -> str:
    return meta.get("flag", "--" + name.replace("_", "-"))


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config knob, help text and choices taken from the config dataclasses."""
    defaults = RunConfig()
    groups = [("run", defaults, [f for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS])]
    for section in SECTIONS:
        obj = getattr(defaults, section)
        groups.append((section, obj, list(dataclasses.fields(obj))))
    for section, obj, fields in groups:
        group = parser.add_argument_group(f"{section} options" if section != "run" else "output")
        hints = typing.get_type_hints(type(obj))
        for f in fields:
            tp = hints[f.name]
            dest = f.name if section == "run" else f"{section}.{f.name}"
            default = getattr(obj, f.name)
            help_text = f.metadata.get("help", "") + (f" (default: {default})" if default not in (None, []) else "")
            kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
            args = typing.get_args(tp)
            if get_origin(tp) is Literal:
                kwargs["choices"] = list(args)
            elif tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif get_origin(tp) is list:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "TEXT"
            elif tp is int:
                kwargs.update(type=int, metavar="N")
            elif tp is float:
                kwargs.update(type=float, metavar="X")
            else:
                kwargs["metavar"] = {"text": "PATH", "out": "PATH", "live_plot": "FILE.png"}.get(f.name, f.name.upper())
            group.add_argument(_flag(f.name, f.metadata), *f.metadata.get("aliases", ()), **kwargs)


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the TOML recipe, then --set overrides, then explicit flags."""
    config = RunConfig()
    if args.config:
        apply_mapping(config, load_toml(args.config), source=str(args.config))
    for item in args.set or []:
        key, value = parse_override(item)
        set_value(config, key, value, source="--set")
    top_level = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS)
    given = {key: value for key, value in vars(args).items() if key in top_level or "." in key}
    for key, value in given.items():
        set_value(config, key, value, source="command line")
    # A text source on the command line replaces the recipe's, whichever kind the recipe had.
    if "data.text" in given and "data.corpus" not in given:
        config.data.corpus = None
    if "data.corpus" in given and "data.text" not in given:
        config.data.text = None
    validate(config)
    return config


#: What `train --resume` may change: when and how the run stops and saves, never what it computes.
RESUME_OVERRIDES = ("train.max_steps", "train.max_time", "train.epochs", "train.save_every",
                    "train.save_every_seconds", "train.log_every", "train.threads", "train.on_nan")


def _resume_config(args: argparse.Namespace):
    """The configuration of the run in ``--resume DIR``, with the few flags a resume may change."""
    from rnnkit.training.session import Resume

    run = Path(args.resume)
    if (run / "config.json").is_file():
        raise RnnkitError(f"--resume takes a run directory (the --out of `rnnkit train`), not a checkpoint folder: "
                          f"pass {run.parent.parent if run.parent.name == 'checkpoints' else 'the run directory'}")
    resume = Resume.from_run(run)
    meta = json.loads((resume.folder / "config.json").read_text(encoding="utf-8"))
    config = RunConfig.from_dict(meta.get("run", {}), source=str(resume.folder / "config.json"))
    given = {key: value for key, value in vars(args).items() if "." in key or key in ("out", "task")}
    refused = sorted(key for key in given if key not in RESUME_OVERRIDES)
    if args.config or args.set or refused or args.overwrite:
        what = ", ".join(refused) or ("--config/--set" if args.config or args.set else "--overwrite")
        raise RnnkitError(f"--resume continues a run with its own settings; it cannot change {what} "
                          f"(it can change: {', '.join('--' + k.split('.')[1].replace('_', '-') for k in RESUME_OVERRIDES)})")
    for key, value in given.items():
        set_value(config, key, value, source="command line")
    validate(config)
    config.out = str(args.resume)
    step = resume.data.get("progress", {}).get("step", 0)
    if config.train.max_steps and step >= config.train.max_steps:
        raise RnnkitError(f"{args.resume} is already at step {step}, its --max-steps {config.train.max_steps}; "
                          f"pass a larger --max-steps (or --epochs/--max-time) to train it further")
    return config, resume


def cmd_train(args: argparse.Namespace) -> int:
    from rnnkit.runtime import exact_cpu_math

    exact_cpu_math()  # before any matrix product, so that --resume continues bitwise exactly

    from rnnkit.console import ConsoleReporter, stderr
    from rnnkit.data.lm_data import prepare_lm_data
    from rnnkit.training.loop import train_language_model

    resume = None
    if args.resume:
        config, resume = _resume_config(args)
        out, old = Path(config.out), []
    else:
        config = _config_from_args(args)
        if not config.out:
            raise RnnkitError("no run directory: pass --out DIR (checkpoints and logs go there)")
        out = Path(config.out)
        if out.exists() and not out.is_dir():
            raise RnnkitError(f"--out {out} is a file; give a folder for the run")
        old = [p for p in (out / "checkpoints", out / "metrics.jsonl") if p.exists()]
        if old and not args.overwrite:
            raise RnnkitError(f"{out} already holds a training run; pass --overwrite to replace it, continue it "
                              f"with --resume {out}, or choose another --out")
    _check_writable(out)
    reporter = ConsoleReporter(quiet=args.quiet)
    if config.task == "classify":
        return _train_classifier(config, out, old, reporter, resume)
    if config.task == "echo":
        return _train_echo(config, out, old, reporter, resume)
    data = prepare_lm_data(config.data, cache_dir=out / "data", log=reporter.print, live=reporter.live)
    if resume is not None:
        _same_tokenizer(data.tokenizer, resume.folder)
    result = _run(lambda stop: train_language_model(config, data, out_dir=out, reporter=reporter, stop=stop,
                                                    resume=resume), config, out, old, reporter)
    if isinstance(result, int):
        return result
    if not args.quiet:
        stderr.print(f"checkpoints in {out}/checkpoints (best: validation loss {result.best_val_loss:.4f})"
                     if result.best_val_loss is not None else f"checkpoints in {out}/checkpoints")
    return 0


def _same_tokenizer(tokenizer, folder: Path) -> None:
    """A resumed run must read its text exactly as before."""
    from rnnkit.checkpoint import load_tokenizer

    if load_tokenizer(folder).to_dict() != tokenizer.to_dict():
        raise RnnkitError(f"the training text changed since {folder} was saved (its vocabulary differs); "
                          "resume needs the same text")


def _check_writable(out: Path) -> None:
    """Fail before reading any data when the run directory cannot be written.

    A real probe (make and remove a folder) rather than ``os.access``, which says yes
    to root on a read-only mount; nothing is left behind when the probe succeeds.
    """
    import tempfile

    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rnnkit-probe-", dir=base))
    except OSError as exc:
        raise RnnkitError(f"cannot write the run directory --out {out}: {describe_os_error(exc)}") from None


def _run(train, config: RunConfig, out: Path, old: list[Path], reporter):
    """Replace an old run (only now that the new one is known to start), train, save config.toml.

    ``train(stop)`` runs the training with a stop flag that SIGINT and SIGTERM set.
    Returns the training result, or an exit code (130/143) after such a signal
    (the run is saved by then, and resumable).
    """
    from rnnkit.console import stderr
    from rnnkit.training.session import StopFlag, Stopped, stop_on_signals

    try:
        for path in old:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        try:
            with stop_on_signals(StopFlag()) as stop:
                result = train(stop)
        except Stopped as stopped:
            reporter.close()
            name = {2: "interrupted", 15: "terminated"}.get(stopped.signum, f"stopped by signal {stopped.signum}")
            stderr.print(f"{name} at step {stopped.step}; the run is saved: continue it with "
                         f"`rnnkit train --resume {out}`")
            return stopped.exit_code
        except KeyboardInterrupt:
            reporter.close()
            stderr.print("interrupted before the step ended; continue from the last checkpoint with "
                         f"`rnnkit train --resume {out}`")
            return 130
        finally:
            reporter.close()
            if (out / "checkpoints").is_dir():  # the run started: record its full configuration
                (out / "config.toml").write_text(_to_toml(config), encoding="utf-8")
    except OSError as exc:
        # By now the data is read: what fails is writing the run (logs, cache, config). Checkpoints
        # are written atomically, so whatever the index names is still complete.
        raise RnnkitError(f"could not write the run in {out}: {describe_os_error(exc)}") from None
    return result


def _labelled_source(config: RunConfig, log) -> tuple[dict, str]:
    """Read the labelled examples of ``--text``/``--data`` or ``--corpus``."""
    from rnnkit.data import corpora
    from rnnkit.data.classification import read_labelled

    d = config.data
    if d.text and d.corpus:
        raise RnnkitError("give either --data/--text or --corpus, not both")
    if d.corpus:
        path, source = corpora.fetch(d.corpus, log=log), f"corpus {d.corpus}"
    elif d.text:
        path, source = d.text, str(d.text)
    else:
        raise RnnkitError("no labelled data: pass --data FILE.tsv|FOLDER or --corpus NAME")
    sets = read_labelled(path, label_column=d.label_column, text_column=d.text_column, encoding=d.encoding, log=log)
    return sets, source


def _train_classifier(config: RunConfig, out: Path, old: list[Path], reporter, resume=None) -> int:
    from rnnkit.console import stderr
    from rnnkit.data.classification import split_examples
    from rnnkit.training.classify import prepare_classify_data, train_classifier

    if config.data.level == "char":
        config.data.level = "word"  # texts are classified from their words
    sets, source = _labelled_source(config, reporter.print)
    splits = split_examples(sets, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction,
                            seed=config.train.seed)
    data = prepare_classify_data(config, splits, source=source, log=reporter.print)
    if resume is not None:
        _same_tokenizer(data.tokenizer, resume.folder)
    result = _run(lambda stop: train_classifier(config, data, out_dir=out, reporter=reporter, stop=stop,
                                                resume=resume), config, out, old, reporter)
    if isinstance(result, int):
        return result
    if result.test is not None:
        (out / "test_metrics.json").write_text(json.dumps(result.test, indent=2) + "\n", encoding="utf-8")
        if not reporter.quiet:
            stderr.print(f"test accuracy {result.test['accuracy']:.4f} on {result.test['examples']} examples "
                         f"(best validation accuracy {result.best_val_accuracy:.4f}); "
                         f"details in {out}/test_metrics.json")
    return 0


def _train_echo(config: RunConfig, out: Path, old: list[Path], reporter, resume=None) -> int:
    from rnnkit.console import stderr
    from rnnkit.training.echo import train_echo

    if config.data.text or config.data.corpus:
        raise RnnkitError("--task echo generates its own series; drop --text/--corpus "
                          "(shape it with --series-length, --echo-step, --symbols)")
    result = _run(lambda stop: train_echo(config, out_dir=out, reporter=reporter, stop=stop, resume=resume),
                  config, out, old, reporter)
    if isinstance(result, int):
        return result
    if not reporter.quiet:
        best = result.history and max((r.get("val_accuracy", 0.0) for r in result.history), default=0.0)
        stderr.print(f"checkpoints in {out}/checkpoints (best validation accuracy {best:.4f}); "
                     f"draw the run with `rnnkit plot {out}`")
    return 0


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # A JSON string is a TOML basic string, except that TOML also forbids a raw DEL character.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _to_toml(config: RunConfig) -> str:
    """The run's full configuration as a recipe that `rnnkit train --config` accepts."""
    data = config.to_dict()
    lines = ["# the full configuration of this run; re-run it with `rnnkit train --config THIS_FILE`"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in data.items() if k not in SECTIONS and v is not None]
    for section in SECTIONS:
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in data[section].items() if v is not None]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- generate


_TASK_NAMES = {"language_model": "language model", "classify": "classifier", "echo": "echo-task model"}


def _load(path: str, device: str, *, task: str | None = None, command: str = ""):
    """Load a checkpoint; with ``task``, refuse one trained for another task (its model cannot do the job)."""
    from rnnkit.checkpoint import load_checkpoint
    from rnnkit.runtime import resolve_device

    ckpt = load_checkpoint(path, device=resolve_device(device))
    if task is not None and ckpt.task != task:
        have = _TASK_NAMES.get(ckpt.task, ckpt.task)
        raise RnnkitError(f"{path} holds a {have} checkpoint, but `rnnkit {command}` needs a "
                          f"{_TASK_NAMES[task]}; pass a run trained with --task {task}")
    return ckpt


def _encode_prime(tokenizer, prime: str, unknown: str | None) -> list[int]:
    from rnnkit.console import stderr
    from rnnkit.inference import encode_prime

    encoded = encode_prime(tokenizer, prime, unknown=unknown)
    if encoded.unknown:
        what = "mapped to <unk>" if (unknown or tokenizer.default_unknown) == "unk" else "skipped"
        stderr.print(f"warning: {what} {len(encoded.unknown)} piece(s) of the prime not in the vocabulary: "
                     + " ".join(repr(c) for c in encoded.unknown[:8]))
    return encoded.ids


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from rnnkit.config import generation_window
    from rnnkit.generation import check_sampling, generate
    from rnnkit.inference import StreamText, continuation
    from rnnkit.runtime import set_threads

    for temperature in args.temperature:
        check_sampling(temperature=temperature, top_k=args.top_k, top_p=args.top_p)
    if args.length < 0:
        raise RnnkitError(f"--length must be >= 0, got {args.length}")
    if args.num_samples < 1:
        raise RnnkitError(f"--num-samples must be >= 1, got {args.num_samples}")
    set_threads(args.threads)
    ckpt = _load(args.checkpoint, args.device, task="language_model", command="generate")
    tok = ckpt.tokenizer
    prime_text = args.prime if args.prime is not None else ckpt.meta.get("state", {}).get("default_prime", "\n")
    prime = _encode_prime(tok, prime_text, args.unknown)
    seed = args.seed if args.seed is not None else int(torch.seed() % 2**31)
    out = sys.stdout
    headers = len(args.temperature) > 1 or args.num_samples > 1
    for temperature in args.temperature:
        gen = torch.Generator().manual_seed(seed)
        steps = generate(ckpt.model, prime, length=args.length, temperature=temperature, top_k=args.top_k,
                         top_p=args.top_p, num_samples=args.num_samples, generator=gen,
                         window=generation_window(ckpt.run_config))
        if args.num_samples == 1:
            if headers:
                out.write(f"----- temperature {temperature:g} -----\n")
            stream = StreamText(tok, prime, echo=not args.continuation_only)
            out.write(stream.start())
            for ids in steps:  # stream each token as soon as it exists
                out.write(stream.push(ids.tolist()))
                out.flush()
            out.write("\n")
        else:
            columns = torch.stack(list(steps), dim=1).tolist() if args.length else [[]] * args.num_samples
            for i, ids in enumerate(columns, 1):
                out.write(f"----- temperature {temperature:g}, sample {i} -----\n")
                out.write((continuation(tok, prime, ids) if args.continuation_only else tok.decode(prime + ids))
                          + "\n")
        out.flush()
    return 0


# ---------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    from rnnkit.data import corpora
    from rnnkit.runtime import set_threads
    from rnnkit.training.evaluate import evaluate_lm
    from rnnkit.training.metrics import lm_metrics

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 0:
            raise RnnkitError(f"{flag} must be positive (or 0 for the training value), got {value}")
    set_threads(args.threads)
    ckpt = _load(args.checkpoint, args.device)
    if ckpt.task == "echo":
        return _eval_echo(args, ckpt)
    if sum(map(bool, (args.text, args.corpus, args.data))) != 1:
        raise RnnkitError("pass exactly one of --text/--data PATH or --corpus NAME to evaluate on")
    if ckpt.task == "classify":
        return _eval_classifier(args, ckpt)
    if args.data:
        args.text = args.data
    from rnnkit.console import stderr
    from rnnkit.data.lm_data import encode_text

    # Streamed into a memory-mapped ids file: a text of any size.
    encoded = encode_text(ckpt.tokenizer, args.text or corpora.fetch(args.corpus),
                          encoding=args.encoding if args.text else "utf-8", unknown=args.unknown,
                          what="evaluation text", log=stderr.print, live=stderr.is_terminal)
    ids, unknown = encoded.ids, encoded.unknown
    if unknown:
        stderr.print(f"note: {unknown} word(s) of the text are not in the vocabulary and count as <unk>")
    if len(ids) < 2:
        raise RnnkitError("the evaluation text needs at least 2 known tokens")
    run = ckpt.run_config
    batch_size = args.batch_size or run.data.batch_size
    seq_len = args.seq_len or run.data.seq_len
    loss, count, accuracy = evaluate_lm(ckpt.model, ids, batch_size=batch_size, seq_len=seq_len, window=run.data.window,
                                        max_tokens=max(args.max_tokens, 0))
    chars = round(count * encoded.chars / len(ids))
    metrics = {**lm_metrics(loss, tokens=count, chars=chars), "accuracy": accuracy}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.3f}  "
              f"bits/char {metrics['bits_per_char']:.4f}  accuracy {accuracy:.4f}  tokens {metrics['tokens']}")
    return 0


def _eval_echo(args: argparse.Namespace, ckpt) -> int:
    """An echo model is scored on a fresh series of its own task (seeded by --seed)."""
    from rnnkit.training.echo import evaluate_echo, streams_for

    if args.text or args.corpus or args.data:
        raise RnnkitError("an echo checkpoint is evaluated on a fresh generated series; drop --text/--corpus/--data")
    streams = streams_for(ckpt.run_config, seed=args.seed)
    result = evaluate_echo(ckpt.model, streams, streams.series(), device=next(ckpt.model.parameters()).device)
    metrics = {"loss": result.loss, "accuracy": result.accuracy, "scored_steps": result.scored, "seed": args.seed}
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"loss {result.loss:.4f}  accuracy {result.accuracy:.4f} on {result.scored} steps of a fresh series "
              f"(seed {args.seed})")
    return 0


# ---------------------------------------------------------------- plot


def cmd_plot(args: argparse.Namespace) -> int:
    from rnnkit import plots

    run = Path(args.run_dir)
    records = plots.read_metrics(run)
    out = Path(args.out) if args.out else run / "plots" / "curves.png"
    written = [plots.plot_run(records, out, title=run.resolve().name)]
    if not args.no_echo and (run / "checkpoints").is_dir():
        ckpt = _load(str(run), "cpu")
        if ckpt.task == "echo":
            from rnnkit.training.echo import evaluate_echo, streams_for

            d = ckpt.run_config.data
            streams = streams_for(ckpt.run_config, seed=args.seed)
            result = evaluate_echo(ckpt.model, streams, streams.series(), device=next(ckpt.model.parameters()).device)
            steps = [r["step"] for r in records if isinstance(r.get("loss"), (int, float))]
            losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
            echo_path = out.with_name(f"{out.stem}-echo.png") if args.out else out.with_name("echo.png")
            written.append(plots.plot_echo(
                echo_path, losses=(steps, losses), x=result.x.numpy(), y=result.y.numpy(),
                predicted=result.predicted.numpy(), symbols=d.symbols, offset=result.offset,
                title=f"{run.resolve().name}: accuracy {result.accuracy:.4f} on a fresh series (last window shown)"))
    for path in written:
        print(path)
    return 0


# ---------------------------------------------------------------- compare-sampling


def cmd_compare_sampling(args: argparse.Namespace) -> int:
    from rnnkit.training.compare import CompareReporter, PrintReporter, compare_sampling

    config = _config_from_args(args)
    result = compare_sampling(
        config,
        max_chars=args.max_chars,
        every=args.every,
        reporter=CompareReporter() if args.quiet else PrintReporter(sys.stderr),
        plot_path=args.plot,
    )
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result.table())
    if result.plot_path is not None and not args.quiet:
        print(f"plot written to {result.plot_path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- classify


def _read_texts(path: str, text_column: str) -> list[str]:
    """One text per line, or the text column of a TSV/CSV file with a header."""
    from rnnkit.data import corpora
    from rnnkit.data.classification import read_texts

    p = Path(path)
    if p.suffix.lower() in (".tsv", ".csv"):
        return read_texts(p, text_column=text_column)
    lines = [line for line in corpora.read_text(p).split("\n") if line.strip()]
    if not lines:
        raise RnnkitError(f"{p} has no texts to classify")
    return lines


def cmd_classify(args: argparse.Namespace) -> int:
    from rnnkit.console import stderr
    from rnnkit.inference import classify_texts
    from rnnkit.runtime import set_threads

    if bool(args.texts) == bool(args.file):
        raise RnnkitError("give texts to classify as arguments, or --file FILE (not both)")
    set_threads(args.threads)
    ckpt = _load(args.checkpoint, args.device, task="classify", command="classify")
    labels = ckpt.meta["labels"]
    texts = args.texts or _read_texts(args.file, args.text_column)
    run = ckpt.run_config.data
    probs, index = classify_texts(ckpt.model, ckpt.tokenizer, labels, texts, max_len=run.max_len,
                                  truncate=run.truncate, log=lambda m: stderr.print(f"warning: {m}"))
    out = sys.stdout
    for i, p in zip(index, probs, strict=True):
        k = int(p.argmax())
        line = f"{labels[k]}\t{p[k]:.4f}\t{texts[i]}"
        if args.all:
            line += "\t" + "  ".join(f"{label} {q:.4f}" for label, q in zip(labels, p, strict=True))
        out.write(line + "\n")
    return 0


def _eval_classifier(args: argparse.Namespace, ckpt) -> int:
    from rnnkit.data.classification import encode_examples, read_labelled
    from rnnkit.training.classify import evaluate_classifier

    path = args.data or args.text
    if args.corpus:
        from rnnkit.data import corpora

        path = corpora.fetch(args.corpus)
    run = ckpt.run_config.data
    sets = read_labelled(path, label_column=args.label_column or run.label_column,
                         text_column=args.text_column or run.text_column, encoding=args.encoding, min_classes=1)
    examples = sets.get("test") or [e for group in sets.values() for e in group]
    labels = ckpt.meta["labels"]
    encoded = encode_examples(examples, tokenizer=ckpt.tokenizer, labels=labels, max_len=run.max_len,
                              truncate=run.truncate, unknown_label=args.unknown_label)
    report = evaluate_classifier(ckpt.model, encoded, labels).report()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"accuracy {report['accuracy']:.4f} on {report['examples']} examples (loss {report['loss']:.4f})")
    print(f"{'label':<16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    for label, m in report["per_class"].items():
        print(f"{label:<16} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8}")
    print("confusion matrix (rows: true, columns: predicted): " + ", ".join(labels))
    for label, row in zip(labels, report["confusion_matrix"]["rows_true_columns_predicted"], strict=True):
        print(f"{label:<16} " + " ".join(f"{c:>8}" for c in row))
    return 0


# ---------------------------------------------------------------- vocab


def cmd_vocab(args: argparse.Namespace) -> int:
    from rnnkit.checkpoint import load_tokenizer

    tok = load_tokenizer(args.checkpoint)
    counts = tok.counts or [None] * tok.vocab_size
    rows = [(i, tok.token(i), counts[i]) for i in range(tok.vocab_size)]
    if args.sort == "count" and tok.counts:
        rows.sort(key=lambda r: -r[2])
    shown = rows[: args.top] if args.top else rows
    if args.json:
        print(json.dumps({"level": tok.kind, "size": tok.vocab_size,
                          "tokens": [{"id": i, "token": t, "count": c} for i, t, c in shown]}, ensure_ascii=False))
        return 0
    total = sum(c for c in counts if c) or None
    print(f"# {tok.kind} vocabulary, {tok.vocab_size} tokens" + (f", {total:,} in the training text" if total else ""))
    print(f"{'id':>6}  {'count':>10}  {'share':>6}  token")
    for i, token, count in shown:
        share = f"{100 * count / total:5.2f}%" if total and count is not None else "     -"
        print(f"{i:>6}  {count if count is not None else '-':>10}  {share}  {token!r}")
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more (--top 0 shows all)")
    return 0


# ---------------------------------------------------------------- serve

SERVE_EXTRA = ("fastapi", "uvicorn", "starlette", "pydantic")


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from rnnkit import server
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise RnnkitError(f"`rnnkit serve` needs the serve extra ({exc.name} is missing): "
                          "pip install 'rnnkit[serve]'") from None
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    if not 0 <= args.port <= 65535:
        raise RnnkitError(f"--port must be in 0..65535, got {args.port}")
    server.serve(args.checkpoint, host=args.host, port=args.port, limits=limits, workers=args.workers,
                 threads=args.threads, log_level=args.log_level)
    return 0


# ---------------------------------------------------------------- corpora


def cmd_corpora(args: argparse.Namespace) -> int:
    from rnnkit.console import stderr
    from rnnkit.data import corpora

    if args.action == "list":
        for c in corpora.list_corpora():
            cached = corpora.cached_path(c.name)
            state = f"cached at {cached}" if cached else "not fetched"
            print(f"{c.name:<24} {c.size_hint:>8}  {c.description}  [{c.licence}; {state}]")
        return 0
    names = args.names or []
    if not names:
        raise RnnkitError("name the corpora to fetch, e.g. `rnnkit corpora fetch shakespeare`")
    for name in names:
        path = corpora.fetch(name, force=args.force, log=lambda m: stderr.print(m))
        print(path)
    return 0


# ---------------------------------------------------------------- parser


class _UsageError(Exception):
    """A command line argparse could not parse; main() prints it like any other user error."""


class _Parser(argparse.ArgumentParser):
    # argparse would print the whole usage (dozens of train flags) before the one line that
    # matters; users get that line and a pointer to --help instead, the same as for any error.
    def error(self, message: str) -> typing.NoReturn:
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnkit",
        description="Train, evaluate and sample from recurrent language models (RNN, GRU, LSTM).",
    )
    parser.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train a model on a text file, folder or named corpus",
                           description="Train a language model. Options come from defaults, then --config, "
                                       "then --set, then the flags given.")
    train.add_argument("--config", metavar="TOML", help="read every option from a TOML recipe (flags override it)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.eval_every=100 (repeatable)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped or killed run from its last checkpoint, exactly as if it had not "
                            "stopped (may change only when it stops and saves: --max-steps, --max-time, "
                            "--epochs, --save-every...)")
    train.add_argument("--quiet", action="store_true", help="print only errors")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)

    cmp = sub.add_parser(
        "compare-sampling",
        help="train one model with random and one with sequential sampling, side by side (the d2l experiment)",
        description="Train two copies of one model on the same text, one with random windows (state reset every "
                    "batch) and one with sequential streams (state carried and detached), one epoch of each in "
                    "turn; every --every epochs print the perplexity (exp of the epoch's mean training loss), "
                    "the validation perplexity, the training time and greedy continuations of "
                    "--sample-prefixes. Options come from defaults, then --config, then --set, then the flags.",
    )
    cmp.add_argument("--config", metavar="TOML", help="read every option from a TOML recipe (flags override it)")
    cmp.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override any config key, e.g. --set train.lr=50 (repeatable)")
    cmp.add_argument("--every", type=int, default=50, metavar="K",
                     help="report (and sample) every K epochs, and after the last (default: 50)")
    cmp.add_argument("--max-chars", type=int, default=10_000, metavar="N",
                     help="train on the first N characters of the text only, as d2l does with its lyrics "
                          "(0: all; default: 10000)")
    cmp.add_argument("--plot", metavar="FILE.png", default=None,
                     help="write both perplexity curves (by epoch and by training time) to this PNG")
    cmp.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    cmp.add_argument("--quiet", action="store_true", help="print only the result")
    _add_config_flags(cmp)
    cmp.set_defaults(func=cmd_compare_sampling)

    gen = sub.add_parser("generate", help="generate text from a checkpoint",
                         description="Prime the model once with --prime, then sample one token per step.")
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")
    gen.add_argument("--prime", metavar="TEXT", help="text to start from (default: a newline)")
    gen.add_argument("--length", type=int, default=500, help="tokens to generate (default: 500)")
    gen.add_argument("--temperature", type=float, nargs="+", default=[0.8], metavar="T",
                     help="one or more sampling temperatures; 0 is greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=0, help="sample only among the k likeliest tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample only from the top-p probability mass (1: off)")
    gen.add_argument("--num-samples", type=int, default=1, help="independent samples, generated as one batch")
    gen.add_argument("--seed", type=int, default=None, help="random seed for a repeatable sample (default: random)")
    gen.add_argument("--unknown", choices=["error", "skip", "unk"], default=None,
                     help="prime pieces the model never saw: error, skip them, or map them to <unk> "
                          "(default: error for characters, unk for words)")
    gen.add_argument("--continuation-only", action="store_true", help="print only the new text, not the prime")
    gen.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per char of a checkpoint on a text")
    ev.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")
    ev.add_argument("--text", metavar="PATH", help="a text file or folder to evaluate on")
    ev.add_argument("--corpus", metavar="NAME", help="a named corpus to evaluate on")
    ev.add_argument("--data", metavar="PATH", help="labelled TSV/CSV or folder (classifiers); same as --text")
    ev.add_argument("--label-column", help="classifiers: label column (default: the training one)")
    ev.add_argument("--text-column", help="classifiers: text column (default: the training one)")
    ev.add_argument("--unknown-label", choices=["error", "skip"], default="error",
                    help="classifiers: a label the model never saw is an error, or skipped (default: error)")
    ev.add_argument("--encoding", default="utf-8", help="encoding of --text (default: utf-8)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--unknown", choices=["error", "skip", "unk"], default=None,
                    help="tokens the model never saw: error, skip them, or map them to <unk> "
                         "(default: error for characters, unk for words)")
    ev.add_argument("--batch-size", type=int, default=0, help="parallel streams (default: the training batch size)")
    ev.add_argument("--seq-len", type=int, default=0, help="window length (default: the training one)")
    ev.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (default 0: all)")
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default: auto)")
    ev.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ev.add_argument("--seed", type=int, default=0, help="echo checkpoints: seed of the fresh series (default: 0)")
    ev.set_defaults(func=cmd_eval)

    cls = sub.add_parser("classify", help="label texts with a classifier checkpoint")
    cls.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    cls.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")
    cls.add_argument("--file", metavar="PATH", help="classify one text per line, or a TSV/CSV's text column; "
                                                    "prints label<TAB>probability<TAB>text")
    cls.add_argument("--text-column", default="text", help="text column of a TSV/CSV --file (default: text)")
    cls.add_argument("--all", action="store_true", help="also show every class's probability")
    cls.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    cls.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    cls.set_defaults(func=cmd_classify)

    plot = sub.add_parser("plot", help="draw a run's loss and validation curves (and the echo figure) as PNG",
                          description="Read RUN_DIR/metrics.jsonl and draw training and validation loss and "
                                      "accuracy against steps. For an echo run, also draw the echo figure: the "
                                      "loss curve and, for each batch row, the input, target and predicted "
                                      "symbols over the last window of a fresh series. Prints the files written.")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `rnnkit train --out`")
    plot.add_argument("--out", metavar="FILE.png", help="where to write the curves (default: RUN_DIR/plots/curves.png;"
                                                         " the echo figure goes beside it)")
    plot.add_argument("--seed", type=int, default=0, help="echo runs: seed of the fresh series shown (default: 0)")
    plot.add_argument("--no-echo", action="store_true", help="echo runs: draw only the curves")
    plot.set_defaults(func=cmd_plot)

    voc = sub.add_parser("vocab", help="show a checkpoint's vocabulary with how often each token occurs")
    voc.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")
    voc.add_argument("--top", type=int, default=50, help="show this many tokens (0: all; default: 50)")
    voc.add_argument("--sort", choices=["count", "id"], default="count", help="order (default: by count)")
    voc.add_argument("--json", action="store_true", help="print one JSON object")
    voc.set_defaults(func=cmd_vocab)

    srv = sub.add_parser("serve", help="serve a checkpoint over HTTP: JSON API, streaming, sessions, a web page",
                         description="Serve one checkpoint over HTTP (needs `pip install 'rnnkit[serve]'`): "
                                     "GET / is a web page, GET /docs the API; the model is loaded once and "
                                     "requests run on a pool of worker threads.")
    srv.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port; default: 8000)")
    srv.add_argument("--workers", type=int, default=2,
                     help="threads that run model work concurrently (default: 2)")
    srv.add_argument("--threads", type=int, default=1,
                     help="torch threads per request (0: torch's default; default: 1)")
    for f in dataclasses.fields(ServeLimits):
        srv.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                         metavar="SECONDS" if f.type == "float" else "N",
                         help=f"{f.metadata['help']} (default: {f.default:g})")
    srv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                     help="server log detail on stderr; info logs every request (default: info)")
    srv.set_defaults(func=cmd_serve)

    corp = sub.add_parser("corpora", help="list or fetch the named corpora")
    corp.add_argument("action", choices=["list", "fetch"], help="list the corpora, or fetch some into the cache")
    corp.add_argument("names", nargs="*", metavar="NAME", help="corpora to fetch")
    corp.add_argument("--force", action="store_true", help="download again even when cached")
    corp.set_defaults(func=cmd_corpora)
    return parser


def _report(exc: Exception) -> int:
    # Messages quote what the user gave (paths, keys, text), which may hold line breaks.
    print("rnnkit: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        return _report(exc)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except RnnkitError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print("rnnkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `rnnkit generate | head` closed the pipe: not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
