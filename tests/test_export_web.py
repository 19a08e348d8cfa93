"""`rnnkit export --format web`: the onnxruntime-web fetch (against a local server) and the page in headless Chromium."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import os
import shutil
import tarfile
import threading
import urllib.parse
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from rnnkit import web_runtime  # noqa: E402
from rnnkit.cli import main  # noqa: E402
from rnnkit.errors import RnnkitError  # noqa: E402

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me.\n" * 30
# For the word level: quotes, joiners and a contraction, each with its own rule in decoding.
WORDS = 'ROMEO: "But soft," said he - what light through yonder well-lit window breaks?\nJULIET: Ay me, can\'t.\n' * 30
# Enough training (150 steps at lr 0.01) for greedy text that is not one character repeated: a degenerate
# model would print the same text from a wrong driver too.
FAST = ["--hidden", "32", "--layers", "2", "--seq-len", "16", "--batch-size", "16", "--eval-every", "150",
        "--log-every", "50", "--threads", "1", "--sample-length", "10", "--lr", "0.01"]


def _package(files: dict[str, bytes]) -> bytes:
    """An npm-style tarball holding ``files`` under package/dist/."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/dist/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


FAKE = {name: f"contents of {name}".encode() for name in web_runtime.ORT_WEB_FILES}


def test_fetch_verifies_caches_and_then_stays_offline(cache, server):
    tgz = _package(FAKE)
    path = urllib.parse.urlsplit(web_runtime.tarball_url("9.9.9")).path
    server.files[path] = tgz
    folder = web_runtime.runtime_files(version="9.9.9", integrity=_integrity(tgz))
    assert folder == cache / "npm" / "onnxruntime-web-9.9.9"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FAKE
    assert web_runtime.runtime_files(version="9.9.9", integrity=_integrity(tgz)) == folder
    assert server.requests == [path]  # the second call found the cache


def test_fetch_refuses_a_wrong_hash_and_caches_nothing(cache, server):
    tgz = _package(FAKE)
    server.files[urllib.parse.urlsplit(web_runtime.tarball_url("9.9.9")).path] = tgz
    with pytest.raises(RnnkitError, match="expected"):
        web_runtime.runtime_files(version="9.9.9", integrity=_integrity(b"something else"))
    assert not (cache / "npm" / "onnxruntime-web-9.9.9").exists()
    assert [p.name for p in (cache / "npm").iterdir()] == []  # no temporary file left behind


def test_fetch_refuses_a_package_without_the_files(cache, server):
    tgz = _package({"ort.wasm.min.js": b"x"})
    server.files[urllib.parse.urlsplit(web_runtime.tarball_url("9.9.9")).path] = tgz
    with pytest.raises(RnnkitError, match="ort-wasm-simd-threaded.mjs"):
        web_runtime.runtime_files(version="9.9.9", integrity=_integrity(tgz))
    assert [p.name for p in (cache / "npm").iterdir()] == []


def test_fetch_says_when_the_registry_is_unreachable(cache, server):
    with pytest.raises(RnnkitError, match="HTTP 404"):
        web_runtime.runtime_files(version="9.9.9", integrity=_integrity(b""))


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("RNNKIT_TEST_NETWORK") != "1", reason="set RNNKIT_TEST_NETWORK=1")
def test_the_pinned_package_downloads_from_the_npm_registry_and_verifies(cache, monkeypatch):
    monkeypatch.delenv("RNNKIT_MIRROR", raising=False)
    folder = web_runtime.runtime_files()
    assert sorted(p.name for p in folder.iterdir()) == sorted(web_runtime.ORT_WEB_FILES)
    assert (folder / "ort-wasm-simd-threaded.wasm").read_bytes()[:4] == b"\0asm"


def test_web_export_of_a_bpe_model_is_refused_before_anything_is_written(tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["train", "--text", str(text), "--out", str(tmp_path / "run"), "--max-steps", "2", "--quiet",
                 "--level", "bpe", "--vocab-size", "300", *FAST]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "web", "--out",
                 str(tmp_path / "web")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bpe" in err and "--format onnx" in err
    assert not (tmp_path / "web").exists()


# ---------------------------------------------------------------- the real page in a real browser


@pytest.fixture(scope="module")
def real_runtime(tmp_path_factory):
    """A cache folder holding the pinned onnxruntime-web files, or a skip.

    The files are copied from the user's cache when it has them (read, never written: tests keep off
    ~/.cache), else fetched from the npm registry into this test cache.
    """
    cache = tmp_path_factory.mktemp("ort-cache")
    users = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rnnkit" / "npm"
    cached = users / f"onnxruntime-web-{web_runtime.ORT_WEB_VERSION}"
    if all((cached / name).is_file() for name in web_runtime.ORT_WEB_FILES):
        shutil.copytree(cached, cache / "npm" / cached.name)
        return cache
    mp = pytest.MonkeyPatch()
    mp.setenv("RNNKIT_CACHE", str(cache))
    mp.delenv("RNNKIT_MIRROR", raising=False)
    try:
        web_runtime.runtime_files()
    except RnnkitError as exc:
        pytest.skip(f"onnxruntime-web {web_runtime.ORT_WEB_VERSION} is not cached and the npm registry "
                    f"cannot be reached: {exc}")
    finally:
        mp.undo()
    return cache


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "word", "char-window", "char-int8"])
def test_the_exported_page_generates_what_rnnkit_generate_prints(kind, tmp_path, monkeypatch, capsys, real_runtime,
                                                                 browser):
    monkeypatch.setenv("RNNKIT_CACHE", str(real_runtime))  # offline from here: the files are cached
    text = tmp_path / "play.txt"
    text.write_text(WORDS if kind == "word" else TEXT, encoding="utf-8")
    level = {"word": ["--level", "word", "--eos"], "char-window": ["--window", "8"]}.get(kind, [])
    assert main(["train", "--text", str(text), "--out", str(tmp_path / "run"), "--max-steps", "150", "--quiet",
                 *FAST, *level]) == 0
    prime = 'ROMEO: "But soft' if kind == "word" else "JULIET"
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prime", prime, "--length", "100",
                 "--temperature", "0"]) == 0
    expected = capsys.readouterr().out
    quantize = ["--quantize", "int8"] if kind == "char-int8" else []
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "web", "--out",
                 str(tmp_path / "web"), "--quiet", *quantize]) == 0
    assert {"index.html", "model.onnx", "tokenizer.json", "README.md", *web_runtime.ORT_WEB_FILES} <= {
        p.name for p in (tmp_path / "web").iterdir()}
    assert "python -m http.server -d" in (tmp_path / "web" / "README.md").read_text(encoding="utf-8")
    httpd = _serve(tmp_path / "web")
    query = urllib.parse.urlencode({"prime": prime, "length": 100, "temperature": 0, "run": 1})
    try:
        browser.open(f"http://127.0.0.1:{httpd.server_address[1]}/?{query}")
        browser.wait_for("document.querySelector('#output[data-done]')", timeout=120)
        shown = browser.evaluate("document.getElementById('output').textContent")
        status = browser.evaluate("document.getElementById('status').textContent")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert status.startswith("100 tokens in"), status
    if kind != "word":
        assert len(shown) == len(prime) + 100 and shown.startswith(prime)
    if kind != "char-int8":  # int8 weights compute a nearby function, not the same one
        assert shown + "\n" == expected
