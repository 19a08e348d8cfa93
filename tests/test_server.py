"""The HTTP server: every endpoint through FastAPI's TestClient, and the real server driven by a headless browser.

Checkpoints are built and saved without training (random weights are enough
to check what the server does with them); the answers are compared with the
library's own generate/classify on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install 'rnnkit[serve]'")

from fastapi.testclient import TestClient  # noqa: E402

import rnnkit  # noqa: E402
from rnnkit.checkpoint import load_checkpoint, write_checkpoint  # noqa: E402
from rnnkit.cli import main  # noqa: E402
from rnnkit.config import RunConfig, ServeLimits  # noqa: E402
from rnnkit.data.tokenizers import CharTokenizer  # noqa: E402
from rnnkit.generation import generate_ids  # noqa: E402
from rnnkit.inference import classify_texts  # noqa: E402
from rnnkit.models.language_model import LanguageModel  # noqa: E402
from rnnkit.server import create_app  # noqa: E402
from tiny import classifier_checkpoint  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n"
LIMITS = ServeLimits(max_length=60, max_samples=3, max_texts=4, max_request_bytes=40_000, max_sessions=3,
                     session_idle=60)


def _save(path: Path, model, tokenizer, config: RunConfig, *, extra=None, state=None) -> Path:
    return write_checkpoint(path, model=model, tokenizer=tokenizer, task=config.task, run_config=config,
                            state=state or {"step": 7, "best_val_loss": 1.5, "default_prime": "ROMEO"},
                            extra=extra)


def _lm(path: Path, *, window: int = 0) -> Path:
    torch.manual_seed(0)
    config = RunConfig()
    config.model.hidden, config.model.layers = 32, 2
    if window:
        config.data.target, config.data.seq_len = "last", window
    tok = CharTokenizer.fit(TEXT)
    return _save(path, LanguageModel(config=config.model, vocab_size=tok.vocab_size), tok, config)


def _classifier(path: Path) -> Path:
    return classifier_checkpoint(path)


class Clock:
    """A clock the tests move by hand, for idle-session eviction."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"lm": _lm(root / "lm"), "window": _lm(root / "window", window=4), "cls": _classifier(root / "cls")}


@pytest.fixture(scope="module")
def lm(paths):
    return load_checkpoint(paths["lm"])


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def client(lm, clock):
    return TestClient(create_app(lm, limits=LIMITS, clock=clock))


@pytest.fixture(scope="module")
def cls_client(paths):
    return TestClient(create_app(load_checkpoint(paths["cls"]), limits=LIMITS))


def post(client, url, body, status=200):
    response = client.post(url, json=body)
    assert response.status_code == status, response.text
    return response.json()


def events(body: str) -> list[tuple[str, dict]]:
    """Parse server-sent events: (event name, JSON data) pairs."""
    out = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields["event"], json.loads(fields["data"])))
    return out


# ---------------------------------------------------------------- information


def test_health_model_and_openapi(client):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert info["task"] == "language_model" and info["level"] == "char"
    assert info["vocab_size"] == len(set(TEXT)) and info["parameters"] > 10_000
    assert info["training"] == {"step": 7, "best_val_loss": 1.5} and info["default_prime"] == "ROMEO"
    assert info["model"]["hidden"] == 32 and info["window"] == 0
    schema = client.get("/openapi.json").json()
    assert {"/health", "/models", "/model", "/generate", "/generate/stream", "/inspect", "/sessions", "/sessions/{sid}",
            "/sessions/{sid}/feed", "/sessions/{sid}/generate"} == set(schema["paths"])  # no /classify: no classifier
    # The server's limits are part of the schema.
    properties = schema["components"]["schemas"]["GenerateRequest"]["properties"]
    assert properties["length"]["maximum"] == LIMITS.max_length
    assert properties["prime"]["maxLength"] * 12 + 512 <= LIMITS.max_request_bytes  # any valid prime fits the body


def test_the_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="generate"' in page.text and "generate/stream" in page.text and "classify" in page.text


# ---------------------------------------------------------------- generation


def test_generate_matches_the_library_and_repeats_for_a_seed(client, lm):
    body = {"prime": "JULIET", "length": 30, "temperature": 1.0, "seed": 5, "num_samples": 3}
    answer = post(client, "/generate", body)
    assert answer["seed"] == 5 and answer["prime"] == "JULIET" and len(answer["texts"]) == 3
    expected = generate_ids(lm.model, lm.tokenizer.encode("JULIET").tolist(), length=30, temperature=1.0,
                            num_samples=3, generator=torch.Generator().manual_seed(5))
    assert answer["texts"] == [lm.tokenizer.decode(ids) for ids in expected]
    assert post(client, "/generate", body) == answer
    assert post(client, "/generate", {**body, "seed": 6})["texts"] != answer["texts"]


def test_without_a_seed_the_answer_names_the_one_used(client):
    answer = post(client, "/generate", {"prime": "ROM", "length": 12})
    again = post(client, "/generate", {"prime": "ROM", "length": 12, "seed": answer["seed"]})
    assert again["texts"] == answer["texts"]


def test_empty_prime_means_the_model_default(client):
    default = post(client, "/generate", {"length": 10, "temperature": 0})
    explicit = post(client, "/generate", {"prime": "ROMEO", "length": 10, "temperature": 0})
    assert default["prime"] == "ROMEO" and default["texts"] == explicit["texts"]


def test_length_zero_gives_empty_texts(client):
    assert post(client, "/generate", {"length": 0, "num_samples": 2})["texts"] == ["", ""]


def test_stream_sends_the_same_text_piece_by_piece(client):
    body = {"prime": "ROMEO:", "length": 25, "temperature": 0.7, "seed": 11}
    response = client.post("/generate/stream", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    stream = events(response.text)
    assert stream[0] == ("start", {"model": "lm", "prime": "ROMEO:", "seed": 11, "unknown": []})
    pieces = [data["text"] for name, data in stream if name == "token"]
    assert len(pieces) == 25  # char level: one event per token
    assert stream[-1] == ("done", {"tokens": 25, "text": "".join(pieces)})
    assert "".join(pieces) == post(client, "/generate", body)["texts"][0]


def test_unknown_characters_in_the_prime_are_skipped_and_listed(client):
    answer = post(client, "/generate", {"prime": "ROMEO€", "length": 5, "temperature": 0})
    assert answer["unknown"] == ["€"] and answer["prime"] == "ROMEO€"
    assert answer["texts"] == post(client, "/generate", {"prime": "ROMEO", "length": 5, "temperature": 0})["texts"]
    # Nothing readable at all: the model's default prime, as for an empty one.
    answer = post(client, "/generate", {"prime": "€€", "length": 5, "temperature": 0})
    assert answer["prime"] == "ROMEO" and answer["unknown"] == ["€"]
    stream = events(client.post("/generate/stream", json={"prime": "€€", "length": 5, "temperature": 0}).text)
    assert stream[0][1]["prime"] == "ROMEO" and stream[-1][1]["text"] == answer["texts"][0]


def test_lone_surrogates_are_read_as_the_replacement_character(client, cls_client):
    raw = '{"prime": "RO\\ud800MEO", "length": 3, "temperature": 0}'  # JSON may carry one; it is no character
    response = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["unknown"] == ["\ufffd"]
    assert response.json()["prime"] == "RO\ufffdMEO"
    raw = '{"texts": ["a good \\udfff film"]}'
    response = cls_client.post("/classify", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.json()["results"][0]["unknown"] == ["\ufffd"]


def test_whole_numbers_written_with_a_point_are_integers(client):
    """JSON has one number type: 10.0 is the integer 10 (as JSON Schema says), 2.5 is not."""
    assert post(client, "/generate", {"length": 10.0, "seed": 3.0, "temperature": 0})["tokens"] == 10
    assert client.post("/generate", json={"length": 2.5}).status_code == 422


# ---------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, field", [
    ({"length": 61}, "length"),
    ({"length": -1}, "length"),
    ({"num_samples": 4}, "num_samples"),
    ({"num_samples": 0}, "num_samples"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**53}, "seed"),  # seeds stay exact in every JSON client
    ({"unknown": "error"}, "unknown"),  # the server never refuses text for what it holds
    ({"prime": "R" * 3300}, "prime"),  # longer than maxLength: could not fit the body limit once escaped
    ({"model": "nope"}, "model"),
    ({"length": "10"}, "length"),
    ({"length": 2.5}, "length"),
    ({"prime": 5}, "prime"),
    ({"unknown": "ignore"}, "unknown"),
    ({"lenght": 10}, "lenght"),
])
def test_out_of_range_or_mistyped_values_are_422_with_a_message(client, body, field):
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    assert response.json()["error"].startswith(f"{field}: ")


@pytest.mark.parametrize("raw, message", [
    ('{"length": 5', "malformed JSON"),
    ('{"temperature": NaN}', "temperature: "),
    ("[1, 2]", "must be a JSON object"),
    ("", "Field required"),
])
def test_malformed_bodies_are_422(client, raw, message):
    for url in ("/generate", "/generate/stream", "/sessions"):
        response = client.post(url, content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and message in response.json()["error"], (url, response.text)


def test_oversized_bodies_are_413_declared_or_streamed(client):
    big = json.dumps({"prime": "R" * 50_000}).encode()
    response = client.post("/generate", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "40,000 bytes" in response.json()["error"]
    chunks = iter([big[:30_000], big[30_000:]])  # no Content-Length: counted while it arrives
    response = client.post("/generate", content=chunks, headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_endpoints_of_the_other_task_are_400(client, cls_client):
    for url, body in (("/generate", {}), ("/generate/stream", {}), ("/sessions", {})):
        response = cls_client.post(url, json=body)
        assert response.status_code == 400 and "needs a language model" in response.json()["error"]
    response = client.post("/classify", json={"texts": ["x"]})
    assert response.status_code == 400 and "needs a classifier" in response.json()["error"]


# ---------------------------------------------------------------- classification


def test_classify_gives_labels_and_probabilities(cls_client, paths):
    texts = ["a good film", "dull plot , bad acting", "never seen words"]
    answer = post(cls_client, "/classify", {"texts": texts})
    assert answer["labels"] == ["neg", "pos"] and len(answer["results"]) == 3
    ckpt = load_checkpoint(paths["cls"])
    probs, _ = classify_texts(ckpt.model, ckpt.tokenizer, ["neg", "pos"], texts, max_len=80)
    for result, p in zip(answer["results"], probs, strict=True):
        assert result["probabilities"] == pytest.approx({"neg": p[0], "pos": p[1]})
        assert result["label"] == ["neg", "pos"][int(p.argmax())] and result["probability"] == pytest.approx(p.max())
    info = cls_client.get("/model").json()
    assert info["labels"] == ["neg", "pos"] and info["level"] == "word" and "default_prime" not in info


def test_classify_limits_and_texts_without_tokens(cls_client):
    assert cls_client.post("/classify", json={"texts": []}).status_code == 422
    assert cls_client.post("/classify", json={"texts": ["a"] * 5}).status_code == 422
    answer = post(cls_client, "/classify", {"texts": ["a good film", "   ", ""]})
    assert answer["results"][0]["label"] in ("neg", "pos") and answer["results"][0]["tokens"] == 3
    # Nothing to read: no label rather than a made-up one.
    assert answer["results"][1:] == [{"label": None, "probability": None, "probabilities": None, "tokens": 0,
                                      "unknown": []}] * 2
    assert post(cls_client, "/classify", {"texts": [" "]})["results"][0]["label"] is None
    # A word vocabulary reads unknown words as <unk>, or skips them when asked.
    unk = post(cls_client, "/classify", {"texts": ["a zebra film"]})["results"][0]
    skip = post(cls_client, "/classify", {"texts": ["a zebra film"], "unknown": "skip"})["results"][0]
    assert (unk["tokens"], unk["unknown"], skip["tokens"], skip["unknown"]) == (3, ["zebra"], 2, ["zebra"])


# ---------------------------------------------------------------- inspection


def test_inspect_ranks_units_as_the_library_does(client, lm):
    from rnnkit.views import inspect_language_model

    text = "ROMEO: But soft, what light\nJULIET: Ay me.\n"
    answer = post(client, "/inspect", {"text": text, "top": 3, "layer": 0, "unit": 7, "signal": "c"})
    ins = inspect_language_model(lm.model, lm.tokenizer, text, layer=0, top=3)
    assert answer["layer"] == 0 and answer["signals"] == ["h", "c"] and "".join(answer["tokens"]) == text
    assert answer["constant_features"] == ins.constant == ["in_quotes", "in_brackets", "digit"]
    assert list(answer["ranking"]) == list(ins.ranking)
    for feature, units in ins.ranking.items():
        sent = answer["ranking"][feature]
        assert [(u["signal"], u["unit"], u["feature"]) for u in sent] == [(u.signal, u.unit, feature) for u in units]
        assert [u["r"] for u in sent] == pytest.approx([u.r for u in units], abs=1e-4)
        assert sent[0]["values"] == pytest.approx(ins.activations(units[0]).tolist(), abs=1e-4)
    chosen = answer["unit"]
    assert (chosen["signal"], chosen["unit"]) == ("c", 7) and len(chosen["values"]) == len(answer["tokens"])
    assert chosen["values"] == pytest.approx(ins.trace.signals["c"][:, 0, 7].tolist(), abs=1e-4)


def test_inspect_answers_every_valid_request(client):
    # Too little text to correlate anything: an answer with nothing ranked, not an error.
    short = post(client, "/inspect", {"text": "R", "unit": 1})
    assert (short["tokens"], short["ranking"], short["unit"], short["layer"]) == (["R"], {}, None, 1)
    # More units than the layer has: all of them; a unit or signal it lacks: null; gates asked for a gate unit.
    wide = post(client, "/inspect", {"text": "ROMEO: But", "top": 200, "unit": 999})
    assert all(len(units) == 32 for units in wide["ranking"].values()) and wide["unit"] is None
    gate = post(client, "/inspect", {"text": "ROMEO: But", "signal": "f", "unit": 2})
    assert gate["signals"] == ["h", "c", "i", "f", "g", "o"] and gate["unit"]["signal"] == "f"
    assert post(client, "/inspect", {"text": "ROMEO: But", "signal": "z", "unit": 2})["unit"] is None  # a GRU's
    response = client.post("/inspect", json={"text": "ROMEO", "layer": 2})
    assert response.status_code == 422 and "layer" in response.json()["error"]


def test_inspect_is_for_language_models_and_words_for_classifiers(client, cls_client):
    response = cls_client.post("/inspect", json={"text": "a good film"})
    assert response.status_code == 400 and "needs a language model" in response.json()["error"]
    response = client.post("/inspect/words", json={"texts": ["ROMEO"]})
    assert response.status_code == 400 and "needs a classifier" in response.json()["error"]


def test_inspect_words_are_the_librarys_attribution(cls_client, paths):
    from rnnkit.views import attribute

    answer = post(cls_client, "/inspect/words", {"texts": ["a good film , dull plot", " ", "a zebra film"],
                                                  "unknown": "skip"})
    ckpt = load_checkpoint(paths["cls"])
    found = attribute(ckpt.model, ckpt.tokenizer, ["neg", "pos"], "a good film , dull plot", max_len=80)
    first = answer["results"][0]
    assert (first["label"], [t["token"] for t in first["tokens"]]) == (found.label, found.tokens)
    assert [t["change"] for t in first["tokens"]] == pytest.approx(found.change.tolist(), abs=1e-4)
    assert first["probability"] == pytest.approx(post(cls_client, "/classify", {"texts": ["a good film , dull plot"]})
                                                 ["results"][0]["probability"], abs=1e-4)
    assert answer["results"][1] == {"label": None, "probability": None, "before": None, "tokens": [], "unknown": []}
    zebra = answer["results"][2]
    assert [t["token"].strip() for t in zebra["tokens"]] == ["a", "film"] and zebra["unknown"] == ["zebra"]


# ---------------------------------------------------------------- sessions


def test_a_session_continues_like_one_prime_of_its_whole_history(client):
    sid = post(client, "/sessions", {"text": "JULIET: Ay"}, status=201)["id"]
    assert post(client, f"/sessions/{sid}/feed", {"text": " me."}) == {"id": sid, "model": "lm", "tokens": 14,
                                                                      "fed": 4, "unknown": []}
    first = post(client, f"/sessions/{sid}/generate", {"length": 12, "temperature": 1.0, "seed": 2})
    assert first["tokens"] == 26
    assert first["text"] == post(client, "/generate", {"prime": "JULIET: Ay me.", "length": 12,
                                                         "temperature": 1.0, "seed": 2})["texts"][0]
    # The generated text is now part of the session: the next continuation starts after it.
    second = post(client, f"/sessions/{sid}/generate", {"length": 8, "temperature": 0})
    history = "JULIET: Ay me." + first["text"]
    assert second["text"] == post(client, "/generate", {"prime": history, "length": 8,
                                                          "temperature": 0})["texts"][0]
    assert client.get(f"/sessions/{sid}").json()["tokens"] == 34


def test_continuing_a_session_reads_only_the_new_tokens(lm, clock, monkeypatch):
    """The history is never re-read: each continuation costs one step per new token."""
    read = []
    forward, stepper = lm.model.forward, lm.model.stepper
    binds = []

    def counted_stepper():  # generation's bound one-token step
        binds.append(1)
        step = stepper()
        return lambda ids, state: (read.append(ids.numel()), step(ids, state))[1]

    monkeypatch.setattr(lm.model, "stepper", counted_stepper)
    client = TestClient(create_app(lm, limits=LIMITS, clock=clock))
    assert binds == [1]  # bound once, when the model is loaded: the served weights never change
    sid = post(client, "/sessions", {"text": TEXT * 20}, status=201)["id"]
    monkeypatch.setattr(lm.model, "forward", lambda ids, state=None: (read.append(ids.numel()), forward(ids, state))[1])
    read.clear()
    post(client, f"/sessions/{sid}/generate", {"length": 10})
    assert read == [1] * 10
    read.clear()
    post(client, f"/sessions/{sid}/feed", {"text": "ROMEO"})
    assert sum(read) == 5 and binds == [1]


def test_windowed_models_keep_only_their_window(paths):
    ckpt = load_checkpoint(paths["window"])
    client = TestClient(create_app(ckpt, limits=LIMITS))
    assert client.get("/model").json()["window"] == 4
    sid = post(client, "/sessions", {"text": TEXT}, status=201)["id"]
    text = post(client, f"/sessions/{sid}/generate", {"length": 6, "temperature": 0})["text"]
    assert text == post(client, "/generate", {"prime": TEXT[-4:], "length": 6, "temperature": 0})["texts"][0]


def test_an_empty_session_starts_from_the_default_prime(client):
    sid = post(client, "/sessions", {}, status=201)["id"]
    text = post(client, f"/sessions/{sid}/generate", {"length": 6, "temperature": 0})["text"]
    assert text == post(client, "/generate", {"length": 6, "temperature": 0})["texts"][0]


def test_session_errors(client):
    assert client.post("/sessions/nope-nope-nope-n/feed", json={"text": "a"}).status_code == 404
    assert client.post("/sessions/nope-nope-nope-n/generate", json={}).status_code == 404
    assert client.get("/sessions/short").status_code == 422  # not the shape of a session id
    sid = post(client, "/sessions", {}, status=201)["id"]
    assert post(client, f"/sessions/{sid}/feed", {"text": "€"}) == {"id": sid, "model": "lm", "tokens": 0, "fed": 0,
                                                                   "unknown": ["€"]}
    assert client.post(f"/sessions/{sid}/generate", json={"length": 61}).status_code == 422
    assert client.delete(f"/sessions/{sid}").status_code == 204
    assert client.get(f"/sessions/{sid}").status_code == 404


def test_sessions_are_bounded_and_evicted_least_recently_used(client, clock):
    ids = [post(client, "/sessions", {"text": "ROMEO"}, status=201)["id"] for _ in range(3)]
    client.get(f"/sessions/{ids[0]}")  # used again: now the second is the least recent
    newest = post(client, "/sessions", {}, status=201)["id"]
    assert client.get(f"/sessions/{ids[1]}").status_code == 404
    assert all(client.get(f"/sessions/{sid}").status_code == 200 for sid in (ids[0], ids[2], newest))
    clock.now += 30
    client.get(f"/sessions/{newest}")
    clock.now += 31  # the others have now been idle for 61 s, over the 60 s allowed
    assert client.get(f"/sessions/{ids[0]}").status_code == 404
    assert client.get(f"/sessions/{newest}").status_code == 200
    assert client.get("/health").json()["sessions"] == 1


# ---------------------------------------------------------------- concurrency


def test_concurrent_requests_give_what_they_give_alone(lm):
    """Many requests at once on a 3-thread pool: each one's text depends on its own seed only."""
    import httpx

    app = create_app(lm, limits=dataclasses.replace(LIMITS, max_client_requests=24), workers=3)
    bodies = [{"prime": "ROMEO", "length": 40, "temperature": 1.0, "seed": s} for s in range(12)]

    async def all_at_once():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            answers = await asyncio.gather(*(http.post("/generate", json=b) for b in bodies),
                                           *(http.post("/generate/stream", json=b) for b in bodies))
        return [r.json()["texts"][0] for r in answers[:12]], [events(r.text)[-1][1]["text"] for r in answers[12:]]

    texts, streamed = asyncio.run(all_at_once())
    alone = [lm.tokenizer.decode(generate_ids(lm.model, lm.tokenizer.encode("ROMEO").tolist(), length=40,
                                              temperature=1.0, generator=torch.Generator().manual_seed(s))[0])
             for s in range(12)]
    assert texts == alone and streamed == alone


def _rnnkit_imports(module: str) -> set[str]:
    """The rnnkit modules a module imports when it is loaded (module level, not inside functions)."""
    import ast

    src = Path(rnnkit.__file__).parent
    path = src.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    body = [node for node in ast.parse(path.read_text(encoding="utf-8")).body
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for node in (n for top in body for n in ast.walk(top)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            # A module and the packages above it all run on import.
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0] == "rnnkit"}
    return {m for m in found if src.joinpath(*m.split(".")[1:]).with_suffix(".py").is_file()
            or src.joinpath(*m.split(".")[1:], "__init__.py").is_file()}


def test_serving_never_loads_the_training_code():
    """DESIGN: serving goes through checkpoint.py, never through training/ (checked on the import graph)."""
    loaded, todo = set(), ["rnnkit.server"]
    while todo:
        module = todo.pop()
        if module not in loaded:
            loaded.add(module)
            todo += _rnnkit_imports(module)
    assert {"rnnkit", "rnnkit.checkpoint", "rnnkit.generation", "rnnkit.inference"} <= loaded
    assert not {m for m in loaded if m.startswith("rnnkit.training")}


def test_a_stream_whose_client_leaves_frees_its_worker():
    """The worker producing a stream stops once nobody reads it (else one lost client holds a worker forever)."""
    from concurrent.futures import ThreadPoolExecutor
    from itertools import count

    from rnnkit.server import _iterate_on

    pool = ThreadPoolExecutor(max_workers=1)

    async def read_two_then_leave() -> tuple[list[str], str]:
        stream = _iterate_on(pool, (str(i) for i in count()))  # never ends by itself
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        # With the loop still running, the only worker must come free (the timeout only bounds a failure).
        free = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, lambda: "free"), 60)
        return got, free

    assert asyncio.run(read_two_then_leave()) == (["0", "1"], "free")
    pool.shutdown()


# ---------------------------------------------------------------- the command


def test_serve_without_the_extra_says_how_to_install_it(paths, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # makes `import fastapi` fail
    monkeypatch.delitem(sys.modules, "rnnkit.server", raising=False)
    monkeypatch.delattr(rnnkit, "server", raising=False)  # else `from rnnkit import server` finds it there
    assert main(["serve", "--checkpoint", str(paths["lm"])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'rnnkit[serve]'" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-length", "0"], "--max-length must be positive"),
    (["--port", "70000"], "--port must be in"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_serve_rejects_bad_flags(paths, capsys, argv, message):
    assert main(["serve", "--checkpoint", str(paths["lm"]), *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_reports_a_busy_port(paths, capsys):
    from rnnkit.server import listen

    busy = listen("127.0.0.1", 0)
    try:
        assert main(["serve", "--checkpoint", str(paths["lm"]), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        busy.close()


def test_connections_to_the_listening_socket_send_small_writes_at_once():
    """asyncio switches Nagle's algorithm off only when the socket says it is TCP; else ~40 ms per response."""
    import socket

    from rnnkit.server import listen

    async def nodelay_seen_by_the_server() -> list[int]:
        seen = []

        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listen("127.0.0.1", 0)
        server = await asyncio.start_server(handle, sock=sock)  # what uvicorn does with the socket
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        await reader.read()  # until the server hangs up
        writer.close()
        server.close()
        await server.wait_closed()
        return seen

    assert asyncio.run(nodelay_seen_by_the_server()) == [1]


# ---------------------------------------------------------------- end to end: real server, real browser


@pytest.fixture
def live_server(paths):
    """`rnnkit serve` in a subprocess on a free port of 127.0.0.1; yields (base URL, checkpoint kind) makers."""
    procs = []

    def start(*kinds: str, env: dict[str, str] | None = None) -> str:
        checkpoints = [arg for kind in kinds for arg in ("--checkpoint", f"{kind}={paths[kind]}")]
        proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "serve", *checkpoints, "--port", "0",
                                 "--log-level", "warning"], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        procs.append(proc)
        line = proc.stderr.readline()  # "rnnkit: serving ... on http://127.0.0.1:PORT/ ..."
        match = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert match, f"the server did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}"
        return match.group(0)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def _post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_page_streams_a_generation_in_a_real_browser(live_server, browser):
    base = live_server("lm")
    browser.open(base + "?prime=JULIET&length=40&temperature=0.9&seed=4&run=1")
    browser.wait_for("document.querySelector('#output[data-done]')")
    expected = _post_json(base + "generate", {"prime": "JULIET", "length": 40, "temperature": 0.9, "seed": 4})
    assert browser.evaluate("document.getElementById('output').textContent") == "JULIET" + expected["texts"][0]
    assert "40 tokens" in browser.evaluate("document.getElementById('lm-status').textContent")
    assert browser.evaluate("document.getElementById('classifier').hidden") is True


@pytest.mark.slow
def test_the_page_draws_probability_bars_for_a_classifier(live_server, browser):
    base = live_server("cls")
    browser.open(base + "?text=a+good+film&text=dull+plot&run=1")
    browser.wait_for("document.querySelector('#results[data-done]')")
    expected = _post_json(base + "classify", {"texts": ["a good film", "dull plot"]})
    shown = browser.evaluate("""[...document.querySelectorAll('.result')].map(r => ({
        label: r.querySelector('.verdict').textContent.trim(),
        bars: [...r.querySelectorAll('.bar-row')].map(b => [b.firstChild.textContent, b.querySelector('.p').textContent,
                                                             parseFloat(b.querySelector('.bar div').style.width)])
    }))""")
    assert [r["label"] for r in shown] == [r["label"] for r in expected["results"]]
    for row, result in zip(shown, expected["results"], strict=True):
        assert row["bars"] == [[label, f"{100 * p:.1f}%", pytest.approx(100 * p, abs=0.06)]
                               for label, p in result["probabilities"].items()]
    # Under each text, its tokens coloured by how much each moved the prediction.
    words = _post_json(base + "inspect/words", {"texts": ["a good film", "dull plot"]})["results"]
    drawn = browser.evaluate("[...document.querySelectorAll('.result')].map(r => [...r.querySelectorAll('.words span')]"
                             ".map(s => [s.textContent, Number(s.dataset.change), s.style.background]))")
    for row, result in zip(drawn, words, strict=True):
        assert [(t, c) for t, c, _ in row] == [(w["token"], pytest.approx(w["change"], abs=1e-9))
                                               for w in result["tokens"]]
        assert all(colour.startswith("rgb(") for _, _, colour in row)


@pytest.mark.slow
def test_the_page_asks_for_the_key_once_and_lets_you_pick_a_model(live_server, browser):
    key = "page-key-0123456789abcdef"
    base = live_server("cls", "lm", env={"RNNKIT_API_KEY": key})
    browser.open(base + "?model=lm&prime=JULIET&length=30&temperature=0&run=1")
    browser.wait_for("!document.getElementById('key-card').hidden")
    assert browser.evaluate("document.getElementById('lm').hidden") is True  # nothing shown before the key
    browser.evaluate(f"document.getElementById('api-key').value = {json.dumps(key)}; "
                     "document.getElementById('use-key').click()")
    browser.wait_for("document.querySelector('#output[data-done]')")
    request = urllib.request.Request(base + "generate", data=json.dumps(
        {"model": "lm", "prime": "JULIET", "length": 30, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        expected = json.loads(response.read())["texts"][0]
    assert browser.evaluate("document.getElementById('output').textContent") == "JULIET" + expected
    assert browser.evaluate("sessionStorage.getItem('rnnkit-api-key')") == key  # kept for this tab
    assert browser.evaluate("document.getElementById('key-card').hidden") is True
    # Both models are offered; choosing the classifier shows its panel, and its requests carry the key too.
    assert browser.evaluate("[...document.querySelectorAll('#model option')].map(o => o.value)") == ["cls", "lm"]
    browser.evaluate("const s = document.getElementById('model'); s.value = 'cls'; s.dispatchEvent(new Event('change'));"
                     "document.getElementById('texts').value = 'a good film'; document.getElementById('classify').click()")
    browser.wait_for("document.querySelector('#results[data-done]')")
    assert browser.evaluate("document.getElementById('lm').hidden") is True
    assert browser.evaluate("document.querySelectorAll('.result').length") == 1
    # A reload in the same tab does not ask again.
    browser.open(base + "?model=lm")
    browser.wait_for("document.getElementById('summary').textContent.includes('language model')")
    assert browser.evaluate("document.getElementById('key-card').hidden") is True


@pytest.mark.slow
def test_the_page_colours_the_text_by_a_unit_in_a_real_browser(live_server, browser):
    base = live_server("lm")
    text = "ROMEO: But soft, what light\nJULIET: Ay me.\n"
    browser.open(base + "?" + urllib.parse.urlencode({"inspect": text, "feature": "line_position", "run": "1"}))
    browser.wait_for("document.querySelector('#inspect-view[data-done]')")
    expected = _post_json(base + "inspect", {"text": text, "top": 3, "gates": False})["ranking"]["line_position"][0]
    spans = browser.evaluate("[...document.querySelectorAll('#inspect-view span')].map(s => [s.textContent, "
                             "Number(s.dataset.value), s.style.background])")
    assert "".join(t for t, _, _ in spans) == text
    assert [v for _, v, _ in spans] == pytest.approx(expected["values"], abs=1e-9)
    assert len({c for _, _, c in spans}) > 5  # coloured by the values, not one colour
    assert browser.evaluate("document.getElementById('inspect-choice').value") == "line_position"
    assert expected["signal"] + "[" + str(expected["unit"]) + "]" in browser.evaluate(
        "document.getElementById('inspect-unit-label').textContent")
    # A unit by number: the page asks for it and draws it.
    browser.evaluate("const s = document.getElementById('inspect-choice'); s.value = 'unit';"
                     "document.getElementById('inspect-signal').value = 'c';"
                     "document.getElementById('inspect-unit').value = '4'; delete document.getElementById("
                     "'inspect-view').dataset.done; s.dispatchEvent(new Event('change'))")
    browser.wait_for("document.querySelector('#inspect-view[data-done]')")
    chosen = _post_json(base + "inspect", {"text": text, "top": 3, "signal": "c", "unit": 4})["unit"]
    values = browser.evaluate("[...document.querySelectorAll('#inspect-view span')].map(s => Number(s.dataset.value))")
    assert values == pytest.approx(chosen["values"], abs=1e-9)
