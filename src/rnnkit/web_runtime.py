"""onnxruntime-web for the exported web page: fetched from the npm registry, verified, cached.

``rnnkit export --format web`` copies three files of the pinned
``onnxruntime-web`` npm package into the page's folder: the WASM-only loader
``ort.wasm.min.js``, and the WebAssembly runtime it loads,
``ort-wasm-simd-threaded.mjs`` + ``.wasm`` (the threaded build also runs on
one thread, which is all a plain static server allows: without
cross-origin isolation a page has no SharedArrayBuffer).

The package tarball is downloaded once from the registry (or
``$RNNKIT_MIRROR``, as for corpora), checked against the sha512 integrity the
registry publishes for that version, and the three files are kept in
``<cache>/npm/onnxruntime-web-<version>/`` (a folder renamed into place when
complete); the tarball itself is not kept.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from rnnkit.data.corpora import cache_dir, resolve_url
from rnnkit.errors import RnnkitError
from rnnkit.files import atomic_folder

ORT_WEB_VERSION = "1.31.1"
# `dist.integrity` of onnxruntime-web@1.31.1 in https://registry.npmjs.org/onnxruntime-web/1.31.1
ORT_WEB_INTEGRITY = "sha512-5GeH+bWQ+HxM10z7erGlsWqryrwMbSvm/1tkIsKTT48g0fI19VXVVC435t4t7VsPdSQeS7NmuZPXrQ73k82URw=="
ORT_WEB_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
_MAX_BYTES = 100_000_000  # the 1.31.1 tarball is 34.6 MB; refuse a response far larger than that
_TIMEOUT = 60


def tarball_url(version: str = ORT_WEB_VERSION) -> str:
    return f"https://registry.npmjs.org/onnxruntime-web/-/onnxruntime-web-{version}.tgz"


def runtime_folder(version: str = ORT_WEB_VERSION) -> Path:
    return cache_dir() / "npm" / f"onnxruntime-web-{version}"


def runtime_files(*, log: Callable[[str], None] | None = None, version: str = ORT_WEB_VERSION,
                  integrity: str = ORT_WEB_INTEGRITY) -> Path:
    """The cached folder holding :data:`ORT_WEB_FILES`, downloading and verifying the package first if needed."""
    folder = runtime_folder(version)
    if all((folder / name).is_file() for name in ORT_WEB_FILES):
        return folder
    say = log or (lambda message: None)
    url = resolve_url(tarball_url(version))
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder.parent) as tgz:
            say(f"downloading onnxruntime-web {version} from {url} ...")
            _download(url, tgz, integrity=integrity)
            tgz.seek(0)
            with atomic_folder(folder, replace=True) as tmp:
                _unpack(tgz, tmp, origin=url)
    except OSError as exc:
        raise RnnkitError(f"cannot write onnxruntime-web to {folder}: {exc.strerror or exc}; "
                          "set RNNKIT_CACHE to a writable folder") from None
    say(f"cached onnxruntime-web {version} in {folder}")
    return folder


def _download(url: str, sink, *, integrity: str) -> None:
    """Stream ``url`` into ``sink``, checking the npm integrity string (``sha512-<base64>``)."""
    algorithm, _, expected = integrity.partition("-")
    digest = hashlib.new(algorithm)
    received = 0
    again = "the registry may be unreachable from here; retry later, or export with --format onnx"
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=_TIMEOUT) as response:
            while chunk := response.read(1 << 20):
                received += len(chunk)
                if received > _MAX_BYTES:
                    raise RnnkitError(f"{url} sent more than {_MAX_BYTES:,} bytes; nothing was cached")
                digest.update(chunk)
                sink.write(chunk)
    except urllib.error.HTTPError as exc:
        raise RnnkitError(f"could not download onnxruntime-web from {url}: HTTP {exc.code} {exc.reason}; "
                          f"{again}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise RnnkitError(f"could not download onnxruntime-web from {url} ({reason}); {again}") from None
    actual = base64.b64encode(digest.digest()).decode("ascii")
    if actual != expected:
        raise RnnkitError(f"onnxruntime-web from {url} has {algorithm} {actual}, expected {expected}; "
                          "the download is corrupt or not the pinned package, nothing was cached")


def _unpack(tgz, target: Path, *, origin: str) -> None:
    """Copy :data:`ORT_WEB_FILES` out of the package's ``package/dist/`` into ``target``."""
    try:
        with tarfile.open(fileobj=tgz, mode="r:gz") as archive:
            names = set(archive.getnames())
            for name in ORT_WEB_FILES:
                member = archive.extractfile(f"package/dist/{name}") if f"package/dist/{name}" in names else None
                if member is None:
                    raise RnnkitError(f"the onnxruntime-web package from {origin} has no file dist/{name}; "
                                      "nothing was cached")
                (target / name).write_bytes(member.read())
    except (tarfile.TarError, EOFError) as exc:
        raise RnnkitError(f"the onnxruntime-web package from {origin} is not a readable tarball ({exc}); "
                          "nothing was cached") from None
