"""A stand-in for the Hugging Face Hub: a local HTTP server on 127.0.0.1 that answers the few
endpoints huggingface_hub calls to download files, reached through ``HF_ENDPOINT`` (the
``hub`` fixture). Shared by the tests of ``hub.py``, ``store.py`` and the deploy path;
nothing here reaches a real hub.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import pytest

from distributed.domain import ModelSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tars-test/Tiny-GGUF"
FILE = "tiny.Q4_K_M.gguf"


class FakeHub:
    """The few hub endpoints huggingface_hub calls to download files.

    - ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ETag (sha256 for LFS-style files),
      X-Repo-Commit, Content-Length, Accept-Ranges; GET honours ``Range: bytes=N-``.
    - ``GET /api/models/{repo}/revision/{rev}`` and ``/api/models/{repo}/tree/{rev}``: repo
      info and file listing (snapshot_download).
    Unknown repos/files answer 404 with the X-Error-Code header the hub sends; a repo in
    ``errors`` answers every request with its (status, X-Error-Code), as the hub does for a
    gated repo (``GatedRepo``), a missing revision (``RevisionNotFound``) or a refusal.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.etag_override: dict[tuple[str, str], str] = {}
        self.truncate_first_get: set[tuple[str, str]] = set()
        self.lfs: dict[tuple[str, str], str] = {}  # (repo, file) → sha256 listed in the tree
        self.refuse: set[tuple[str, str]] = set()  # files whose GET answers 503 (until removed)
        self.errors: dict[str, tuple[int, str | None]] = {}  # repo → (status, X-Error-Code) for every request
        self.log: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # free ephemeral port
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- handlers
    def _json(self, h: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _missing(self, h: BaseHTTPRequestHandler, code: str | None, head: bool, status: int = 404) -> None:
        body = b'{"error": "not found"}'
        h.send_response(status)
        if code is not None:
            h.send_header("X-Error-Code", code)
            h.send_header("X-Error-Message", f"{code} (fake hub)")
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "0" if head else str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _tree_entry(self, repo: str, f: str, b: bytes) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
        if (repo, f) in self.lfs:  # what the hub lists for an LFS file: its sha256
            entry["lfs"] = {"oid": self.lfs[(repo, f)], "size": len(b), "pointerSize": 134}
        return entry

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.log.append({"method": h.command, "path": path, "range": h.headers.get("Range")})
        for repo, (status, code) in self.errors.items():
            if f"/{repo}/" in path:
                return self._missing(h, code, head, status)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for repo, files in self.repos.items():
                if rest.startswith(repo + "/revision/"):
                    return self._json(h, {"id": repo, "sha": COMMIT,
                                          "siblings": [{"rfilename": f} for f in files]})
                if rest.startswith(repo + "/tree/"):
                    return self._json(h, [self._tree_entry(repo, f, b) for f, b in files.items()])
            return self._missing(h, "RepoNotFound", head)
        repo, sep, tail = path.lstrip("/").partition("/resolve/")
        if not sep or repo not in self.repos:
            return self._missing(h, "RepoNotFound", head)
        filename = tail.split("/", 1)[1]
        data = self.repos[repo].get(filename)
        if data is None:
            return self._missing(h, "EntryNotFound", head)
        etag = self.etag_override.get((repo, filename), hashlib.sha256(data).hexdigest())
        if (repo, filename) in self.refuse and not head:
            return self._json(h, {"error": "unavailable (fake hub)"}, status=503)
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            start = int(rng.split("=")[1].split("-")[0])
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(body)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        key = (repo, filename)
        if key in self.truncate_first_get:  # drop the connection half way through, once
            self.truncate_first_get.discard(key)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def gets(self, filename: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["method"] == "GET" and r["path"].endswith("/" + filename)]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    with FakeHub() as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for the suite
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield fake


def payload(n: int = 3 * 1024 * 1024 + 123) -> bytes:
    """Deterministic bytes standing in for a GGUF file (size not a multiple of any chunk)."""
    block = hashlib.sha256(b"tars").digest() * 1024
    return (block * (n // len(block) + 1))[:n]


def gguf_spec(**kw: Any) -> ModelSpec:
    """A single-file (GGUF) model of ``REPO``; ``kw`` overrides its fields."""
    base = dict(id="tiny-gguf", kind="chat", backend="llama_cpp", params_b=0.001, quant="Q4_K_M", context=128,
                repo=REPO, file=FILE, size_mb=3)
    base.update(kw)
    return ModelSpec(**base)


def snapshot_spec() -> ModelSpec:
    """A transformers model pulled as a whole repo (``tars-test/tiny-8bit``)."""
    return ModelSpec(id="tiny-8bit", kind="chat", backend="hf8bit", params_b=0.001, quant="int8", context=256,
                     repo="tars-test/tiny-8bit")


def dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point HF_ENDPOINT at a 127.0.0.1 port with nothing listening (connection refused);
    returns that URL."""
    import huggingface_hub.constants as hf_constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return url
