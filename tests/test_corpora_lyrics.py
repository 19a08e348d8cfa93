"""The `jaychou-lyrics` named corpus: a zip from a URL, trusted on first use, its text member cached.

Served by a local http.server on 127.0.0.1 through RNNKIT_MIRROR; no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
import urllib.parse
import zipfile

import pytest

from httpserver import LocalServer  # tests/httpserver.py
from rnnkit.data import corpora
from rnnkit.errors import RnnkitError

NAME = "jaychou-lyrics"
LYRICS = "想要有直升机\r\n想要和你飞到宇宙去\r\n想要和你融化在一起\r\n融化在宇宙里\r\n"


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


_Server = LocalServer




def url_path() -> str:
    return urllib.parse.urlsplit(corpora.CORPORA[NAME].url).path


def test_registry_entry_points_at_the_d2l_zip() -> None:
    corpus = corpora.CORPORA[NAME]
    assert corpus.url.endswith("/data/jaychou_lyrics.txt.zip") and "d2l-ai/d2l-zh" in corpus.url
    assert corpus.zip_member == "jaychou_lyrics.txt"
    assert NAME in [c.name for c in corpora.list_corpora()]


def test_fetch_extracts_the_text_and_records_the_zip_hash(server: _Server, cache: pathlib.Path) -> None:
    archive = zipped({"jaychou_lyrics.txt": LYRICS.encode("utf-8")})
    server.files[url_path()] = archive
    messages: list[str] = []

    path = corpora.fetch(NAME, log=messages.append)

    assert path == cache / "corpora" / "jaychou-lyrics.txt"
    assert path.read_bytes() == LYRICS.encode("utf-8")  # the text, not the zip
    assert corpora.read_text(path).startswith("想要有直升机\n想要和你飞到宇宙去\n")  # \r\n normalised on reading
    recorded = cache / "corpora" / "jaychou-lyrics.sha256"
    assert recorded.read_text(encoding="ascii").strip() == hashlib.sha256(archive).hexdigest()
    assert any("trust on first use" in m for m in messages)
    assert sorted(p.name for p in path.parent.iterdir()) == ["jaychou-lyrics.sha256", "jaychou-lyrics.txt"]
    assert server.requests == [url_path()]

    # Cached: no second request. A forced download that differs is refused, the first text kept.
    assert corpora.fetch(NAME) == path and server.requests == [url_path()]
    server.files[url_path()] = zipped({"jaychou_lyrics.txt": "别的歌词\n".encode()})
    with pytest.raises(RnnkitError, match="sha256"):
        corpora.fetch(NAME, force=True)
    assert path.read_bytes() == LYRICS.encode("utf-8")


def test_a_pinned_sha256_is_checked(server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = zipped({"jaychou_lyrics.txt": LYRICS.encode("utf-8")})
    server.files[url_path()] = archive
    monkeypatch.setitem(corpora.CORPORA, NAME, dataclasses.replace(corpora.CORPORA[NAME], sha256="0" * 64))
    with pytest.raises(RnnkitError, match="sha256"):
        corpora.fetch(NAME)
    assert list((cache / "corpora").iterdir()) == []


@pytest.mark.parametrize(
    "body,message",
    [
        (b"<html>not found</html>", "not a zip archive"),
        (zipped({"other.txt": b"x"}), "no member jaychou_lyrics.txt"),
        (zipped({"jaychou_lyrics.txt": "歌".encode("gbk")}), "not UTF-8"),
    ],
)
def test_bad_downloads_leave_nothing(server: _Server, cache: pathlib.Path, body: bytes, message: str) -> None:
    server.files[url_path()] = body
    with pytest.raises(RnnkitError, match=message) as caught:
        corpora.fetch(NAME)
    assert "\n" not in str(caught.value)
    assert list((cache / "corpora").iterdir()) == []  # no text, no hash record, no temp file


def test_oversized_download_is_cut_off(server: _Server, cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.files[url_path()] = zipped({"jaychou_lyrics.txt": LYRICS.encode("utf-8")})
    monkeypatch.setitem(corpora.CORPORA, NAME, dataclasses.replace(corpora.CORPORA[NAME], max_size=50))
    with pytest.raises(RnnkitError, match="more than the expected 50 bytes"):
        corpora.fetch(NAME)
    assert list((cache / "corpora").iterdir()) == []


def test_record_needs_some_check() -> None:
    with pytest.raises(ValueError, match="max_size"):
        corpora.NamedCorpus(name="x", description="d", licence="l", size_hint="1 kB", url="http://h/x.zip")
    with pytest.raises(ValueError, match="zip_member goes with url"):
        corpora.NamedCorpus(name="x", description="d", licence="l", size_hint="1 kB", builtin="x.txt",
                            sha256="0" * 64, zip_member="x.txt")
