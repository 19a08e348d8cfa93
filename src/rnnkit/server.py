"""An HTTP API and one small web page over one or several checkpoints (the optional ``serve`` extra: FastAPI + uvicorn).

``create_app(models)`` builds the application; ``serve(...)`` loads the
checkpoints and runs them with uvicorn (``rnnkit serve``). Each model is loaded
once and shared: every request's model work runs in a bounded pool of worker
threads, under ``torch.inference_mode``, with its own seeded
``torch.Generator``, so a seed gives the same text whatever runs alongside.

Language models get ``/generate`` (whole texts; with ``beam`` N, a
deterministic beam search: the ``num_samples`` best hypotheses with their
log-probabilities), ``/generate/stream``
(server-sent events, one per new piece of text) and sessions: a session keeps
the recurrent state after everything it has read, so feeding it more text or
continuing it costs only the new tokens, however long its history. Sessions
are bounded in number, in idle time and in memory, and evicted least recently
used first. Classifiers get ``/classify``. A request names its model with a
``model`` field (default: the first model given for that task).

The OpenAPI document (``/openapi.json``) is the contract: every status an
operation can answer is in it with its ``{"error": ...}`` body, and so is
every constraint the server enforces (ranges, string and list sizes), so a
request valid by the schema is accepted and any other gets a documented 4xx.
Text is never refused for what it holds: pieces the vocabulary lacks are
skipped (or read as ``<unk>`` where the vocabulary has it) and listed back in
``unknown``; lone UTF-16 surrogates, which are not characters, are read as
U+FFFD.

The door: with API keys configured every endpoint but ``/health`` (and the
page and the API description, which hold no model output) needs
``Authorization: Bearer KEY``, compared in constant time. Each client (its key,
or its address without keys) may have ``max_client_requests`` requests in
progress; a request may take ``max_request_seconds``, checked between tokens.
CORS is off unless origins are allowed. SIGTERM stops accepting connections,
lets running requests finish (up to a timeout) and exits 0.

Loads through :mod:`rnnkit.checkpoint`; never imports ``rnnkit.training``.
"""

# No `from __future__ import annotations`: FastAPI reads the request models from the
# annotations of the endpoints defined inside create_app, so they must be real classes.

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from rnnkit import __version__, tasks
from rnnkit.beam import beam_search
from rnnkit.checkpoint import Checkpoint, load_checkpoint
from rnnkit.config import ServeLimits, generation_window
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.generation import READ_CHUNK, Stream
from rnnkit.inference import StreamText, classify_texts, continuation
from rnnkit.views import FEATURES, GATE_NAMES, attribute, check_layer_top, inspect_language_model

# Seeds every JSON client keeps exact (JavaScript's Number.MAX_SAFE_INTEGER): a seed the page
# or any client echoes back must still name the same sample.
SEED_MAX = 2**53 - 1
# A session remembers this many of its last tokens (besides its state) to decode
# what it writes next with the right spacing and whole multi-byte characters.
DECODE_CONTEXT = 64
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SESSION_ID = r"^[A-Za-z0-9_-]{16}$"  # what secrets.token_urlsafe(12) gives
MIN_KEY_LENGTH = 16
# JSON of a request besides its texts (field names, numbers, a model name) stays under this.
BODY_OVERHEAD = 512
# The most bytes one character of a JSON string can take: a character outside the BMP sent as
# an escaped surrogate pair, "\ud83d\ude00". String limits in the schema allow for it, so a
# request valid by the schema always fits in --max-request-bytes.
JSON_BYTES_PER_CHAR = 12
# POST /inspect reads at most this many characters (one step per token, ~2k tokens/s on a CPU) and
# sends each shown unit's activation per token: the answer stays well within a second and a few 100 kB.
INSPECT_CHARS = 4000
# Paths anyone may read: they hold no model output (the page must load before it can ask for a key).
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
RETRY_AFTER = "1"
# POST /generate's beam-search fields: another endpoint that gets one says where they belong.
BEAM_FIELDS = frozenset({"beam", "length_penalty", "no_repeat_ngram"})  # seconds, in 429 and 503 answers
# The two things a served model can do; which tasks can do which is the registry's to say (rnnkit.tasks).
LANGUAGE_MODEL, CLASSIFY = "generates", "classifies"


class ApiError(Exception):
    """A user mistake or a refusal, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------- request and response bodies


def _read_surrogates(value: Any) -> Any:
    # JSON may carry "\ud800" alone; it is no character (UTF-8 cannot encode it), so it is read
    # as U+FFFD, the replacement character, like any decoder does with a broken sequence.
    return re.sub("[\ud800-\udfff]", "\ufffd", value) if isinstance(value, str) else value


def _whole(value: Any) -> Any:
    # JSON Schema counts 592.0 as an integer (JSON has one number type); strict pydantic would not.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Text = Annotated[str, BeforeValidator(_read_surrogates)]  # before: pydantic refuses a str it cannot encode
Whole = Annotated[int, BeforeValidator(_whole)]
Unknown = Literal["skip", "unk"]
UNKNOWN_HELP = ("pieces of the text the vocabulary lacks: skip them, or read them as <unk> where the vocabulary has "
                "it (word level; elsewhere they are skipped). Either way they are listed in the answer's `unknown` "
                "(default: unk where there is <unk>, else skip)")


class _Body(BaseModel):
    # Strict: "3" is not a number and true is not 1; unknown keys (typos) and NaN/Infinity are errors.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _choice(names: Sequence[str]) -> Any:
    """The type of a `model` field: one of these names (any string when the server holds none: then 400)."""
    return Literal[tuple(names)] if names else str


def text_limits(limits: ServeLimits) -> tuple[int, int]:
    """Most characters of a prime or fed text, and of one text to classify, so that any request fits the body limit."""
    budget = limits.max_request_bytes - BODY_OVERHEAD
    one = budget // JSON_BYTES_PER_CHAR
    each = (budget // limits.max_texts - 4) // JSON_BYTES_PER_CHAR  # 4: the quotes and ", " around a text
    if each < 1:
        raise RnnkitError(f"--max-request-bytes {limits.max_request_bytes} leaves no room for --max-texts "
                          f"{limits.max_texts} texts; raise it to at least "
                          f"{BODY_OVERHEAD + limits.max_texts * (4 + 16 * JSON_BYTES_PER_CHAR)}")
    return one, each


def _request_models(limits: ServeLimits, lm_names: Sequence[str], cls_names: Sequence[str], *,
                    lm_layers: int = 1) -> SimpleNamespace:
    """The request bodies, with this server's limits and models in their schema (and so in the OpenAPI document).

    ``lm_layers``: the most layers of a served language model (the top ``layer`` POST /inspect takes).
    """
    most_chars, most_chars_each = text_limits(limits)
    LanguageModelName = _choice(lm_names)  # noqa: N806 (a type)
    ClassifierName = _choice(cls_names)  # noqa: N806
    lm_help = f"the language model to use (GET /models); default: {lm_names[0]!r}" if lm_names else "no model"
    cls_help = f"the classifier to use (GET /models); default: {cls_names[0]!r}" if cls_names else "no model"

    class Sampling(_Body):
        length: Whole = Field(200, ge=0, le=limits.max_length, description="tokens to generate")
        temperature: float = Field(0.8, ge=0, le=100, description="0 is greedy; higher is more varied")
        top_k: Whole = Field(0, ge=0, le=2**31 - 1, description="sample only among the k likeliest tokens (0: off)")
        top_p: float = Field(1.0, gt=0, le=1, description="sample only from the top-p probability mass (1: off)")
        seed: Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_whole)] | None = Field(
            None, description="seed for a repeatable sample (default: a random one, returned)")

    class StreamRequest(Sampling):
        model: LanguageModelName | None = Field(None, description=lm_help)
        prime: Text = Field("", max_length=most_chars,
                            description="text to start from; empty, or with nothing the vocabulary knows: the "
                                        "model's default prime (GET /model)")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    class GenerateRequest(StreamRequest):
        num_samples: Whole = Field(1, ge=1, le=limits.max_samples,
                                   description="independent samples, one batch; with `beam`, how many of the best "
                                               "hypotheses to return: the beam holds `beam`, so at most that many "
                                               "come back (fewer too where fewer exist)")
        beam: Annotated[int, Field(ge=1, le=limits.max_samples), BeforeValidator(_whole)] | None = Field(
            None, description="search with this many hypotheses instead of sampling: deterministic, so "
                              "`temperature`, `top_k`, `top_p` and `seed` are not used (null: sample)")
        length_penalty: float = Field(0.0, ge=0, le=10,
                                      description="beam: rank hypotheses by log-prob / length ** length_penalty "
                                                  "(0: off, 1: mean per token); lengths differ only where "
                                                  "`no_repeat_ngram` ends a hypothesis early")
        no_repeat_ngram: Whole = Field(0, ge=0, le=limits.max_length,
                                       description="beam: never repeat this many new tokens in a row (the prime "
                                                   "does not count; 0: off); a hypothesis with no allowed next "
                                                   "token ends there")

    class ClassifyRequest(_Body):
        model: ClassifierName | None = Field(None, description=cls_help)
        texts: list[Annotated[str, Field(max_length=most_chars_each), BeforeValidator(_read_surrogates)]] = Field(
            min_length=1, max_length=limits.max_texts,
            description="texts to label; a text with no token the model can read (empty, blank, or only pieces "
                        "the vocabulary lacks, skipped) gets no label: its `label` and `probabilities` are null")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    class SessionRequest(_Body):
        model: LanguageModelName | None = Field(None, description=lm_help)
        text: Text = Field("", max_length=most_chars, description="text for the session to read first")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    class FeedRequest(_Body):
        text: Text = Field("", max_length=most_chars, description="text to append to the session's history")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    return SimpleNamespace(Sampling=Sampling, StreamRequest=StreamRequest, GenerateRequest=GenerateRequest,
                           **_inspect_request_models(limits, LanguageModelName, ClassifierName, lm_help, cls_help,
                                                     lm_layers=lm_layers),
                           ClassifyRequest=ClassifyRequest, SessionRequest=SessionRequest, FeedRequest=FeedRequest,
                           LanguageModelName=LanguageModelName, ModelName=_choice([*lm_names, *cls_names]))


def _inspect_request_models(limits: ServeLimits, lm_name: Any, cls_name: Any, lm_help: str, cls_help: str, *,
                            lm_layers: int) -> dict[str, type[BaseModel]]:
    """The bodies of POST /inspect (``lm_layers``: the most layers of a served language model) and /inspect/words."""
    most_chars, most_chars_each = text_limits(limits)
    LanguageModelName, ClassifierName = lm_name, cls_name  # noqa: N806 (types)

    class InspectRequest(_Body):
        model: LanguageModelName | None = Field(None, description=lm_help)
        text: Text = Field(max_length=min(most_chars, INSPECT_CHARS),
                           description="the text the model reads, token by token (at least two tokens it knows)")
        layer: Annotated[int, Field(ge=0, le=max(lm_layers - 1, 0)), BeforeValidator(_whole)] | None = Field(
            None, description="layer to inspect, from 0 (default: the top; a layer the chosen "
                              "model lacks is 422)")
        top: Whole = Field(5, ge=1, le=256, description="units per feature (more than the layer has: all of them)")
        gates: bool = Field(False, description="rank the gates' units too (a vanilla RNN has none: ignored)")
        signal: Literal["h", "c", "i", "f", "g", "o", "r", "z", "n", "candidate"] = Field(
            "h", description="with `unit`: the signal of the unit to send (c: LSTM only; a gate: that cell's)")
        unit: Annotated[int, Field(ge=0, le=2**31 - 1), BeforeValidator(_whole)] | None = Field(
            None, description="also send this unit of `signal` (answered as null when the model "
                              "has no such unit or signal)")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    class WordsRequest(_Body):
        model: ClassifierName | None = Field(None, description=cls_help)
        texts: list[Annotated[str, Field(max_length=most_chars_each), BeforeValidator(_read_surrogates)]] = Field(
            min_length=1, max_length=limits.max_texts,
            description="texts to explain; one with no token the model can read gets `label: null` and no tokens")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    return {"InspectRequest": InspectRequest, "WordsRequest": WordsRequest}


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, in one line")
    detail: list[dict[str, Any]] | None = Field(None, description="422: each problem found (type, loc, msg)")


class Health(BaseModel):
    status: Literal["ok"]
    sessions: int = Field(description="live sessions")


class ModelList(BaseModel):
    models: list[dict[str, Any]] = Field(description="what GET /model tells of each model, with its `name`; "
                                                     "the first of each task is that task's default")


class Hypothesis(BaseModel):
    text: str = Field(description="the new text (without the prime)")
    tokens: int = Field(description="its new tokens (fewer than `length` where `no_repeat_ngram` ended it)")
    log_prob: float = Field(description="the sum of the model's log-probabilities of its new tokens, given the prime")
    score: float = Field(description="what the hypotheses are ranked by: log_prob / tokens ** length_penalty")


class GenerateResponse(BaseModel):
    model: str
    texts: list[str] = Field(description="the new text of each sample (without the prime); beam: of each "
                                         "hypothesis returned, best first")
    prime: str = Field(description="the text generation started from")
    seed: int = Field(description="the sampling seed (not used by a beam search)")
    tokens: int = Field(description="tokens generated per sample (beam: at most this many per hypothesis)")
    unknown: list[str] = Field(description="pieces of the prime the vocabulary lacks (skipped or <unk>)")
    hypotheses: list[Hypothesis] | None = Field(None, description="beam: each hypothesis with its length, "
                                                                  "log-probability and score; null when sampling")


class ClassifyResult(BaseModel):
    label: str | None = Field(description="the likeliest label (null: the text has no token the model can read)")
    probability: float | None
    probabilities: dict[str, float] | None
    tokens: int = Field(description="tokens of the text the model read (after cutting it to the model's max_len)")
    unknown: list[str] = Field(description="pieces of the text the vocabulary lacks (skipped or <unk>)")


class ClassifyResponse(BaseModel):
    model: str
    labels: list[str] = Field(description="every label the model knows")
    results: list[ClassifyResult] = Field(description="one per text, in order")


class SessionInfo(BaseModel):
    id: str
    model: str
    tokens: int = Field(description="tokens the session has read and written so far")
    fed: int = Field(0, description="tokens this request added")
    unknown: list[str] = Field([], description="pieces of the text the vocabulary lacks (skipped or <unk>)")


class SessionText(BaseModel):
    id: str
    model: str
    text: str = Field(description="the new text, now part of the session")
    tokens: int = Field(description="tokens the session holds now")
    seed: int


class UnitView(BaseModel):
    feature: str = Field(description="the text feature the unit tracks best (see GET /docs: POST /inspect)")
    signal: str = Field(description="h, c (LSTM) or a gate")
    unit: int
    r: float = Field(description="Pearson correlation of the unit's activation with the feature, over the text")
    values: list[float] = Field(description="the unit's activation after each token")


class InspectResponse(BaseModel):
    model: str
    layer: int
    signals: list[str] = Field(description="the state (h; c for an LSTM) and, with `gates`, the gates ranked")
    tokens: list[str] = Field(description="the text of each token read, in order (they join to the text read)")
    ranking: dict[str, list[UnitView]] = Field(
        description="per feature (in_quotes, in_brackets, line_position, end_of_line, word_start, digit), the "
                    "`top` units by |r|; a feature that never changes in the text is left out")
    constant_features: list[str] = Field(description="features that never change in this text, so rank nothing")
    unit: UnitView | None = Field(description="the unit asked for with `unit` (null: none asked for)")
    unknown: list[str] = Field(description="pieces of the text the vocabulary lacks (skipped or <unk>)")


class TokenChange(BaseModel):
    token: str = Field(description="the token's text, as it appears in the text read")
    p: float = Field(description="the predicted class's probability after reading up to this token")
    change: float = Field(description="how much this token changed that probability")


class WordsResult(BaseModel):
    label: str | None = Field(description="the label predicted for the whole text (null: nothing to read)")
    probability: float | None
    before: float | None = Field(description="that label's probability with nothing read")
    tokens: list[TokenChange] = Field(description="each token read (after cutting to the model's max_len)")
    unknown: list[str] = Field(description="pieces of the text the vocabulary lacks (skipped or <unk>)")


class WordsResponse(BaseModel):
    model: str
    results: list[WordsResult] = Field(description="one per text, in order")


# ---------------------------------------------------------------- time limits


class Deadline:
    """When a request must be done; model work checks it between tokens (a thread cannot be stopped from outside)."""

    def __init__(self, seconds: float, clock: Callable[[], float], stopping: threading.Event) -> None:
        self.seconds = seconds
        self.clock = clock
        self.end = clock() + seconds
        self.stopping = stopping

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock())

    def busy(self) -> ApiError:
        return ApiError(503, f"no worker came free within {self.seconds:g} s (the server's --max-request-seconds): "
                             "the server is busy; retry later", {"Retry-After": RETRY_AFTER})

    def begin(self) -> None:
        """A worker picked the request up: refuse it (503) if it waited past its time."""
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", {"Retry-After": RETRY_AFTER})
        if self.clock() > self.end:
            raise self.busy()

    def check(self) -> None:
        """Between tokens: stop the work (504) once it runs past its time, or when the server stops."""
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", {"Retry-After": RETRY_AFTER})
        if self.clock() > self.end:
            raise ApiError(504, f"the request ran past {self.seconds:g} s (the server's --max-request-seconds); "
                                "ask for fewer tokens or send less text")


# ---------------------------------------------------------------- models


@dataclass
class Served:
    """One checkpoint as the server uses it."""

    name: str
    ckpt: Checkpoint
    info: dict[str, Any]  # what GET /model answers
    window: int  # 0: carried state; N: many-to-one over the last N tokens
    default_ids: list[int]  # the default prime, encoded
    stepper: Any = None  # the one-token step, bound once: the served weights never change

    @property
    def tok(self) -> Tokenizer:
        return self.ckpt.tokenizer

    def policy(self, asked: str | None) -> str:
        """The tokenizer's `unknown` mode for the API's field: <unk> only where the vocabulary has it."""
        return "unk" if asked != "skip" and self.tok.default_unknown == "unk" else "skip"

    def encode(self, text: str, unknown: str | None) -> tuple[list[int], list[str]]:
        """Ids of the text (never refused) and the pieces of it the vocabulary lacks."""
        if not text:
            return [], []
        return self.tok.encode(text, unknown=self.policy(unknown)).tolist(), self.tok.unknown_in(text)


class _Reading:
    """A tokenizer that reads unknown pieces one fixed way, for library code that encodes with the default."""

    def __init__(self, tokenizer: Tokenizer, unknown: str) -> None:
        self._tok = tokenizer
        self._unknown = unknown

    def encode(self, text: str, *, unknown: str | None = None):
        return self._tok.encode(text, unknown=unknown or self._unknown)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def _inspect_answer(m: Served, layer: int, ids: list[int], missing: list[str]) -> dict[str, Any]:
    """POST /inspect's answer for a text of fewer than two known tokens: nothing varies, so nothing is ranked."""
    check_layer_top(m.ckpt.model, layer, 1)  # a layer this model lacks: 422, as the schema's description says
    signals = ["h", "c"] if m.ckpt.model.recurrent.cell == "lstm" else ["h"]
    return {"model": m.name, "layer": layer, "signals": signals, "tokens": [m.tok.decode(ids)] if ids else [],
            "ranking": {}, "constant_features": list(FEATURES), "unit": None, "unknown": missing}


def describe(ckpt: Checkpoint, limits: ServeLimits) -> dict[str, Any]:
    """What GET /model answers: the task, vocabulary, network shape and training summary."""
    state = dict(ckpt.meta.get("state", {}))
    default_prime = state.pop("default_prime", None)
    # JSON has no NaN: a diverged run's losses show as null.
    state = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in state.items()}
    info = {
        "task": ckpt.task,
        "level": ckpt.tokenizer.kind,
        "vocab_size": ckpt.tokenizer.vocab_size,
        "parameters": sum(p.numel() for p in ckpt.model.parameters()),  # tied weights count once
        "model": asdict(ckpt.run_config.model),
        "training": state,
        "checkpoint": ckpt.path.name,
        "created": ckpt.meta.get("created"),
        "rnnkit_version": ckpt.meta.get("rnnkit_version"),
        "limits": asdict(limits),
    }
    if tasks.get(ckpt.task).classifies:
        info["labels"] = ckpt.meta["labels"]
    else:
        info["default_prime"] = default_prime if default_prime is not None else "\n"
        info["window"] = generation_window(ckpt.run_config)
    return info


def model_name(path: str | Path) -> str:
    """The name a checkpoint given without one is served under: its run directory's name, made URL-safe."""
    path = Path(path).resolve()
    if path.parent.name == "checkpoints":  # a checkpoint folder inside a run directory
        path = path.parent.parent
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name).strip("-._")[:64]
    return name or "model"


def _served(name: str, ckpt: Checkpoint, limits: ServeLimits) -> Served:
    ckpt.model.eval()  # dropout off: the shared model is only ever read
    info = {"name": name, **describe(ckpt, limits)}
    default_ids: list[int] = []
    if not tasks.get(ckpt.task).classifies:
        default_ids = ckpt.tokenizer.encode(info["default_prime"], unknown="skip").tolist()
        if not default_ids:  # a default prime the vocabulary cannot read: start from the first token
            default_ids = [0]
            info["default_prime"] = ckpt.tokenizer.decode(default_ids)
    window = info.get("window", 0)
    stepper = ckpt.model.stepper() if tasks.get(ckpt.task).generates and not window else None
    return Served(name=name, ckpt=ckpt, info=info, window=window, default_ids=default_ids, stepper=stepper)


# ---------------------------------------------------------------- sessions


def _nbytes(stream: Stream) -> int:
    tensors = [*(stream.state or ()), stream.logits, stream.recent]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Session:
    """One text being read and continued: a :class:`Stream` plus the tail of ids for decoding."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.stream = Stream(served.ckpt.model, window=served.window, stepper=served.stepper)
        self.tail: list[int] = []
        self.lock = asyncio.Lock()  # one request at a time: a Stream is not thread-safe
        self.used = 0.0
        self.bytes = 0

    def _saved(self) -> tuple:
        s = self.stream  # the stream replaces these on every step (never changes them in place)
        return s.tokens, s.state, s.logits, s.recent, self.tail

    def _restore(self, saved: tuple) -> None:
        s = self.stream
        s.tokens, s.state, s.logits, s.recent, self.tail = saved

    def feed_ids(self, ids: list[int], deadline: Deadline) -> None:
        """Read ``ids``, all or none: a request stopped by its deadline leaves the session as it was."""
        saved = self._saved()
        try:
            for start in range(0, len(ids), READ_CHUNK):  # the chunks the stream reads anyway
                deadline.check()
                self.stream.feed(ids[start:start + READ_CHUNK])
        except BaseException:
            self._restore(saved)
            raise
        self.tail = (self.tail + ids)[-DECODE_CONTEXT:]
        self.bytes = _nbytes(self.stream)

    def feed(self, text: str, unknown: str | None, deadline: Deadline) -> tuple[int, list[str]]:
        """Read ``text``: costs only its own tokens. Returns how many, and the pieces the vocabulary lacks."""
        ids, missing = self.served.encode(text, unknown)
        self.feed_ids(ids, deadline)
        return len(ids), missing

    def generate(self, *, length: int, temperature: float, top_k: int, top_p: float, seed: int,
                 deadline: Deadline) -> str:
        saved = self._saved()
        gen = torch.Generator().manual_seed(seed)
        new: list[int] = []
        try:
            if self.stream.tokens == 0:  # nothing read yet: start from the model's default prime
                self.feed_ids(self.served.default_ids, deadline)
            for ids in self.stream.sample(length=length, temperature=temperature, top_k=top_k, top_p=top_p,
                                          generator=gen):
                deadline.check()
                new.append(int(ids[0]))
        except BaseException:
            self._restore(saved)
            raise
        text = continuation(self.served.tok, self.tail, new)
        self.tail = (self.tail + new)[-DECODE_CONTEXT:]
        self.bytes = _nbytes(self.stream)
        return text


class Sessions:
    """The live sessions, least recently used first; bounded in number, idle time and memory.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(self, *, limit: int, idle: float, max_bytes: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.idle = idle
        self.max_bytes = max_bytes
        self.clock = clock
        self.items: OrderedDict[str, Session] = OrderedDict()

    def add(self, session: Session) -> str:
        self.sweep()
        while len(self.items) >= self.limit:
            self.items.popitem(last=False)
        sid = secrets.token_urlsafe(12)
        session.used = self.clock()
        self.items[sid] = session
        self.fit(sid)
        return sid

    def get(self, sid: str) -> Session:
        self.sweep()
        session = self.items.get(sid)
        if session is None:
            raise ApiError(404, f"no session {sid!r} (never created, deleted, or evicted after "
                                f"{self.idle:g} s idle or to make room for newer ones)")
        self.items.move_to_end(sid)
        session.used = self.clock()
        return session

    def remove(self, sid: str) -> None:
        self.get(sid)
        del self.items[sid]

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.items.values())

    def fit(self, keep: str) -> None:
        """After ``keep`` grew: evict the least recently used others until all fit in the memory bound."""
        total = self.bytes
        for sid in list(self.items):
            if total <= self.max_bytes:
                break
            if sid != keep:
                total -= self.items.pop(sid).bytes

    def sweep(self) -> None:
        """Drop the sessions idle for too long; the oldest come first, so stop at the first fresh one."""
        deadline = self.clock() - self.idle
        while self.items:
            sid, session = next(iter(self.items.items()))
            if session.used >= deadline:
                break
            del self.items[sid]


# ---------------------------------------------------------------- the door: body size, keys, clients


class BodyLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``, declared or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        # Read the body here (chunked bodies declare no length) and hand it on in one piece.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        message = f"request body over {self.max_bytes:,} bytes (the server's --max-request-bytes)"
        await _error(413, message)(scope, receive, send)


def _digest(key: str) -> bytes:
    # Compare digests, not keys: equal lengths, so the comparison time says nothing about a key's length.
    return hashlib.sha256(key.encode("utf-8")).digest()


class Door:
    """ASGI middleware in front of everything but OPEN_PATHS: the API key, then the client's share of the server.

    ``keys`` empty: no key needed. A client is its key when there are keys (all
    users of one key share its allowance), else its address. It may have
    ``max_requests`` requests in progress (a stream counts until its last event).
    """

    def __init__(self, app, *, keys: Sequence[str], max_requests: int) -> None:
        self.app = app
        self.digests = [_digest(k) for k in keys]
        self.max_requests = max_requests
        self.busy: dict[str, int] = {}

    def client(self, scope) -> str | None:
        """Who is asking, or None for a missing or wrong key."""
        if not self.digests:
            return "address " + (scope.get("client") or ("?",))[0]
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        given = _digest(token.strip())
        found = None
        for i, digest in enumerate(self.digests):  # every key is compared: the time does not tell which matched
            if hmac.compare_digest(given, digest):
                found = f"key {i}"
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        client = self.client(scope)
        if client is None:
            sent = b"authorization" in dict(scope["headers"])
            challenge = 'Bearer realm="rnnkit"' + (', error="invalid_token"' if sent else "")
            message = ("the API key is not one this server accepts" if sent else
                       "this server needs an API key: send the header 'Authorization: Bearer KEY'")
            return await _error(401, message, {"WWW-Authenticate": challenge})(scope, receive, send)
        if self.busy.get(client, 0) >= self.max_requests:
            message = (f"{self.max_requests} requests of this client are already in progress (the server's "
                       "--max-client-requests); wait for one to finish")
            return await _error(429, message, {"Retry-After": RETRY_AFTER})(scope, receive, send)
        self.busy[client] = self.busy.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.busy[client] -= 1
            if not self.busy[client]:
                del self.busy[client]


# ---------------------------------------------------------------- errors and the schema


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """One line out of pydantic's error list: 'length: Input should be ...; top_p: ...'."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])} "
                         f"(at character {error['loc'][-1]})")
            continue
        where = ".".join(str(x) for x in error["loc"] if x not in ("body", "query", "path"))
        msg = error["msg"]
        if error.get("type") == "extra_forbidden" and where in BEAM_FIELDS:
            msg = "only POST /generate searches with a beam (its texts are known only when the search ends)"
        if error.get("type") == "model_attributes_type" and not where:
            msg = "the body must be a JSON object (Content-Type: application/json)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


_HEADER = {"schema": {"type": "string"}}
_STATUS_TEXT = {
    400: "the body is not readable JSON (it must be UTF-8)",
    401: "no API key, or one this server does not accept",
    404: "no such session (never created, deleted, or evicted)",
    413: "the request body is over the server's --max-request-bytes",
    422: "a field is missing, of the wrong type or out of range, or the body is not a JSON object",
    429: "this client already has --max-client-requests requests in progress",
    503: "no worker came free within --max-request-seconds, or the server is shutting down",
    504: "the work ran past --max-request-seconds",
}
_STATUS_HEADERS = {
    401: {"WWW-Authenticate": {**_HEADER, "description": 'Bearer realm="rnnkit" (with error="invalid_token" '
                                                         "for a wrong key)"}},
    429: {"Retry-After": {**_HEADER, "description": "seconds to wait before retrying"}},
    503: {"Retry-After": {**_HEADER, "description": "seconds to wait before retrying"}},
}


def _errors(*statuses: int, keys: bool, door: bool = True) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of an operation; every one is ``{"error": ...}`` (422 adds ``detail``).

    Every request may be over the body limit (413); behind the door (``door``), it may lack the key
    (401, when the server has ``keys``) or be one too many of its client's (429).
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({*statuses, 413, *((429,) if door else ()), *((401,) if keys and door else ())}):
        out[status] = {"model": ErrorBody, "description": _STATUS_TEXT[status]}
        if status in _STATUS_HEADERS:
            out[status]["headers"] = _STATUS_HEADERS[status]
    return out


def _allowed_methods(app: FastAPI, scope) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


def _add_links_and_security(schema: dict[str, Any], *, keys: bool) -> dict[str, Any]:
    """What FastAPI cannot say by itself: how a session's id flows between operations, and the bearer key."""
    created = schema["paths"].get("/sessions", {}).get("post", {}).get("responses", {}).get("201")
    if created is not None:
        sid = {"sid": "$response.body#/id"}
        created["links"] = {name: {"operationId": op, "parameters": sid} for name, op in (
            ("feed", "feed_session"), ("generate", "continue_session"), ("info", "session_info"),
            ("delete", "delete_session"))}
    if keys:
        schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {
            "type": "http", "scheme": "bearer",
            "description": "one of the server's API keys (--api-key, RNNKIT_API_KEY or --api-key-file)"}}
        for path, operations in schema["paths"].items():
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}]
    return schema


# ---------------------------------------------------------------- running model work


async def _iterate_on(pool: ThreadPoolExecutor, items: Iterator[str]) -> AsyncIterator[str]:
    """Run a blocking iterator to its end as one job on the pool, yielding each item here as soon as it exists.

    A stream thus holds one worker for its whole run, like any other request,
    instead of queueing again behind every other request for each token (which
    measured p99 latencies of seconds under load). When the consumer stops (the
    client went away), the worker stops at the next item.
    """
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                loop.call_soon_threadsafe(arrived.put_nowait, item)
        finally:
            loop.call_soon_threadsafe(arrived.put_nowait, done)

    job = loop.run_in_executor(pool, produce)
    try:
        while (item := await arrived.get()) is not done:
            # Let the loop look at its sockets between items: a queue already full never suspends, and a
            # client that left would be written to (and warned about) once per item before anyone noticed.
            await asyncio.sleep(0)
            yield item
        await job  # a failure in the worker surfaces here
    finally:
        stop.set()


# One server-sent event, as OpenAPI (3.1: `schema` of an event stream; 3.2: `itemSchema`) describes them.
SSE_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["start", "token", "done", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "start: {model, prime, seed, unknown}; token: {text}; done: {tokens, text}; "
                                "error: {error}"},
    },
}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(
    models: Checkpoint | Mapping[str, Checkpoint],
    *,
    limits: ServeLimits = ServeLimits(),
    workers: int = 2,
    clock: Callable[[], float] = time.monotonic,
    api_keys: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The application for loaded checkpoints (a name for each, in order); model work runs on ``workers`` threads.

    ``clock`` times sessions' idleness and requests' deadlines.
    """
    if workers < 1:
        raise RnnkitError(f"--workers must be at least 1, got {workers}")
    if isinstance(models, Checkpoint):
        models = {model_name(models.path): models}
    if not models:
        raise RnnkitError("nothing to serve: give at least one checkpoint")
    for name in models:
        if not MODEL_NAME.fullmatch(name):
            raise RnnkitError(f"model name {name!r}: use 1-64 letters, digits, '_', '.' or '-' (a letter or "
                              "digit first)")
    served = {name: _served(name, ckpt, limits) for name, ckpt in models.items()}
    by_task = {can: [n for n, s in served.items() if getattr(tasks.get(s.ckpt.task), can)]
               for can in (LANGUAGE_MODEL, CLASSIFY)}
    bodies = _request_models(limits, by_task[LANGUAGE_MODEL], by_task[CLASSIFY],
                             lm_layers=max((served[n].ckpt.model.recurrent.layers for n in by_task[LANGUAGE_MODEL]),
                                           default=1))
    keys = bool(api_keys)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rnnkit-worker")
    sessions = Sessions(limit=limits.max_sessions, idle=limits.session_idle,
                        max_bytes=limits.max_session_mib * 2**20, clock=clock)
    stopping = threading.Event()  # set at shutdown: work still running stops at its next token

    def deadline() -> Deadline:
        return Deadline(limits.max_request_seconds, clock, stopping)

    async def run(fn: Callable[[], Any], limit: Deadline):
        """Run model work on the pool within the request's deadline (503 if no worker takes it up in time)."""
        def job():
            limit.begin()
            return fn()

        future = pool.submit(job)
        waiting = asyncio.wrap_future(future)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), timeout=limit.remaining())
            except TimeoutError:
                if future.cancel():  # still queued: it never started, so it never will
                    raise limit.busy() from None
                return await waiting  # running: it checks the deadline itself between tokens
        except RnnkitError as exc:  # the library's complaint about a request: the user's (422)
            raise ApiError(422, str(exc)) from None

    def pick(task: str, name: str | None, endpoint: str) -> Served:
        if not by_task[task]:
            what = " or ".join(f"a {spec.display}" for spec in tasks.TASKS.values() if getattr(spec, task))
            held = ", ".join(f"{n} ({s.ckpt.task})" for n, s in served.items())
            raise ApiError(400, f"{endpoint} needs {what}; this server holds {held}")
        return served[name or by_task[task][0]]

    def prime_of(m: Served, prime_text: str, unknown: str | None) -> tuple[list[int], str, list[str]]:
        """The prime's ids (the model's default prime where nothing is left), its text, the pieces unknown."""
        ids, missing = m.encode(prime_text, unknown)
        return ids or m.default_ids, prime_text if ids else m.info["default_prime"], missing

    def open_stream(m: Served, prime_text: str, unknown: str | None, rows: int, limit: Deadline):
        """A stream that has read the prime (or the default one) once, forked into ``rows`` rows."""
        ids, used, missing = prime_of(m, prime_text, unknown)
        stream = Stream(m.ckpt.model, window=m.window, stepper=m.stepper)
        for start in range(0, len(ids), READ_CHUNK):  # the chunks the stream reads anyway
            limit.check()
            stream.feed(ids[start:start + READ_CHUNK])
        stream.fork(rows)
        return stream, ids, used, missing

    def new_seed(seed: int | None) -> int:
        return secrets.randbelow(2**31) if seed is None else seed

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)

    names = ", ".join(f"{n} ({s.ckpt.task}, {s.tok.kind} level)" for n, s in served.items())
    app = FastAPI(title="rnnkit", version=__version__, lifespan=lifespan, description=f"Serving {names}.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    app.add_middleware(Door, keys=list(api_keys), max_requests=limits.max_client_requests)
    if cors_origins:  # outermost: preflights are answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:
            allowed = _allowed_methods(app, request.scope)
            return _error(405, f"{request.method} is not served at {request.url.path} (use {', '.join(allowed)})",
                          {"Allow": ", ".join(allowed)})
        if exc.status_code == 404:
            return _error(404, f"no endpoint {request.url.path} (the API is described at /docs)")
        if exc.status_code == 400:
            return _error(400, _STATUS_TEXT[400])
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Not the offending inputs: they may be large, or NaN, which JSON cannot carry.
        detail = [{key: error[key] for key in ("type", "loc", "msg") if key in error} for error in errors]
        return JSONResponse({"error": _validation_message(errors), "detail": jsonable_encoder(detail)},
                            status_code=422)

    lm_routes = {"include_in_schema": bool(by_task[LANGUAGE_MODEL])}
    session_routes = {"include_in_schema": bool(by_task[LANGUAGE_MODEL]), "tags": ["sessions"]}
    SessionId = Annotated[str, PathParam(pattern=SESSION_ID, description="the id POST /sessions gave")]  # noqa: N806

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("rnnkit").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health, tags=["server"], operation_id="health",
             responses=_errors(keys=False, door=False))
    async def health() -> Health:
        """Whether the server is up (needs no key)."""
        return Health(status="ok", sessions=len(sessions.items))

    @app.get("/models", response_model=ModelList, tags=["server"], operation_id="list_models",
             responses=_errors(keys=keys))
    async def list_models() -> ModelList:
        """Every model this server holds, in the order given; the first of each task is its default."""
        return ModelList(models=[s.info for s in served.values()])

    @app.get("/model", tags=["server"], operation_id="model_info", responses=_errors(422, keys=keys))
    async def model_info(
        model: Annotated[bodies.ModelName | None, Query(description="a model's name (default: the first)")] = None,
    ) -> dict[str, Any]:
        """One model's task, vocabulary, network shape, training summary and the server's limits."""
        return served[model or next(iter(served))].info

    @app.post("/generate", response_model=GenerateResponse, tags=["language model"], operation_id="generate",
              responses=_errors(400, 422, 503, 504, keys=keys), **lm_routes)
    async def generate(body: bodies.GenerateRequest) -> GenerateResponse:
        """Continue the prime ``num_samples`` times; each sample's new text (with `beam`: the best hypotheses)."""
        m = pick(LANGUAGE_MODEL, body.model, "/generate")
        seed, limit = new_seed(body.seed), deadline()
        if body.beam is not None:
            return await run(lambda: search(m, body, seed, limit), limit)

        def work() -> GenerateResponse:
            stream, ids, used, missing = open_stream(m, body.prime, body.unknown, body.num_samples, limit)
            gen = torch.Generator().manual_seed(seed)
            steps = []
            for step in stream.sample(length=body.length, temperature=body.temperature, top_k=body.top_k,
                                      top_p=body.top_p, generator=gen):
                limit.check()
                steps.append(step)
            columns = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(body.num_samples)]
            return GenerateResponse(model=m.name, texts=[continuation(m.tok, ids, new) for new in columns],
                                    prime=used, seed=seed, tokens=body.length, unknown=missing)

        return await run(work, limit)

    def search(m: Served, body, seed: int, limit: Deadline) -> GenerateResponse:
        """POST /generate with a beam: the ``num_samples`` best hypotheses (at most ``beam``), best first.

        More than the beam holds is not refused (the schema cannot say so: any body valid by it is
        accepted), it gets what the beam holds, as a small vocabulary may also give fewer.
        """
        ids, used, missing = prime_of(m, body.prime, body.unknown)
        found = beam_search(m.ckpt.model, ids, length=body.length, beam=body.beam, length_penalty=body.length_penalty,
                            no_repeat_ngram=body.no_repeat_ngram, num_return=min(body.num_samples, body.beam),
                            window=m.window, stepper=m.stepper, check=limit.check)
        texts = [continuation(m.tok, ids, h.ids) for h in found]
        return GenerateResponse(model=m.name, texts=texts, prime=used, seed=seed, tokens=body.length, unknown=missing,
                                hypotheses=[Hypothesis(text=text, tokens=len(h.ids), log_prob=h.log_prob,
                                                       score=h.score) for text, h in zip(texts, found, strict=True)])

    @app.post("/generate/stream", tags=["language model"], response_class=StreamingResponse,
              operation_id="generate_stream",
              responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
                               "description": "server-sent events: `start` {model, prime, seed, unknown}, then a "
                                              "`token` {text} per new piece of text, then `done` {tokens, text}; "
                                              "or, if the work runs past --max-request-seconds, an `error` {error} "
                                              "event instead of `done`"},
                         **_errors(400, 422, 503, 504, keys=keys)}, **lm_routes)
    async def generate_stream(body: bodies.StreamRequest) -> StreamingResponse:
        """Continue the prime, sending each piece of text as soon as it exists (server-sent events)."""
        m = pick(LANGUAGE_MODEL, body.model, "/generate/stream")
        seed, limit = new_seed(body.seed), deadline()
        # The prime is read before the answer starts: its refusals are still JSON with their status.
        stream, ids, used, missing = await run(lambda: open_stream(m, body.prime, body.unknown, 1, limit), limit)
        steps = stream.sample(length=body.length, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, generator=torch.Generator().manual_seed(seed))

        def events() -> Iterator[str]:  # runs on a worker thread
            yield _sse("start", {"model": m.name, "prime": used, "seed": seed, "unknown": missing})
            text, new = StreamText(m.tok, ids, echo=False), []
            try:
                for step in steps:
                    limit.check()
                    new.append(int(step[0]))
                    piece = text.push(new[-1:])
                    if piece:
                        yield _sse("token", {"text": piece})
            except ApiError as exc:  # the status is sent already: the stream ends with the reason
                yield _sse("error", {"error": exc.message})
                return
            yield _sse("done", {"tokens": len(new), "text": continuation(m.tok, ids, new)})

        return StreamingResponse(_iterate_on(pool, events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/classify", response_model=ClassifyResponse, tags=["classifier"], operation_id="classify",
              responses=_errors(400, 422, 503, 504, keys=keys), include_in_schema=bool(by_task[CLASSIFY]))
    async def classify(body: bodies.ClassifyRequest) -> ClassifyResponse:
        """The likeliest label of each text, with every label's probability."""
        m = pick(CLASSIFY, body.model, "/classify")
        labels, data = m.ckpt.meta["labels"], m.ckpt.run_config.data
        reading = _Reading(m.tok, m.policy(body.unknown))

        def work() -> ClassifyResponse:
            results = [ClassifyResult(label=None, probability=None, probabilities=None,
                                      tokens=min(len(reading.encode(t)), data.max_len), unknown=m.tok.unknown_in(t))
                       for t in body.texts]
            if any(r.tokens for r in results):
                probs, index = classify_texts(m.ckpt.model, reading, labels, body.texts, max_len=data.max_len,
                                              truncate=data.truncate)
                for p, i in zip(probs, index.tolist(), strict=True):
                    results[i].label, results[i].probability = labels[int(p.argmax())], float(p.max())
                    results[i].probabilities = {label: float(q) for label, q in zip(labels, p, strict=True)}
            return ClassifyResponse(model=m.name, labels=labels, results=results)

        return await run(work, deadline())

    _inspect_routes(app, bodies=bodies, pick=pick, run=run, deadline=deadline, keys=keys,
                    lm_routes=lm_routes, words_routes={"include_in_schema": bool(by_task[CLASSIFY])})

    @app.post("/sessions", response_model=SessionInfo, status_code=201, operation_id="create_session",
              responses=_errors(400, 422, 503, 504, keys=keys), **session_routes)
    async def create_session(body: bodies.SessionRequest) -> SessionInfo:
        """Start a session, optionally with some text; returns its id."""
        m = pick(LANGUAGE_MODEL, body.model, "/sessions")
        session, limit = Session(m), deadline()
        fed, missing = await run(lambda: session.feed(body.text, body.unknown, limit), limit)
        sid = sessions.add(session)
        return SessionInfo(id=sid, model=m.name, tokens=session.stream.tokens, fed=fed, unknown=missing)

    @app.get("/sessions/{sid}", response_model=SessionInfo, operation_id="session_info",
             responses=_errors(404, 422, keys=keys), **session_routes)
    async def session_info(sid: SessionId) -> SessionInfo:
        """How much the session holds."""
        session = sessions.get(sid)
        return SessionInfo(id=sid, model=session.served.name, tokens=session.stream.tokens)

    @app.post("/sessions/{sid}/feed", response_model=SessionInfo, operation_id="feed_session",
              responses=_errors(400, 404, 422, 503, 504, keys=keys), **session_routes)
    async def feed_session(sid: SessionId, body: bodies.FeedRequest) -> SessionInfo:
        """Append text to the session: costs only the new tokens."""
        session, limit = sessions.get(sid), deadline()
        async with session.lock:
            fed, missing = await run(lambda: session.feed(body.text, body.unknown, limit), limit)
        if sid in sessions.items:
            sessions.fit(sid)
        return SessionInfo(id=sid, model=session.served.name, tokens=session.stream.tokens, fed=fed,
                           unknown=missing)

    @app.post("/sessions/{sid}/generate", response_model=SessionText, operation_id="continue_session",
              responses=_errors(400, 404, 422, 503, 504, keys=keys), **session_routes)
    async def continue_session(sid: SessionId, body: bodies.Sampling) -> SessionText:
        """Continue the session's text; the new text becomes part of it. Costs only the new tokens."""
        session, limit = sessions.get(sid), deadline()
        seed = new_seed(body.seed)
        async with session.lock:
            text = await run(lambda: session.generate(length=body.length, temperature=body.temperature,
                                                      top_k=body.top_k, top_p=body.top_p, seed=seed,
                                                      deadline=limit), limit)
        if sid in sessions.items:
            sessions.fit(sid)
        return SessionText(id=sid, model=session.served.name, text=text, tokens=session.stream.tokens, seed=seed)

    @app.delete("/sessions/{sid}", status_code=204, operation_id="delete_session",
                responses=_errors(404, 422, keys=keys), **session_routes)
    async def delete_session(sid: SessionId) -> Response:
        """Forget the session."""
        sessions.remove(sid)
        return Response(status_code=204)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = _add_links_and_security(schema, keys=keys)
        return app.openapi_schema

    app.openapi = openapi
    app.state.sessions = sessions  # for tests and operators: the live sessions
    app.state.models = served
    return app


# ---------------------------------------------------------------- configuration: models, keys, address


def _inspect_routes(app: FastAPI, *, bodies: SimpleNamespace, pick: Callable, run: Callable, deadline: Callable,
                    keys: bool, lm_routes: dict[str, Any], words_routes: dict[str, Any]) -> None:
    """POST /inspect (a language model's units) and POST /inspect/words (a classifier's tokens), on ``app``.

    ``pick``, ``run`` and ``deadline`` are :func:`create_app`'s: the model a body names, model work on the
    pool within the request's deadline.
    """

    @app.post("/inspect", response_model=InspectResponse, tags=["language model"], operation_id="inspect",
              responses=_errors(400, 422, 503, 504, keys=keys), **lm_routes)
    async def inspect(body: bodies.InspectRequest) -> InspectResponse:
        """Read the text with the stepwise forward and rank a layer's units by how well they track simple
        features of the text (Karpathy et al. 2015), with each shown unit's activation after every token."""
        m = pick(LANGUAGE_MODEL, body.model, "/inspect")

        def work() -> InspectResponse:
            stack, (ids, missing) = m.ckpt.model.recurrent, m.encode(body.text, body.unknown)
            layer = stack.layers - 1 if body.layer is None else body.layer
            if len(ids) < 2 or layer >= stack.layers:  # nothing to correlate, or a layer check_layer_top refuses
                return InspectResponse(**_inspect_answer(m, layer, ids, missing))
            # A gate asked for as `unit` is computed too; a cell without gates (vanilla RNN) has none to add.
            gates = (body.gates or body.signal not in ("h", "c")) and stack.cell in GATE_NAMES
            ins = inspect_language_model(m.ckpt.model, m.tok, body.text, layer=layer, top=min(body.top, stack.hidden),
                                         gates=gates, unknown=m.policy(body.unknown))
            signals = ins.trace.signals
            chosen = (None if body.unit is None or body.signal not in signals or body.unit >= stack.hidden
                      else ins.view(ins.unit(body.signal, body.unit)))
            tr = ins.trace
            return InspectResponse(model=m.name, layer=ins.layer, signals=list(signals),
                                   tokens=[tr.text[a:b] for a, b in tr.spans],
                                   ranking={f: [ins.view(u) for u in units] for f, units in ins.ranking.items()},
                                   constant_features=ins.constant, unit=chosen, unknown=missing)

        return await run(work, deadline())

    @app.post("/inspect/words", response_model=WordsResponse, tags=["classifier"], operation_id="inspect_words",
              responses=_errors(400, 422, 503, 504, keys=keys), **words_routes)
    async def inspect_words(body: bodies.WordsRequest) -> WordsResponse:
        """Which tokens moved the prediction: the predicted label's probability after each prefix of each text."""
        m = pick(CLASSIFY, body.model, "/inspect/words")
        labels, data, policy = m.ckpt.meta["labels"], m.ckpt.run_config.data, m.policy(body.unknown)

        def explain(text: str) -> WordsResult:
            missing = m.tok.unknown_in(text)
            if not m.encode(text, body.unknown)[0]:
                return WordsResult(label=None, probability=None, before=None, tokens=[], unknown=missing)
            found = attribute(m.ckpt.model, m.tok, labels, text, max_len=data.max_len, truncate=data.truncate,
                              unknown=policy).to_dict()
            return WordsResult(label=found["label"], probability=found["probability"], before=found["before"],
                               tokens=found["tokens"], unknown=missing)

        return await run(lambda: WordsResponse(model=m.name, results=[explain(t) for t in body.texts]), deadline())


def parse_checkpoints(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=RUN`` or ``RUN`` (named after its run directory) -> (name, path) pairs, names unique."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not MODEL_NAME.fullmatch(name) or Path(spec).exists():
            name, path = model_name(spec), spec
        if not path:
            raise RnnkitError(f"--checkpoint {spec!r}: give a run directory after '{name}='")
        if name in {n for n, _ in out}:
            raise RnnkitError(f"two checkpoints are named {name!r}: name them apart with --checkpoint NAME=RUN")
        out.append((name, path))
    if not out:
        raise RnnkitError("give at least one --checkpoint")
    return out


def _check_key(key: str, where: str) -> str:
    if len(key) < MIN_KEY_LENGTH:
        raise RnnkitError(f"the API key from {where} is shorter than {MIN_KEY_LENGTH} characters; use a long random "
                          "one (python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not all(33 <= ord(c) <= 126 for c in key):
        raise RnnkitError(f"the API key from {where} has spaces or characters outside printable ASCII "
                          "(an HTTP header cannot carry them)")
    return key


def api_keys(*, key: str | None = None, key_file: str | Path | None = None,
             env: Mapping[str, str] = os.environ) -> list[str]:
    """The keys the server accepts: ``key``, ``$RNNKIT_API_KEY`` and one per line of ``key_file`` (# comments)."""
    keys = []
    if key is not None:
        keys.append(_check_key(key, "--api-key"))
    if env.get("RNNKIT_API_KEY"):
        keys.append(_check_key(env["RNNKIT_API_KEY"], "RNNKIT_API_KEY"))
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise RnnkitError(f"--api-key-file {key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        found = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
        if not found:
            raise RnnkitError(f"--api-key-file {key_file} holds no key (one per line; # starts a comment)")
        keys += [_check_key(k, f"--api-key-file {key_file}, line {n}") for n, k in found]
    return list(dict.fromkeys(keys))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a one-line error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP spelled out: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections
        # whose socket says so, and with proto 0 every response whose headers and body go out in two
        # writes waited ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise RnnkitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM it has handled (graceful stop) ends the process with status 0.

    uvicorn re-raises the signal after its shutdown, so that the default
    action (death by SIGTERM, status -15) follows; a service manager then
    reports a failure for what was an orderly stop.
    """

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def serve(
    checkpoints: str | Path | Sequence[tuple[str, str | Path]],
    *,
    host: str | None = None,
    port: int = 8000,
    limits: ServeLimits = ServeLimits(),
    workers: int = 2,
    threads: int = 1,
    log_level: str = "info",
    keys: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    shutdown_timeout: float = 30.0,
) -> None:
    """Load the checkpoints once and serve them until SIGTERM or Ctrl-C.

    ``host`` None: loopback only (127.0.0.1). Messages never show a key.
    """
    if shutdown_timeout < 0:
        raise RnnkitError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout:g}")
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [(model_name(checkpoints), str(checkpoints))]
    if threads > 0:
        torch.set_num_threads(threads)  # per worker: workers x threads should not exceed the cores
    loaded = {name: load_checkpoint(path) for name, path in checkpoints}
    app = create_app(loaded, limits=limits, workers=workers, api_keys=keys, cors_origins=cors_origins)
    address = host or "127.0.0.1"
    sock = listen(address, port)
    shown = f"[{address}]" if ":" in address else address
    held = ", ".join(f"{name} ({ckpt.task}, {ckpt.path})" for name, ckpt in loaded.items())
    print(f"rnnkit: serving {held} on http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C or SIGTERM stops)",
          file=sys.stderr, flush=True)
    if keys:
        print(f"rnnkit: {len(keys)} API key(s): every endpoint but /health needs 'Authorization: Bearer KEY'",
              file=sys.stderr, flush=True)
    elif host is None:
        print("rnnkit: no API key, so listening on loopback only (this machine); --host to listen elsewhere, "
              "RNNKIT_API_KEY or --api-key-file to ask for a key", file=sys.stderr, flush=True)
    elif not _is_loopback(address):
        print(f"rnnkit: warning: no API key and listening on {address}: anyone who can reach it can use this "
              "server (set RNNKIT_API_KEY or --api-key-file)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    _Server(config).run(sockets=[sock])
