"""An HTTP API and one small web page over one checkpoint (the optional ``serve`` extra: FastAPI + uvicorn).

``create_app(checkpoint)`` builds the application; ``serve(...)`` loads a
checkpoint and runs it with uvicorn (``rnnkit serve``). The model is loaded
once and shared: every request's model work runs in a bounded pool of worker
threads, under ``torch.inference_mode``, with its own seeded
``torch.Generator``, so a seed gives the same text whatever runs alongside.

Language models get ``/generate`` (whole texts), ``/generate/stream``
(server-sent events, one per new piece of text) and sessions: a session keeps
the recurrent state after everything it has read, so feeding it more text or
continuing it costs only the new tokens, however long its history. Sessions
are bounded in number and idle time and evicted least recently used first.
Classifiers get ``/classify``. Every user mistake is a 4xx with a one-line
``{"error": ...}``: 422 for a malformed or out-of-range request (or a prime
the vocabulary cannot encode), 400 for an endpoint the checkpoint's task does
not serve, 404 for an unknown session, 413 for an oversized body.

Loads through :mod:`rnnkit.checkpoint`; never imports ``rnnkit.training``.
"""

# No `from __future__ import annotations`: FastAPI reads the request models from the
# annotations of the endpoints defined inside create_app, so they must be real classes.

import asyncio
import json
import math
import secrets
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from rnnkit import __version__, tasks
from rnnkit.checkpoint import Checkpoint, load_checkpoint
from rnnkit.config import ServeLimits, generation_window
from rnnkit.data.tokenizers import Tokenizer
from rnnkit.errors import RnnkitError
from rnnkit.generation import Stream
from rnnkit.inference import StreamText, classify_texts, continuation, encode_prime

SEED_MAX = 2**63 - 1
# A session remembers this many of its last tokens (besides its state) to decode
# what it writes next with the right spacing and whole multi-byte characters.
DECODE_CONTEXT = 64


class ApiError(Exception):
    """A user mistake, answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------- request and response bodies


class _Body(BaseModel):
    # Strict: "3" is not a number and true is not 1; unknown keys (typos) and NaN/Infinity are errors.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Unknown = Literal["error", "skip", "unk"]
UNKNOWN_HELP = ("pieces of the text the vocabulary lacks: error, skip them, or map them to <unk> "
                "(default: error for characters and BPE, unk for words)")


def _request_models(limits: ServeLimits) -> SimpleNamespace:
    """The request bodies, with this server's limits in their schema (and so in the OpenAPI document)."""

    class Sampling(_Body):
        length: int = Field(200, ge=0, le=limits.max_length, description="tokens to generate")
        temperature: float = Field(0.8, ge=0, le=100, description="0 is greedy; higher is more varied")
        top_k: int = Field(0, ge=0, description="sample only among the k likeliest tokens (0: off)")
        top_p: float = Field(1.0, gt=0, le=1, description="sample only from the top-p probability mass (1: off)")
        seed: int | None = Field(None, ge=0, le=SEED_MAX,
                                 description="seed for a repeatable sample (default: a random one, returned)")

    class StreamRequest(Sampling):
        prime: str = Field("", description="text to start from (empty: the model's default prime)")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    class GenerateRequest(StreamRequest):
        num_samples: int = Field(1, ge=1, le=limits.max_samples, description="independent samples, one batch")

    class ClassifyRequest(_Body):
        texts: list[str] = Field(min_length=1, max_length=limits.max_texts, description="texts to label")

    class FeedRequest(_Body):
        text: str = Field("", description="text to append to the session's history")
        unknown: Unknown | None = Field(None, description=UNKNOWN_HELP)

    return SimpleNamespace(Sampling=Sampling, StreamRequest=StreamRequest, GenerateRequest=GenerateRequest,
                           ClassifyRequest=ClassifyRequest, FeedRequest=FeedRequest)


class GenerateResponse(BaseModel):
    texts: list[str] = Field(description="the new text of each sample (without the prime)")
    prime: str = Field(description="the text generation started from")
    seed: int
    tokens: int = Field(description="tokens generated per sample")
    unknown: list[str] = Field(description="pieces of the prime the vocabulary lacks (skipped or <unk>)")


class ClassifyResult(BaseModel):
    label: str
    probability: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    labels: list[str] = Field(description="every label the model knows")
    results: list[ClassifyResult] = Field(description="one per text, in order")


class SessionInfo(BaseModel):
    id: str
    tokens: int = Field(description="tokens the session has read and written so far")
    fed: int = Field(0, description="tokens this request added")
    unknown: list[str] = Field([], description="pieces of the text the vocabulary lacks (skipped or <unk>)")


class SessionText(BaseModel):
    id: str
    text: str = Field(description="the new text, now part of the session")
    tokens: int = Field(description="tokens the session holds now")
    seed: int


# ---------------------------------------------------------------- sessions


class Session:
    """One text being read and continued: a :class:`Stream` plus the tail of ids for decoding."""

    def __init__(self, stream: Stream, tokenizer: Tokenizer) -> None:
        self.stream = stream
        self.tokenizer = tokenizer
        self.tail: list[int] = []
        self.lock = asyncio.Lock()  # one request at a time: a Stream is not thread-safe
        self.used = 0.0

    def feed(self, text: str, unknown: str | None) -> tuple[int, list[str]]:
        """Read ``text``: costs only its own tokens. Returns how many, and the pieces the vocabulary lacks."""
        try:
            ids = self.tokenizer.encode(text, unknown=unknown or self.tokenizer.default_unknown).tolist()
        except RnnkitError as exc:
            raise RnnkitError(f"text: {exc}") from None
        self.stream.feed(ids)
        self.tail = (self.tail + ids)[-DECODE_CONTEXT:]
        return len(ids), self.tokenizer.unknown_in(text)

    def generate(self, *, length: int, temperature: float, top_k: int, top_p: float, seed: int) -> str:
        gen = torch.Generator().manual_seed(seed)
        steps = self.stream.sample(length=length, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        new = [int(ids[0]) for ids in steps]
        text = continuation(self.tokenizer, self.tail, new)
        self.tail = (self.tail + new)[-DECODE_CONTEXT:]
        return text


class Sessions:
    """The live sessions, least recently used first; bounded in number and in idle time.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(self, *, limit: int, idle: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.idle = idle
        self.clock = clock
        self.items: OrderedDict[str, Session] = OrderedDict()

    def add(self, session: Session) -> str:
        self.sweep()
        while len(self.items) >= self.limit:
            self.items.popitem(last=False)
        sid = secrets.token_urlsafe(12)
        session.used = self.clock()
        self.items[sid] = session
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

    def sweep(self) -> None:
        """Drop the sessions idle for too long; the oldest come first, so stop at the first fresh one."""
        deadline = self.clock() - self.idle
        while self.items:
            sid, session = next(iter(self.items.items()))
            if session.used >= deadline:
                break
            del self.items[sid]


# ---------------------------------------------------------------- the application


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
        await JSONResponse({"error": message}, status_code=413)(scope, receive, send)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    """One line out of pydantic's error list: 'length: Input should be ...; top_p: ...'."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])} "
                         f"(at character {error['loc'][-1]})")
            continue
        where = ".".join(str(x) for x in error["loc"] if x != "body")
        msg = error["msg"]
        if error.get("type") == "model_attributes_type" and not where:
            msg = "the body must be a JSON object (Content-Type: application/json)"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


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
            yield item
        await job  # a failure in the worker surfaces here
    finally:
        stop.set()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


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


def create_app(
    ckpt: Checkpoint,
    *,
    limits: ServeLimits = ServeLimits(),
    workers: int = 2,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The application for one loaded checkpoint; model work runs on ``workers`` threads."""
    if workers < 1:
        raise RnnkitError(f"--workers must be at least 1, got {workers}")
    tok, model = ckpt.tokenizer, ckpt.model
    model.eval()  # dropout off: the shared model is only ever read
    info = describe(ckpt, limits)
    window = info.get("window", 0)
    default_prime = info.get("default_prime", "\n")
    bodies = _request_models(limits)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rnnkit-worker")
    sessions = Sessions(limit=limits.max_sessions, idle=limits.session_idle, clock=clock)

    async def run(fn: Callable, *args, **kwargs):
        """Run model work on the pool; a tokenizer's or sampler's complaint is the user's (422)."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, lambda: fn(*args, **kwargs))
        except RnnkitError as exc:
            # The tokenizers word their hint for the CLI; here the same switch is a request field.
            raise ApiError(422, str(exc).replace("--unknown skip", '"unknown": "skip"')) from None

    def need(capability: str, endpoint: str) -> None:
        try:
            tasks.require(ckpt.task, capability, what=endpoint, where="this server")
        except tasks.WrongTask as exc:
            raise ApiError(400, str(exc)) from None

    def open_stream(prime_text: str, unknown: str | None, rows: int):
        prime = encode_prime(tok, prime_text or default_prime, unknown=unknown)
        stream = Stream(model, window=window)
        stream.feed(prime.ids)  # the prime is read once, whatever the number of samples
        stream.fork(rows)
        return stream, prime

    def new_seed(seed: int | None) -> int:
        return secrets.randbelow(2**31) if seed is None else seed

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="rnnkit", version=__version__, lifespan=lifespan,
                  description=f"Serving the {ckpt.task} checkpoint {ckpt.path.name} ({tok.kind} level).")
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Not the offending inputs: they may be large, or NaN, which JSON cannot carry.
        detail = [{key: error[key] for key in ("type", "loc", "msg") if key in error} for error in errors]
        return JSONResponse({"error": _validation_message(errors), "detail": jsonable_encoder(detail)},
                            status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("rnnkit").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": ckpt.task, "sessions": len(sessions.items)}

    @app.get("/model", tags=["server"])
    async def model_info() -> dict[str, Any]:
        return info

    @app.post("/generate", response_model=GenerateResponse, tags=["language model"])
    async def generate(body: bodies.GenerateRequest) -> GenerateResponse:
        """Continue the prime ``num_samples`` times; each sample's new text."""
        need("generates", "/generate")
        seed = new_seed(body.seed)

        def work() -> GenerateResponse:
            stream, prime = open_stream(body.prime, body.unknown, body.num_samples)
            gen = torch.Generator().manual_seed(seed)
            steps = list(stream.sample(length=body.length, temperature=body.temperature, top_k=body.top_k,
                                       top_p=body.top_p, generator=gen))
            columns = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(body.num_samples)]
            return GenerateResponse(texts=[continuation(tok, prime.ids, ids) for ids in columns],
                                    prime=body.prime or default_prime, seed=seed, tokens=body.length,
                                    unknown=prime.unknown)

        return await run(work)

    @app.post("/generate/stream", tags=["language model"], response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "server-sent events: `start` {prime, seed, unknown}, then a "
                                              "`token` {text} per new piece of text, then `done` {tokens, text}"}})
    async def generate_stream(body: bodies.StreamRequest) -> StreamingResponse:
        """Continue the prime, sending each piece of text as soon as it exists (server-sent events)."""
        need("generates", "/generate/stream")
        seed = new_seed(body.seed)
        stream, prime = await run(open_stream, body.prime, body.unknown, 1)  # errors here are still JSON
        steps = stream.sample(length=body.length, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, generator=torch.Generator().manual_seed(seed))

        def events() -> Iterator[str]:  # runs on a worker thread
            yield _sse("start", {"prime": body.prime or default_prime, "seed": seed, "unknown": prime.unknown})
            text, new = StreamText(tok, prime.ids, echo=False), []
            for ids in steps:
                new.append(int(ids[0]))
                piece = text.push(new[-1:])
                if piece:
                    yield _sse("token", {"text": piece})
            yield _sse("done", {"tokens": len(new), "text": continuation(tok, prime.ids, new)})

        return StreamingResponse(_iterate_on(pool, events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/classify", response_model=ClassifyResponse, tags=["classifier"])
    async def classify(body: bodies.ClassifyRequest) -> ClassifyResponse:
        """The likeliest label of each text, with every label's probability."""
        need("classifies", "/classify")
        labels = ckpt.meta["labels"]
        data = ckpt.run_config.data

        def work() -> ClassifyResponse:
            probs, index = classify_texts(model, tok, labels, body.texts, max_len=data.max_len,
                                          truncate=data.truncate)
            empty = sorted(set(range(len(body.texts))) - set(index.tolist()))
            if empty:
                raise ApiError(422, f"texts at position(s) {', '.join(map(str, empty[:10]))} have no tokens "
                                    "the model can read (empty or blank)")
            results = [ClassifyResult(label=labels[int(p.argmax())], probability=float(p.max()),
                                      probabilities={label: float(q) for label, q in zip(labels, p, strict=True)})
                       for p in probs]
            return ClassifyResponse(labels=labels, results=results)

        return await run(work)

    @app.post("/sessions", response_model=SessionInfo, status_code=201, tags=["sessions"])
    async def create_session(body: bodies.FeedRequest) -> SessionInfo:
        """Start a session, optionally with some text; returns its id."""
        need("generates", "/sessions")
        session = Session(Stream(model, window=window), tok)
        fed, unknown = await run(session.feed, body.text, body.unknown) if body.text else (0, [])
        sid = sessions.add(session)
        return SessionInfo(id=sid, tokens=session.stream.tokens, fed=fed, unknown=unknown)

    @app.get("/sessions/{sid}", response_model=SessionInfo, tags=["sessions"])
    async def session_info(sid: str) -> SessionInfo:
        session = sessions.get(sid)
        return SessionInfo(id=sid, tokens=session.stream.tokens)

    @app.post("/sessions/{sid}/feed", response_model=SessionInfo, tags=["sessions"])
    async def feed_session(sid: str, body: bodies.FeedRequest) -> SessionInfo:
        """Append text to the session: costs only the new tokens."""
        session = sessions.get(sid)
        async with session.lock:
            fed, unknown = await run(session.feed, body.text, body.unknown)
        return SessionInfo(id=sid, tokens=session.stream.tokens, fed=fed, unknown=unknown)

    @app.post("/sessions/{sid}/generate", response_model=SessionText, tags=["sessions"])
    async def continue_session(sid: str, body: bodies.Sampling) -> SessionText:
        """Continue the session's text; the new text becomes part of it. Costs only the new tokens."""
        session = sessions.get(sid)
        seed = new_seed(body.seed)
        async with session.lock:
            if session.stream.tokens == 0:  # nothing read yet: start from the model's default prime
                await run(session.feed, default_prime, "skip")
            text = await run(session.generate, length=body.length, temperature=body.temperature,
                             top_k=body.top_k, top_p=body.top_p, seed=seed)
        return SessionText(id=sid, text=text, tokens=session.stream.tokens, seed=seed)

    @app.delete("/sessions/{sid}", status_code=204, tags=["sessions"])
    async def delete_session(sid: str) -> Response:
        sessions.remove(sid)
        return Response(status_code=204)

    app.state.sessions = sessions  # for tests and operators: the live sessions
    return app


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


def serve(
    checkpoint: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServeLimits = ServeLimits(),
    workers: int = 2,
    threads: int = 1,
    log_level: str = "info",
) -> None:
    """Load ``checkpoint`` once and serve it until interrupted."""
    if threads > 0:
        torch.set_num_threads(threads)  # per worker: workers x threads should not exceed the cores
    ckpt = load_checkpoint(checkpoint)
    app = create_app(ckpt, limits=limits, workers=workers)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"rnnkit: serving the {ckpt.task} checkpoint {ckpt.path} on http://{shown}:{sock.getsockname()[1]}/ "
          f"(Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
