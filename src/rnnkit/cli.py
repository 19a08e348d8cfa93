"""The ``rnnkit`` command: a thin shell over the library.

Each subcommand (``train``, ``compare-sampling``, ``generate``, ``eval``,
``classify``, ``inspect``, ``plot``, ``vocab``, ``serve``, ``export``, ``corpora``) parses its flags,
calls one library function and prints. Results go to stdout; progress,
warnings and errors go to stderr. A user mistake prints one line
``rnnkit: error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any

from rnnkit import __version__
from rnnkit.config import RunConfig, ServeLimits, all_keys, knobs
from rnnkit.errors import RnnkitError, UnknownTokens
from rnnkit.tasks import WrongTask

# ---------------------------------------------------------------- train flags


_KINDS: dict[str, dict[str, Any]] = {"bool": {"action": argparse.BooleanOptionalAction},
                                     "list": {"nargs": "+", "metavar": "TEXT"},
                                     "int": {"type": int, "metavar": "N"}, "float": {"type": float, "metavar": "X"}}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config knob, help text and choices taken from the config dataclasses."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for knob in knobs():
        if knob.section not in groups:
            groups[knob.section] = parser.add_argument_group(f"{knob.section} options" if knob.section != "run"
                                                             else "output")
        shown = f" (default: {knob.default})" if knob.default not in (None, []) else ""
        kind = {"choices": list(knob.choices)} if knob.kind == "choice" else _KINDS.get(knob.kind,
                                                                                      {"metavar": knob.metavar})
        groups[knob.section].add_argument(knob.flag, *knob.aliases, dest=knob.key, default=argparse.SUPPRESS,
                                          help=knob.help + shown, **kind)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys given as flags (dotted, e.g. ``train.lr``)."""
    keys = set(all_keys())
    return {key: value for key, value in vars(args).items() if key in keys}


def cmd_train(args: argparse.Namespace) -> int:
    from rnnkit.runtime import exact_cpu_math

    exact_cpu_math()  # before any matrix product, so that --resume continues bitwise exactly

    from rnnkit.console import ConsoleReporter, stderr
    from rnnkit.training import runs

    resume = None
    if args.resume:
        config, resume = runs.resume_config(args.resume, changes=_settings(args), recipe=bool(args.config or args.set),
                                            overwrite=args.overwrite)
    else:
        config = RunConfig.build(recipe=args.config, overrides=args.set, settings=_settings(args))
    reporter = ConsoleReporter(quiet=args.quiet)
    try:
        outcome = runs.train_run(config, resume=resume, overwrite=args.overwrite, reporter=reporter,
                                 log=reporter.print, live=reporter.live)
    finally:
        reporter.close()
    if outcome.notice:
        stderr.print(outcome.notice)
    for line in outcome.summary:
        reporter.print(line)
    return outcome.exit_code


def cmd_compare_sampling(args: argparse.Namespace) -> int:
    from rnnkit.training.compare import CompareReporter, PrintReporter, compare_sampling

    config = RunConfig.build(recipe=args.config, overrides=args.set, settings=_settings(args))
    result = compare_sampling(config, max_chars=args.max_chars, every=args.every, plot_path=args.plot,
                              reporter=CompareReporter() if args.quiet else PrintReporter(sys.stderr))
    print(json.dumps(result.to_dict(), ensure_ascii=False) if args.json else result.table())
    if result.plot_path is not None and not args.quiet:
        print(f"plot written to {result.plot_path}", file=sys.stderr)
    return 0


def _warn(message: str) -> None:
    from rnnkit.console import stderr

    stderr.print(f"warning: {message}")


def cmd_generate(args: argparse.Namespace) -> int:
    from rnnkit.inference import GenerateRequest, beam_hypotheses, generate_text, load_for
    from rnnkit.runtime import set_threads

    request = GenerateRequest(prime=args.prime, length=args.length, temperatures=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, num_samples=args.num_samples, seed=args.seed, unknown=args.unknown,
                              echo_prime=not args.continuation_only, beam=args.beam,
                              length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram)
    request.check()  # before the checkpoint is read
    if args.json and args.beam is None:
        raise RnnkitError("--json lists beam hypotheses with their scores; add --beam N (samples print as text)")
    set_threads(args.threads)
    ckpt = load_for(args.checkpoint, device=args.device, capability="generates", what="`rnnkit generate`")
    if args.json:
        print(json.dumps(beam_hypotheses(ckpt, request, warn=_warn), ensure_ascii=False))
        return 0
    for piece in generate_text(ckpt, request, warn=_warn):
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream each token as soon as it exists
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rnnkit.console import stderr
    from rnnkit.evaluation import EvalRequest, evaluate_checkpoint
    from rnnkit.inference import load_for
    from rnnkit.runtime import set_threads

    for flag, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 0:
            raise RnnkitError(f"{flag} must be positive (or 0 for the training value), got {value}")
    set_threads(args.threads)
    ckpt = load_for(args.checkpoint, device=args.device)
    if args.text and args.data:
        raise RnnkitError("pass exactly one of --text/--data PATH or --corpus NAME to evaluate on")
    request = EvalRequest(text=args.text or args.data, corpus=args.corpus, label_column=args.label_column,
                          text_column=args.text_column, unknown_label=args.unknown_label, encoding=args.encoding,
                          unknown=args.unknown, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                          max_tokens=args.max_tokens)
    report = evaluate_checkpoint(ckpt, request, log=stderr.print, live=stderr.is_terminal)
    for note in report.notes:
        stderr.print(note)
    print(json.dumps(report.metrics) if args.json else "\n".join(report.lines))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from rnnkit.plots import plot_run_dir

    for path in plot_run_dir(args.run_dir, out=args.out, seed=args.seed, task_figures=not args.no_echo):
        print(path)
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from rnnkit.inference import classify_lines, load_for, read_texts_to_classify
    from rnnkit.runtime import set_threads

    if bool(args.texts) == bool(args.file):
        raise RnnkitError("give texts to classify as arguments, or --file FILE (not both)")
    set_threads(args.threads)
    ckpt = load_for(args.checkpoint, device=args.device, capability="classifies", what="`rnnkit classify`")
    texts = args.texts or read_texts_to_classify(args.file, text_column=args.text_column)
    sys.stdout.writelines(classify_lines(ckpt, texts, all_labels=args.all, warn=_warn))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnkit.console import stderr
    from rnnkit.data.corpora import read_text
    from rnnkit.inference import load_for
    from rnnkit.runtime import set_threads
    from rnnkit.views import InspectRequest, default_out, inspect_checkpoint

    set_threads(args.threads)
    text = read_text(args.text)
    ckpt = load_for(args.checkpoint, device=args.device)
    out = None if args.no_png else Path(args.out) if args.out else default_out(ckpt.path)
    report = inspect_checkpoint(ckpt, InspectRequest(text=text, layer=args.layer, top=args.top, gates=args.gates,
                                                     max_tokens=args.max_tokens, out=out, unknown=args.unknown))
    print(json.dumps(report.data, ensure_ascii=False) if args.json else "\n".join(report.lines))
    for path in report.files:
        stderr.print(f"wrote {path}")
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from rnnkit.checkpoint import load_tokenizer
    from rnnkit.inference import vocabulary

    data, lines = vocabulary(load_tokenizer(args.checkpoint), top=args.top, sort=args.sort)
    print(json.dumps(data, ensure_ascii=False) if args.json else "\n".join(lines))
    return 0


# ---------------------------------------------------------------- serve and corpora


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
    checkpoints = server.parse_checkpoints(args.checkpoint)
    keys = server.api_keys(key=args.api_key, key_file=args.api_key_file)
    server.serve(checkpoints, host=args.host, port=args.port, limits=limits, workers=args.workers,
                 threads=args.threads, log_level=args.log_level, keys=keys, cors_origins=args.cors_origin or (),
                 shutdown_timeout=args.shutdown_timeout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rnnkit.console import stderr
    from rnnkit.export import export_checkpoint, summary
    from rnnkit.inference import load_for

    ckpt = load_for(args.checkpoint, capability="generates", what="`rnnkit export`")
    report = export_checkpoint(ckpt, args.out, form=args.format, quantize=args.quantize, overwrite=args.overwrite,
                               log=None if args.quiet else stderr.print)
    print("\n".join(summary(report)))
    return 0


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


def _recipe_args(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--config", metavar="TOML", help="read every option from a TOML recipe (flags override it)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help=f"override any config key, e.g. --set {example} (repeatable)")


def _checkpoint_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory or checkpoint folder")


def _runtime_args(parser: argparse.ArgumentParser, *, device: str) -> None:
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=device,
                        help=f"where to run (default: {device})")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


def _train_parser(sub) -> None:
    train = sub.add_parser("train", help="train a model on a text file, folder or named corpus",
                           description="Train a language model. Options come from defaults, then --config, "
                                       "then --set, then the flags given.")
    _recipe_args(train, "train.eval_every=100")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped or killed run from its last checkpoint, exactly as if it had not "
                            "stopped (may change only when it stops and saves: --max-steps, --max-time, "
                            "--epochs, --save-every...)")
    train.add_argument("--quiet", action="store_true", help="print only errors")
    _add_config_flags(train)
    train.set_defaults(func=cmd_train)


def _compare_sampling_parser(sub) -> None:
    cmp = sub.add_parser(
        "compare-sampling",
        help="train one model with random and one with sequential sampling, side by side (the d2l experiment)",
        description="Train two copies of one model on the same text, one with random windows (state reset every "
                    "batch) and one with sequential streams (state carried and detached), one epoch of each in "
                    "turn; every --every epochs print the perplexity (exp of the epoch's mean training loss), "
                    "the validation perplexity, the training time and greedy continuations of "
                    "--sample-prefixes. Options come from defaults, then --config, then --set, then the flags.",
    )
    _recipe_args(cmp, "train.lr=50")
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


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text from a checkpoint",
                         description="Prime the model once with --prime, then sample one token per step "
                                     "(or with --beam, search for the likeliest continuations).")
    _checkpoint_arg(gen)
    gen.add_argument("--prime", metavar="TEXT", help="text to start from (default: a newline)")
    gen.add_argument("--length", type=int, default=500, help="tokens to generate (default: 500)")
    gen.add_argument("--temperature", type=float, nargs="+", default=None, metavar="T",
                     help="one or more sampling temperatures; 0 is greedy (default: 0.8)")
    gen.add_argument("--top-k", type=int, default=0, help="sample only among the k likeliest tokens (0: off)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample only from the top-p probability mass (1: off)")
    gen.add_argument("--num-samples", type=int, default=1,
                     help="independent samples, generated as one batch; with --beam, the M <= N best hypotheses")
    gen.add_argument("--beam", type=int, default=None, metavar="N",
                     help="beam search instead of sampling: keep the N likeliest texts each step, print the best "
                          "(deterministic; not with --temperature/--top-k/--top-p)")
    gen.add_argument("--length-penalty", type=float, default=0.0, metavar="A",
                     help="with --beam: rank hypotheses by log-prob / length**A (0: off, 1: mean per token); "
                          "lengths differ only where --no-repeat-ngram ends a hypothesis early")
    gen.add_argument("--no-repeat-ngram", type=int, default=0, metavar="K",
                     help="with --beam: never repeat K tokens in a row of the new text (the prime does not count; "
                          "0: off); a hypothesis with no allowed next token ends there")
    gen.add_argument("--json", action="store_true",
                     help="with --beam: print one JSON object, each hypothesis with its text, tokens, total "
                          "log-probability and score")
    gen.add_argument("--seed", type=int, default=None, help="random seed for a repeatable sample (default: random)")
    gen.add_argument("--unknown", choices=["error", "skip", "unk"], default=None,
                     help="prime pieces the model never saw: error, skip them, or map them to <unk> "
                          "(default: error for characters, unk for words)")
    gen.add_argument("--continuation-only", action="store_true", help="print only the new text, not the prime")
    _runtime_args(gen, device="cpu")
    gen.set_defaults(func=cmd_generate)


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="loss, perplexity and bits per char of a checkpoint on a text")
    _checkpoint_arg(ev)
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
    _runtime_args(ev, device="auto")
    ev.add_argument("--seed", type=int, default=0, help="echo checkpoints: seed of the fresh series (default: 0)")
    ev.set_defaults(func=cmd_eval)


def _classify_parser(sub) -> None:
    cls = sub.add_parser("classify", help="label texts with a classifier checkpoint")
    cls.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    _checkpoint_arg(cls)
    cls.add_argument("--file", metavar="PATH", help="classify one text per line, or a TSV/CSV's text column; "
                                                    "prints label<TAB>probability<TAB>text")
    cls.add_argument("--text-column", default="text", help="text column of a TSV/CSV --file (default: text)")
    cls.add_argument("--all", action="store_true", help="also show every class's probability")
    _runtime_args(cls, device="cpu")
    cls.set_defaults(func=cmd_classify)


def _plot_parser(sub) -> None:
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


def _inspect_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="which hidden units track quotes, brackets, line position...; which words "
                                         "moved a classifier",
                         description="Language models: read --text token by token with the stepwise forward, rank "
                                     "the units of --layer by their correlation with features of the text and draw "
                                     "units.png and heatmap.png. Classifiers: per text (one a line), how each token "
                                     "changed the predicted class's probability, drawn as words.png.")
    _checkpoint_arg(ins)
    ins.add_argument("--text", required=True, metavar="FILE", help="the text to read (classifiers: one text a line)")
    ins.add_argument("--layer", type=int, default=None, metavar="L",
                     help="layer to inspect, from 0 (default: the top one)")
    ins.add_argument("--top", type=int, default=5, metavar="K", help="units per feature, and units drawn (default: 5)")
    ins.add_argument("--gates", action="store_true", help="rank the gates' units too (not for a vanilla RNN)")
    ins.add_argument("--max-tokens", type=int, default=2000, metavar="N",
                     help="read only the first N tokens (0: all; default: 2000)")
    ins.add_argument("--out", metavar="DIR", help="folder for the PNGs (default: RUN/inspect)")
    ins.add_argument("--no-png", action="store_true", help="print the ranking only, draw nothing")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--unknown", choices=["error", "skip", "unk"], default=None,
                     help="pieces of the text the model never saw (default: error for characters, unk for words)")
    _runtime_args(ins, device="cpu")
    ins.set_defaults(func=cmd_inspect)


def _vocab_parser(sub) -> None:
    voc = sub.add_parser("vocab", help="show a checkpoint's vocabulary with how often each token occurs")
    _checkpoint_arg(voc)
    voc.add_argument("--top", type=int, default=50, help="show this many tokens (0: all; default: 50)")
    voc.add_argument("--sort", choices=["count", "id"], default="count", help="order (default: by count)")
    voc.add_argument("--json", action="store_true", help="print one JSON object")
    voc.set_defaults(func=cmd_vocab)


def _serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="serve checkpoints over HTTP: JSON API, streaming, sessions, a web page",
                         description="Serve one or several checkpoints over HTTP (needs `pip install "
                                     "'rnnkit[serve]'`): GET / is a web page, GET /docs the API; each model is "
                                     "loaded once and requests run on a pool of worker threads. SIGTERM stops "
                                     "accepting connections, lets running requests finish and exits 0.")
    srv.add_argument("--checkpoint", required=True, action="append", metavar="[NAME=]DIR",
                     help="a run directory or checkpoint folder, optionally named (default name: the run "
                          "directory's); repeat to serve several; the first of each task is its default")
    srv.add_argument("--host", default=None,
                     help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port; default: 8000)")
    srv.add_argument("--api-key", metavar="KEY",
                     help="require this key as 'Authorization: Bearer KEY' on every endpoint but /health "
                          "(others on this machine can read a command line: prefer RNNKIT_API_KEY or "
                          "--api-key-file)")
    srv.add_argument("--api-key-file", metavar="FILE",
                     help="accept each key in FILE, one per line (# starts a comment); adds to --api-key and "
                          "$RNNKIT_API_KEY")
    srv.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                     help="let web pages from ORIGIN (e.g. https://example.org) call the API; repeatable "
                          "(default: none, so only the server's own page can)")
    srv.add_argument("--workers", type=int, default=2,
                     help="threads that run model work concurrently (default: 2)")
    srv.add_argument("--threads", type=int, default=1,
                     help="torch threads per request (0: torch's default; default: 1)")
    for f in dataclasses.fields(ServeLimits):
        srv.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                         metavar=f.metadata.get("metavar", "N"),
                         help=f"{f.metadata['help']} (default: "
                              f"{f'{f.default:g}' if isinstance(f.default, float) else f.default})")
    srv.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM or Ctrl-C: how long running requests may take to finish (default: 30)")
    srv.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                     help="server log detail on stderr; info logs every request, never a key (default: info)")
    srv.set_defaults(func=cmd_serve)


def _export_parser(sub) -> None:
    exp = sub.add_parser("export", help="export a language model to ONNX (step + prefill graphs) or a web page",
                         description="Write an ONNX step graph and prefill graph, the tokenizer, a README and a "
                                     "numpy + onnxruntime driver (--format onnx), or a static page that generates "
                                     "text in the browser with onnxruntime-web (--format web).")
    _checkpoint_arg(exp)
    exp.add_argument("--format", choices=["onnx", "web"], default="onnx",
                     help="onnx: graphs + driver; web: index.html + model.onnx + onnxruntime-web (default: onnx)")
    exp.add_argument("--out", required=True, metavar="DIR", help="the folder to create (must not exist yet)")
    exp.add_argument("--quantize", choices=["int8"], default=None,
                     help="int8: onnxruntime dynamic quantisation of the weights (smaller; slightly different)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    exp.add_argument("--quiet", action="store_true", help="print only the summary")
    exp.set_defaults(func=cmd_export)


def _corpora_parser(sub) -> None:
    corp = sub.add_parser("corpora", help="list or fetch the named corpora")
    corp.add_argument("action", choices=["list", "fetch"], help="list the corpora, or fetch some into the cache")
    corp.add_argument("names", nargs="*", metavar="NAME", help="corpora to fetch")
    corp.add_argument("--force", action="store_true", help="download again even when cached")
    corp.set_defaults(func=cmd_corpora)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnkit",
        description="Train, evaluate and sample from recurrent language models (RNN, GRU, LSTM).",
    )
    parser.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_train_parser, _compare_sampling_parser, _generate_parser, _eval_parser, _classify_parser,
                _inspect_parser, _plot_parser, _vocab_parser, _serve_parser, _export_parser, _corpora_parser):
        add(sub)
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
        from rnnkit.models.gemm import cpu_gemm

        cpu_gemm()  # a bad RNNKIT_GEMM fails here, before a run directory exists
        return args.func(args)
    except WrongTask as exc:
        return _report(RnnkitError(f"{exc}; pass a run trained with --task {exc.needed}"))
    except UnknownTokens as exc:
        return _report(RnnkitError(f"{exc}; remove them or pass --unknown skip"))
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
    from rnnkit.runtime import exit_process

    exit_process(main())
