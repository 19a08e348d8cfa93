"""The server's door and limits: API keys, per-client and per-request limits, session memory, CORS, several models,
and a graceful stop on SIGTERM (a real `rnnkit serve` in a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the server tests need the serve extra: pip install 'rnnkit[serve]'")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import rnnkit.server as server  # noqa: E402
from rnnkit.checkpoint import load_checkpoint  # noqa: E402
from rnnkit.cli import main  # noqa: E402
from rnnkit.config import ServeLimits  # noqa: E402
from rnnkit.errors import RnnkitError  # noqa: E402
from rnnkit.server import Door, api_keys, create_app, parse_checkpoints  # noqa: E402
from test_server import LIMITS, _classifier, _lm, events, post  # noqa: E402

KEYS = ["first-key-0123456789abcdef", "second-key-0123456789abcdef"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("door")
    return {"lm": _lm(root / "lm"), "window": _lm(root / "window", window=4), "cls": _classifier(root / "cls")}


@pytest.fixture(scope="module")
def lm(paths):
    return load_checkpoint(paths["lm"])


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- API keys


def test_every_endpoint_but_health_needs_a_key(lm):
    client = TestClient(create_app(lm, limits=LIMITS, api_keys=KEYS))
    assert client.get("/health").status_code == 200
    for public in ("/", "/openapi.json", "/docs"):  # no model output: the page must load to ask for the key
        assert client.get(public).status_code == 200, public
    calls = [("GET", "/models", None), ("GET", "/model", None), ("POST", "/generate", {"length": 3}),
             ("POST", "/generate/stream", {"length": 3}), ("POST", "/sessions", {}),
             ("GET", "/sessions/AAAAAAAAAAAAAAAA", None), ("DELETE", "/sessions/AAAAAAAAAAAAAAAA", None),
             ("GET", "/no-such-path", None)]
    for method, url, body in calls:
        response = client.request(method, url, json=body)
        assert response.status_code == 401, (method, url)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="rnnkit"'
        assert "Authorization: Bearer KEY" in response.json()["error"]
        response = client.request(method, url, json=body, headers=bearer("not-a-key-of-this-server"))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="rnnkit", error="invalid_token"'
        assert "not-a-key" not in response.text  # a wrong key is never echoed
    for key in KEYS:  # every key of the list is accepted
        response = client.post("/generate", json={"length": 3}, headers=bearer(key))
        assert response.status_code == 200, response.text
    assert client.get("/models", headers={"Authorization": f"bearer {KEYS[1]}"}).status_code == 200
    assert client.get("/models", headers={"Authorization": f"Basic {KEYS[1]}"}).status_code == 401
    assert client.get("/models", headers={"Authorization": f"Bearer {KEYS[1][:-1]}"}).status_code == 401


def test_keys_come_from_the_flag_the_environment_and_a_file(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\n{KEYS[0]}\n\n  {KEYS[1]}  \n{KEYS[0]}\n", encoding="utf-8")
    assert api_keys(key_file=keyfile, env={}) == KEYS  # comments, blanks and repeats dropped
    assert api_keys(key="flag-key-0123456789", env={"RNNKIT_API_KEY": KEYS[0]}) == ["flag-key-0123456789", KEYS[0]]
    assert api_keys(env={}) == []
    (tmp_path / "empty").write_text("# nothing yet\n", encoding="utf-8")
    for kwargs, message in [
        ({"key_file": tmp_path / "missing"}, "--api-key-file"),
        ({"key_file": tmp_path / "empty"}, "holds no key"),
        ({"key": "short"}, "shorter than 16 characters"),
        ({"key": "has a space in it, too long"}, "printable ASCII"),
    ]:
        with pytest.raises(RnnkitError, match=message):
            api_keys(env={}, **kwargs)


def test_a_bad_key_is_a_one_line_error_that_does_not_show_it(paths, capsys, tmp_path):
    assert main(["serve", "--checkpoint", str(paths["lm"]), "--api-key", "sekrit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shorter than 16" in err and "sekrit" not in err
    assert main(["serve", "--checkpoint", str(paths["lm"]), "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "--api-key-file" in capsys.readouterr().err


@pytest.fixture
def no_serving(monkeypatch):
    """serve() up to the point of running: record the address asked for, bind loopback, do not run uvicorn."""
    asked = []
    real_listen = server.listen

    def listen(host, port):
        asked.append(host)
        return real_listen("127.0.0.1", 0)

    monkeypatch.setattr(server, "listen", listen)
    monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: None)
    monkeypatch.delenv("RNNKIT_API_KEY", raising=False)
    return asked


def test_without_a_key_the_server_stays_on_loopback_unless_told(paths, capsys, no_serving, monkeypatch):
    assert main(["serve", "--checkpoint", str(paths["lm"]), "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert no_serving == ["127.0.0.1"] and "no API key, so listening on loopback only" in err
    assert main(["serve", "--checkpoint", str(paths["lm"]), "--port", "0", "--host", "0.0.0.0"]) == 0
    assert no_serving[-1] == "0.0.0.0" and "warning: no API key and listening on 0.0.0.0" in capsys.readouterr().err
    monkeypatch.setenv("RNNKIT_API_KEY", KEYS[0])
    assert main(["serve", "--checkpoint", str(paths["lm"]), "--port", "0"]) == 0
    err = capsys.readouterr().err
    assert "1 API key(s)" in err and KEYS[0] not in err and no_serving[-1] == "127.0.0.1"


# ---------------------------------------------------------------- limits


def test_a_client_may_have_only_so_many_requests_in_progress():
    """Door in front of an app that holds each request until released: the third of one client is a 429."""
    release = asyncio.Event()

    async def app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    door = Door(app, keys=KEYS, max_requests=2)

    async def scenario():
        transport = httpx.ASGITransport(app=door)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            held = [asyncio.create_task(http.get("/x", headers=bearer(KEYS[0]))) for _ in range(2)]
            while sum(door.busy.values()) < 2:
                await asyncio.sleep(0.01)
            refused = await http.get("/x", headers=bearer(KEYS[0]))
            other = asyncio.create_task(http.get("/x", headers=bearer(KEYS[1])))  # another client: its own share
            while door.busy.get("key 1", 0) < 1:
                await asyncio.sleep(0.01)
            release.set()
            done = [r.status_code for r in await asyncio.gather(*held, other)]
            again = await http.get("/x", headers=bearer(KEYS[0]))
        return refused, done, again.status_code

    refused, done, again = asyncio.run(scenario())
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "--max-client-requests" in refused.json()["error"]
    assert done == [200, 200, 200] and again == 200 and door.busy == {}


class Ticking:
    """A clock that moves one second each time it is read: deadlines pass after a known amount of work."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_requests_that_run_past_their_time_get_504_and_change_nothing(lm):
    limits = ServeLimits(max_length=60, max_request_seconds=10.5, session_idle=1e9)
    client = TestClient(create_app(lm, limits=limits, clock=Ticking()))
    response = client.post("/generate", json={"prime": "ROMEO", "length": 60})
    assert response.status_code == 504 and "--max-request-seconds" in response.json()["error"]
    # A stream has sent its status already: it ends with an error event instead of `done`.
    stream = events(client.post("/generate/stream", json={"prime": "ROMEO", "length": 60}).text)
    assert stream[0][0] == "start" and stream[-1][0] == "error" and "done" not in [name for name, _ in stream]
    assert 0 < len(stream) - 2 < 60
    sid = post(client, "/sessions", {"text": "ROMEO"}, status=201)["id"]
    assert client.post(f"/sessions/{sid}/generate", json={"length": 60}).status_code == 504
    assert client.get(f"/sessions/{sid}").json()["tokens"] == 5  # all or nothing: the session is as it was
    assert client.post(f"/sessions/{sid}/generate", json={"length": 2}).json()["tokens"] == 7


def test_a_request_no_worker_takes_up_in_time_gets_503(lm):
    client = TestClient(create_app(lm, limits=ServeLimits(max_request_seconds=0.5), clock=Ticking()))
    response = client.post("/generate", json={"length": 5})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert "no worker came free" in response.json()["error"]


def test_sessions_are_bounded_in_memory_too(lm):
    probe = TestClient(create_app(lm, limits=LIMITS))
    sid = post(probe, "/sessions", {"text": "ROMEO"}, status=201)["id"]
    one = probe.app.state.sessions.items[sid].bytes
    assert one > 0
    limits = ServeLimits(max_session_mib=2.5 * one / 2**20)  # room for two
    app = create_app(lm, limits=limits)
    client = TestClient(app)
    ids = [post(client, "/sessions", {"text": "ROMEO"}, status=201)["id"] for _ in range(3)]
    assert [client.get(f"/sessions/{sid}").status_code for sid in ids] == [404, 200, 200]
    assert app.state.sessions.bytes <= limits.max_session_mib * 2**20


def test_cors_is_off_unless_an_origin_is_allowed(lm):
    origin = {"Origin": "http://app.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    closed = TestClient(create_app(lm, limits=LIMITS))
    assert "access-control-allow-origin" not in closed.get("/models", headers=origin).headers
    assert "access-control-allow-origin" not in closed.options("/generate", headers=preflight).headers
    opened = TestClient(create_app(lm, limits=LIMITS, api_keys=KEYS, cors_origins=["http://app.example"]))
    answer = opened.options("/generate", headers=preflight)  # a preflight carries no key
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert opened.get("/models", headers={**origin, **bearer(KEYS[0])}).headers["access-control-allow-origin"] == \
        "http://app.example"
    refused = opened.get("/models", headers=origin)  # the page can read why: the 401 is readable cross-origin
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == "http://app.example"
    elsewhere = opened.get("/models", headers={"Origin": "http://evil.example", **bearer(KEYS[0])})
    assert "access-control-allow-origin" not in elsewhere.headers


# ---------------------------------------------------------------- several models


def test_several_models_by_name(paths, lm):
    window, cls = load_checkpoint(paths["window"]), load_checkpoint(paths["cls"])
    client = TestClient(create_app({"first": lm, "win": window, "sent": cls}, limits=LIMITS))
    listed = client.get("/models").json()["models"]
    assert [(m["name"], m["task"]) for m in listed] == [("first", "language_model"), ("win", "language_model"),
                                                        ("sent", "classify")]
    body = {"prime": "ROMEO", "length": 8, "temperature": 0}
    first = post(client, "/generate", body)
    assert first["model"] == "first"  # default: the first language model
    assert first["texts"] == post(TestClient(create_app(lm, limits=LIMITS)), "/generate", body)["texts"]
    win = post(client, "/generate", {**body, "model": "win"})
    assert win["model"] == "win"
    assert win["texts"] == post(TestClient(create_app(window, limits=LIMITS)), "/generate", body)["texts"]
    response = client.post("/generate", json={**body, "model": "sent"})  # not a language model
    assert response.status_code == 422 and response.json()["error"].startswith("model: ")
    assert post(client, "/classify", {"texts": ["a good film"]})["model"] == "sent"
    assert client.get("/model").json()["name"] == "first"
    assert client.get("/model", params={"model": "win"}).json()["window"] == 4
    assert client.get("/model", params={"model": "nope"}).status_code == 422
    sid = post(client, "/sessions", {"model": "win", "text": "ROMEO"}, status=201)["id"]
    assert client.get(f"/sessions/{sid}").json()["model"] == "win"
    assert post(client, f"/sessions/{sid}/generate", {"length": 3})["model"] == "win"


def test_checkpoints_are_named_or_named_after_their_run(tmp_path):
    run = tmp_path / "my run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    assert parse_checkpoints([str(run), f"b={run}"]) == [("my-run", str(run)), ("b", str(run))]
    assert parse_checkpoints([str(run / "checkpoints" / "step-1")])[0][0] == "my-run"
    odd = tmp_path / "x=y"
    odd.mkdir()
    assert parse_checkpoints([str(odd)]) == [("x-y", str(odd))]  # an existing path is a path, "=" and all
    with pytest.raises(RnnkitError, match="two checkpoints are named 'a'"):
        parse_checkpoints([f"a={run}", f"a={odd}"])
    with pytest.raises(RnnkitError, match="give a run directory"):
        parse_checkpoints(["a="])


def test_serve_names_a_missing_checkpoint_in_one_line(capsys, tmp_path):
    assert main(["serve", "--checkpoint", f"lm={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err


# ---------------------------------------------------------------- HTTP details the schema checks rely on


def test_wrong_methods_unknown_paths_and_unreadable_bodies_get_json_errors(lm):
    client = TestClient(create_app(lm, limits=LIMITS))
    response = client.put("/sessions/AAAAAAAAAAAAAAAA")
    assert response.status_code == 405 and response.headers["Allow"] == "DELETE, GET"  # every route's methods
    assert response.json()["error"].startswith("PUT is not served")
    assert client.get("/nowhere").json()["error"].startswith("no endpoint /nowhere")
    response = client.post("/generate", content=b'{"prime": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]


# ---------------------------------------------------------------- the real server: stopping, and never a key in its log


def _start(paths, *argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "rnnkit", "serve", "--checkpoint", str(paths["lm"]), "--port", "0",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    line = proc.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not match:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, int(match.group(1))


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


@pytest.mark.slow
def test_sigterm_stops_accepting_lets_the_running_request_finish_and_exits_0(paths):
    proc, port = _start(paths, "--log-level", "warning", "--shutdown-timeout", "60")
    try:
        body = json.dumps({"prime": "ROMEO", "length": 20, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        # `Expect: 100-continue`: the server says "100 Continue" once the application reads the body, so the
        # request is known to be running (its body still to come) when the signal arrives.
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        seen = b""
        while b"100 Continue\r\n\r\n" not in seen:
            seen += sock.recv(1024)
        proc.send_signal(signal.SIGTERM)
        for _ in range(600):  # until the listening socket is closed (bounded: 60 s)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the server still accepted connections after SIGTERM")
        assert proc.poll() is None  # still finishing the request
        sock.sendall(body)
        status, answer = _read_response(sock)
        sock.close()
        assert status == 200 and len(json.loads(answer)["texts"][0]) == 20
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        proc.stdout.close()


@pytest.mark.slow
def test_keys_never_reach_the_log(paths, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# two more\n{KEYS[0]}\n{KEYS[1]}\n", encoding="utf-8")
    env_key, wrong = "env-key-0123456789abcdef", "wrong-key-0123456789abcdef"
    proc, port = _start(paths, "--api-key-file", str(keyfile), "--log-level", "debug",
                        env={"RNNKIT_API_KEY": env_key})
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=60) as http:
            assert [http.get("/models", headers=bearer(k)).status_code for k in (env_key, *KEYS)] == [200] * 3
            assert http.post("/generate", json={"length": 3}, headers=bearer(KEYS[1])).status_code == 200
            assert http.get("/models", headers=bearer(wrong)).status_code == 401
            assert http.get("/models").status_code == 401
            assert http.get("/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read() + proc.stdout.read()  # uvicorn: its messages on stderr, the access log on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        proc.stdout.close()
    assert "3 API key(s)" in log and "GET /models" in log  # the requests are logged, debug detail and all
    for secret in (env_key, *KEYS, wrong):
        assert secret not in log
    assert "Traceback" not in log



@pytest.mark.slow
def test_a_client_leaving_a_stream_is_noticed_at_once(paths):
    """Between events the server looks at its sockets: a client that left is not written to token after token."""
    proc, port = _start(paths, "--log-level", "warning", "--max-length", "5000")
    try:
        body = json.dumps({"length": 5000}).encode()
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(b"POST /generate/stream HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            sock.recv(100)  # the answer has started
            sock.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            assert http.post("/generate", json={"length": 5}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        proc.stdout.close()
    assert "socket.send() raised exception" not in log and "Traceback" not in log
