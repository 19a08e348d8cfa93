"""ONNX export of a language-model checkpoint: a step graph, a prefill graph, the tokenizer and two drivers.

``rnnkit export --format onnx`` writes a folder any ONNX runtime can drive:

* ``step.onnx``: ``(ids (B, 1) int64, state_0 .. state_{n-1} (L, B, H) float32)
  -> (logits (B, 1, V), next_state_0 ..)``: the model's own ``forward`` traced
  at T = 1, with the state as separate tensors (an LSTM has two, ``h`` and
  ``c``; every other cell one). Batch is dynamic.
* ``prefill.onnx``: the same inputs with ids (B, T) and logits (B, T, V), batch
  and length dynamic: an ONNX ``Scan`` over the length axis whose body is the
  step graph, so it is the same function token by token, whatever the model's
  internals (the exporter unrolls Python time loops, so a traced window would
  fix T).
* ``tokenizer.json`` (what a driver needs to turn text into ids and back),
  ``export.json`` (graph names, state layout, default prime), ``README.md``
  and ``generate_onnx.py``, a driver that imports only numpy and onnxruntime.

``--format web`` writes a static page instead (:mod:`rnnkit.web_runtime`
provides onnxruntime-web). ``--quantize int8`` applies onnxruntime's dynamic
quantisation to the graphs.

The TorchScript exporter (``dynamo=False``) is used on purpose: it maps
``nn.LSTM``/``GRU``/``RNN`` to ONNX's own recurrent operators and exports a
tiny model in a fraction of a second, where the dynamo exporter took about
4 s per graph for the same result (measured with torch 2.13, onnxscript 0.7).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnkit.errors import RnnkitError, describe_os_error
from rnnkit.files import atomic_folder

FORMATS = ("onnx", "web")
QUANTIZE = ("int8",)
OPSET = 17
EXPORT_FORMAT_VERSION = 1
Log = Callable[[str], None]


class StateAsTensors(nn.Module):
    """``forward(ids, *state) -> (logits, *state)``: any model's ``forward(ids, state)``, state spread out.

    ONNX graphs take and return flat tensors, not tuples; this wrapper is all
    the export adds, so whatever the model computes (its cells, blocks, head)
    is what the graph computes.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, new_state = self.model(ids, tuple(state))  # (B, T, V), n x (L, B, H)
        return (logits, *new_state)


def _check_importable() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RnnkitError(f"ONNX export needs the `export` extra ({exc.name} is missing); "
                          "install it with: pip install 'rnnkit[export]'") from None


def exportable_model(ckpt) -> nn.Module:
    """The checkpoint's model in eval mode, rebuilt with the sequential scan (ONNX has no logcumsumexp).

    The scan setting picks an algorithm, not a function (the two are tested
    equal), so the weights load unchanged.
    """
    from rnnkit import tasks

    model_config = ckpt.run_config.model
    if model_config.scan != "sequential":
        model_config = dataclasses.replace(model_config, scan="sequential")
    model = tasks.get(ckpt.task).build_model(model_config, ckpt.tokenizer.vocab_size, ckpt.meta)
    model.load_state_dict(ckpt.model.state_dict())
    return model.float().eval()


def state_names(count: int) -> tuple[list[str], list[str]]:
    """The graph's state inputs and outputs: ``state_0``.. and ``next_state_0``.."""
    return [f"state_{i}" for i in range(count)], [f"next_state_{i}" for i in range(count)]


def export_step(model: nn.Module, target: Path) -> dict[str, Any]:
    """Write the step graph (ids (B, 1)) to ``target``; return the state layout it takes."""
    # Traced at B = 2 so that nothing specialises on a batch of one.
    state = tuple(s.float() for s in model.initial_state(2))  # n x (L, 2, H)
    ids = torch.zeros(2, 1, dtype=torch.long)
    inputs, outputs = state_names(len(state))
    axes = {"ids": {0: "batch"}, "logits": {0: "batch"}, **{n: {1: "batch"} for n in inputs + outputs}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter's deprecation notice, the fused RNNs' batch-size advice and the tracer's
        # notes on nn.LSTM's own input checks: the tests run every graph at other batch sizes and lengths.
        warnings.simplefilter("ignore")
        torch.onnx.export(StateAsTensors(model), (ids, *state), str(target), dynamo=False, opset_version=OPSET,
                          input_names=["ids", *inputs], output_names=["logits", *outputs], dynamic_axes=axes)
    layers, _, hidden = state[0].shape
    return {"count": len(state), "layers": int(layers), "hidden": int(hidden)}


def prefill_from_step(step_path: Path, target: Path, *, state_count: int) -> None:
    """Write the prefill graph: an ONNX ``Scan`` over the T axis of ids (B, T) whose body is the step graph.

    The body takes the carried state and one column of ids (B,), unsqueezes it
    to the step's (B, 1), runs the step's nodes and squeezes logits (B, 1, V)
    to (B, V); Scan stacks those on axis 1 into (B, T, V). The weights move to
    the outer graph (a body reads outer names), and the step's own value names
    get a prefix so that none shadows an outer one.
    """
    import onnx
    from onnx import TensorProto, helper

    step = onnx.load(str(step_path))
    graph = step.graph
    weights = {init.name for init in graph.initializer}
    inputs, outputs = state_names(state_count)

    def inner(name: str) -> str:
        return name if name in weights or name == "" else f"step/{name}"

    nodes = [helper.make_node("Constant", [], ["step/axis"], value=helper.make_tensor("axis", TensorProto.INT64,
                                                                                      [1], [1])),
             helper.make_node("Unsqueeze", ["ids_t", "step/axis"], [inner("ids")])]
    for node in graph.node:
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise RnnkitError(f"the step graph has a {node.op_type} node with a subgraph; the prefill graph cannot "
                              "wrap it")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [inner(n) for n in node.input]
        copy.output[:] = [inner(n) for n in node.output]
        nodes.append(copy)
    nodes.append(helper.make_node("Squeeze", [inner("logits"), "step/axis"], ["logits_t"]))
    state_type = [helper.make_tensor_value_info(inner(n), TensorProto.FLOAT, None) for n in inputs]
    body = helper.make_graph(
        nodes, "step_body",
        [*state_type, helper.make_tensor_value_info("ids_t", TensorProto.INT64, ["batch"])],
        [*(helper.make_tensor_value_info(inner(n), TensorProto.FLOAT, None) for n in outputs),
         helper.make_tensor_value_info("logits_t", TensorProto.FLOAT, None)],
    )
    scan = helper.make_node("Scan", [*inputs, "ids"], [*outputs, "logits"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_output_axes=[1])
    state_shape = ["layers", "batch", "hidden"]
    outer = helper.make_graph(
        [scan], "prefill",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "length"]),
         *(helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in inputs)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "length", "vocab"]),
         *(helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in outputs)],
        initializer=list(graph.initializer),
    )
    model = helper.make_model(outer, opset_imports=list(step.opset_import), producer_name="rnnkit")
    model.ir_version = step.ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def driver_tokenizer(tokenizer) -> dict[str, Any]:
    """tokenizer.json of an export: the kind, id -> token and token -> id, and what the kind needs besides."""
    tokens = [tokenizer.token(i) for i in range(tokenizer.vocab_size)]
    data: dict[str, Any] = {"kind": tokenizer.kind, "lowercase": tokenizer.lowercase, "id_to_token": tokens,
                            "token_to_id": {t: i for i, t in enumerate(tokens)}}
    if tokenizer.kind == "word":
        data["word_rules"] = tokenizer.rules()
    if tokenizer.kind == "bpe":
        data["hf_tokenizer"] = tokenizer.to_dict()["tokenizer"]  # the `tokenizers` library's own JSON
    return data


@dataclass
class ExportReport:
    """What an export wrote: the folder, each file's size in bytes, and the quantised graphs' float sizes."""

    out: Path
    sizes: dict[str, int]
    float_sizes: dict[str, int]


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def quantize_int8(path: Path) -> int:
    """Replace the graph at ``path`` by its int8 dynamic quantisation (int8 weights, activations quantised at
    each call); return the float graph's size in bytes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    size = path.stat().st_size
    floated = path.with_suffix(".float.onnx")
    path.rename(floated)
    logging.disable(logging.WARNING)  # its advice to pre-process, given for every model on the root logger
    try:
        quantize_dynamic(str(floated), str(path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    floated.unlink()
    return size


def write_graphs(ckpt, folder: Path, *, quantize: str | None, log: Log) -> tuple[dict[str, Any], dict[str, int]]:
    """step.onnx and prefill.onnx in ``folder``; their state layout and, when quantised, the float sizes."""
    model = exportable_model(ckpt)
    log("exporting the step graph ...")
    layout = export_step(model, folder / "step.onnx")
    float_sizes = {}
    if quantize == "int8":
        # The step is quantised first and the prefill built from it: the quantiser does not reach into a
        # Scan's body, and this way both graphs compute the same quantised function.
        log("quantising to int8 (onnxruntime dynamic quantisation) ...")
        float_sizes["step.onnx"] = quantize_int8(folder / "step.onnx")
    log("building the prefill graph (a Scan over the step) ...")
    prefill_from_step(folder / "step.onnx", folder / "prefill.onnx", state_count=layout["count"])
    if quantize == "int8":
        float_sizes["prefill.onnx"] = float_sizes["step.onnx"]  # the same weights, the same float size
    return layout, float_sizes


def export_meta(ckpt, layout: dict[str, Any], *, graphs: dict[str, str], quantize: str | None) -> dict[str, Any]:
    """export.json: which graph is which, the state layout, and what generation starts from."""
    from rnnkit import __version__
    from rnnkit.config import generation_window

    inputs, outputs = state_names(layout["count"])
    cell = ckpt.run_config.model.cell
    return {"format": "rnnkit-onnx", "format_version": EXPORT_FORMAT_VERSION, "rnnkit": __version__,
            "graphs": graphs, "opset": OPSET, "quantize": quantize, "cell": cell,
            "vocab_size": ckpt.tokenizer.vocab_size,
            "state": {**layout, "inputs": inputs, "outputs": outputs,
                      "meaning": ["h", "c"] if layout["count"] == 2 else ["h"]},
            "default_prime": ckpt.meta.get("state", {}).get("default_prime", "\n"),
            "window": generation_window(ckpt.run_config)}


_README = """# rnnkit ONNX export of `{source}`

A language model (cell {cell}, {layers} layer(s) x {hidden} units, {vocab} {kind} tokens{quantized}),
exported by rnnkit {version} as ONNX (opset {opset}).

## Files

| file | what |
| --- | --- |
{files}
## The graphs

Every graph takes `ids` (int64) and the recurrent state as {count} float32 tensor(s)
{inputs}, each (layers={layers}, batch, hidden={hidden}) ({meaning}; zeros at the start of
a text), and returns `logits` (float32, batch x length x {vocab}, unnormalised next-token scores)
and the state after the last token, {outputs}, same shapes. Batch is dynamic everywhere.

{graphs}

Generation: read the prime once (the prefill graph, or one step per token, from a zero state), take the last row of logits, pick a token
(temperature 0: argmax; else sample softmax(logits / temperature)), feed it to the step graph with the
state it returned, repeat. {window}

## Tokenizer

`tokenizer.json`: `kind` ({kind}), `lowercase` (lower-case text before encoding), `id_to_token`,
`token_to_id`; word exports add `word_rules` (the split pattern, `<unk>`/`<eos>` ids and the spacing rules
of decoding), BPE exports `hf_tokenizer` (the `tokenizers` library's JSON). `export.json` has the state
layout and the default prime ({prime!r}).

## Run it

{run}
"""

_RUN_ONNX = """With numpy and onnxruntime only (`pip install numpy onnxruntime`; BPE also `tokenizers`):

    python {folder}/generate_onnx.py --prime "some text" --length 200 --temperature 0

prints what `rnnkit generate --prime "some text" --length 200 --temperature 0` prints."""

_RUN_WEB = """A static page: serve the folder over HTTP (a `file://` page cannot load the WASM runtime) and open it:

    python -m http.server -d {folder} 8000

then open http://127.0.0.1:8000/ , type a prime, pick the length and temperature and press Generate.
onnxruntime-web {ort} (single-threaded WASM, as a plain static server allows) runs the model in the page."""

_GRAPHS = {
    "onnx": ("- `step.onnx`: `ids` (batch, 1) -> `logits` (batch, 1, V): one token per row.\n"
             "- `prefill.onnx`: `ids` (batch, length) -> `logits` (batch, length, V): a whole window, length\n"
             "  dynamic (an ONNX Scan over the step: the same function, token by token)."),
    "web": "- `model.onnx`: the step graph, `ids` (batch, 1) -> `logits` (batch, 1, V); the page steps through the\n"
           "  prime one token at a time (the same function as reading it at once).",
}


def readme(meta: dict[str, Any], *, source: str, kind: str, form: str, folder: str, files: dict[str, str]) -> str:
    """README.md of an export: the graphs' inputs and outputs, the state layout, how to drive them."""
    from rnnkit.web_runtime import ORT_WEB_VERSION

    state = meta["state"]
    window = (f"This model was trained many-to-one on windows of {meta['window']} tokens: for each prediction "
              "re-read the last {0} tokens from a zero state instead of carrying it.".format(meta["window"])
              if meta["window"] else "")
    run = (_RUN_WEB if form == "web" else _RUN_ONNX).format(folder=folder, ort=ORT_WEB_VERSION)
    return _README.format(
        source=source, cell=meta["cell"], layers=state["layers"], hidden=state["hidden"], vocab=meta["vocab_size"],
        kind=kind, quantized=", int8-quantised" if meta["quantize"] else "", version=meta["rnnkit"],
        opset=meta["opset"], files="".join(f"| `{name}` | {what} |\n" for name, what in files.items()),
        count=state["count"], inputs=", ".join(f"`{n}`" for n in state["inputs"]),
        outputs=", ".join(f"`{n}`" for n in state["outputs"]), meaning=", ".join(state["meaning"]),
        graphs=_GRAPHS[form], window=window, prime=meta["default_prime"], run=run)


def _asset(name: str) -> str:
    return resources.files("rnnkit").joinpath(f"static/export/{name}").read_text(encoding="utf-8")


def check_request(ckpt, out: Path, *, form: str, quantize: str | None, overwrite: bool) -> None:
    """Refuse, before anything is written, an export that cannot succeed."""
    from rnnkit import tasks

    if form not in FORMATS:
        raise RnnkitError(f"unknown export format {form!r} (choose: {', '.join(FORMATS)})")
    if quantize is not None and quantize not in QUANTIZE:
        raise RnnkitError(f"unknown quantisation {quantize!r} (choose: {', '.join(QUANTIZE)})")
    tasks.require(ckpt.task, "generates", what="ONNX export", where=str(ckpt.path))
    if form == "web" and ckpt.tokenizer.kind == "bpe":
        raise RnnkitError("the web page encodes char and word tokenizers only, not bpe; "
                          "export this model with --format onnx (its driver reads BPE)")
    if out.exists() and not out.is_dir():
        raise RnnkitError(f"--out {out} is a file; give a folder to create")
    if out.exists() and not overwrite:
        raise RnnkitError(f"--out {out} already exists; choose a new folder or pass --overwrite to replace it")
    _check_importable()


def export_checkpoint(ckpt, out: str | Path, *, form: str = "onnx", quantize: str | None = None,
                      overwrite: bool = False, log: Log | None = None) -> ExportReport:
    """Export a language-model checkpoint to the folder ``out`` (written whole, or not at all)."""
    say: Log = log or (lambda message: None)
    out = Path(out)
    check_request(ckpt, out, form=form, quantize=quantize, overwrite=overwrite)
    runtime = None
    if form == "web":
        from rnnkit.web_runtime import runtime_files

        runtime = runtime_files(log=say)  # fetched (or found cached) before anything is written
    try:
        with atomic_folder(out, replace=overwrite) as tmp:
            tmp.chmod(0o755)  # mkdtemp makes 0700; an export is meant to be served and shared
            float_sizes = _write_bundle(ckpt, tmp, form=form, quantize=quantize, runtime=runtime, say=say,
                                        folder=str(out))
            sizes = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    except OSError as exc:
        raise RnnkitError(f"could not write the export to {out}: {describe_os_error(exc)}") from None
    return ExportReport(out=out, sizes=sizes, float_sizes=float_sizes)


def _write_bundle(ckpt, tmp: Path, *, form: str, quantize: str | None, runtime: Path | None, say: Log,
                  folder: str) -> dict[str, int]:
    layout, float_sizes = write_graphs(ckpt, tmp, quantize=quantize, log=say)
    if form == "web":
        (tmp / "prefill.onnx").unlink()  # the page steps through the prime
        (tmp / "step.onnx").rename(tmp / "model.onnx")
        float_sizes = {"model.onnx": float_sizes["step.onnx"]} if float_sizes else {}
        graphs = {"step": "model.onnx"}
        files = {"index.html": "the page", "model.onnx": "the step graph", "tokenizer.json": "the tokenizer",
                 "export.json": "graph names, state layout, default prime"}
        (tmp / "index.html").write_text(_asset("index.html"), encoding="utf-8")
        assert runtime is not None
        for item in sorted(runtime.iterdir()):
            shutil.copyfile(item, tmp / item.name)
            files[item.name] = "onnxruntime-web (from its npm package)"
    else:
        graphs = {"step": "step.onnx", "prefill": "prefill.onnx"}
        files = {"step.onnx": "the step graph", "prefill.onnx": "the prefill graph", "tokenizer.json": "the tokenizer",
                 "export.json": "graph names, state layout, default prime",
                 "generate_onnx.py": "a driver: numpy + onnxruntime only"}
        (tmp / "generate_onnx.py").write_text(_asset("generate_onnx.py"), encoding="utf-8")
    meta = export_meta(ckpt, layout, graphs=graphs, quantize=quantize)
    _write_json(tmp / "export.json", meta)
    _write_json(tmp / "tokenizer.json", driver_tokenizer(ckpt.tokenizer))
    files["README.md"] = "this file"
    (tmp / "README.md").write_text(readme(meta, source=str(ckpt.path), kind=ckpt.tokenizer.kind, form=form,
                                          folder=folder, files=files), encoding="utf-8")
    return float_sizes


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def summary(report: ExportReport) -> list[str]:
    """The lines ``rnnkit export`` prints at the end: each file's size (and a quantised graph's float size)."""
    lines = [f"exported to {report.out}"]
    for name, size in report.sizes.items():
        before = report.float_sizes.get(name)
        extra = f"  (float32: {_size(before)}, {size / before:.0%})" if before else ""
        lines.append(f"  {name:<30} {_size(size):>10}{extra}")
    return lines
