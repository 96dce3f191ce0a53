"""A stand-in for the Hugging Face Hub on loopback (``HF_ENDPOINT=hub.url``), in the hub's own
API shapes, so huggingface_hub and our code run their real paths against it.

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: repo info (``id``,
  ``sha``, ``siblings``, ``gated``, ``private``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]``: the file listing; LFS files
  (``*.gguf``, ``*.safetensors``, ``*.bin``, or any in ``lfs``) carry ``lfs: {oid: sha256,
  size, pointerSize}``.
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: a plain file is served here (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``, ``Accept-Ranges``); an LFS file answers ``302`` to a
  second listener standing in for the CDN (another origin, as on the real hub, so
  huggingface_hub stops at the redirect and reads ``X-Linked-Size`` / ``X-Linked-Etag`` /
  ``X-Repo-Commit`` from it). Both honour ``Range: bytes=A-B`` / ``bytes=A-`` (206).
- Errors as the hub sends them: a missing repo is 404 with ``X-Error-Code: RepoNotFound``; a
  gated repo (``gated``) lists its files but refuses them with 403 ``GatedRepo``; a missing
  file 404 ``EntryNotFound``; an unknown revision 404 ``RevisionNotFound``. Each with an
  ``X-Error-Message`` (the hub's reason).

Files are ``bytes`` or a ``Path`` (served from disk in slices, never read whole). ``served``
counts the body bytes sent per (repo, file), ``log`` every request. Knobs for failure tests:
``truncate_first_get`` (drop the connection half way through a download, once), ``cut_first_range``
(the same for a ranged read ``bytes=A-B``), ``refuse`` (503), ``etag_override``,
``ignore_range`` (a repo whose files come whole, 200, whatever ``Range`` asks), ``errors`` (a
repo whose every request answers one status and ``X-Error-Code``, as the hub does for a refusal).

Use the ``hub`` fixture (``from tests.hubstub import hub``), which points HF_ENDPOINT at it. Also
here: ``payload`` / ``gguf_spec`` / ``snapshot_spec`` (a made-up ``REPO`` and its specs) and
``dead_endpoint`` (a hub that refuses connections). Nothing here reaches a real hub.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

import pytest

from distributed.domain import ModelSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_of(data: bytes | Path) -> str:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    st = data.stat()
    key = (str(data), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with data.open("rb") as fh:
            for block in iter(lambda: fh.read(8 * 2**20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _size(data: bytes | Path) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


class HubStub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes | Path]] = {}
        self.commits: dict[str, str] = {}  # repo -> commit sha (default COMMIT)
        self.gated: set[str] = set()
        self.lfs: dict[tuple[str, str], str] = {}  # (repo, file) -> the sha256 the tree lists (overrides)
        self.etag_override: dict[tuple[str, str], str] = {}
        self.truncate_first_get: set[tuple[str, str]] = set()  # the first download of these is cut half way
        self.cut_first_range: set[tuple[str, str]] = set()  # the first ranged read (bytes=A-B) of these too
        self.refuse: set[tuple[str, str]] = set()  # files whose GET answers 503 (until removed)
        self.ignore_range: set[str] = set()  # repos whose files come whole, whatever Range asks (some proxies)
        self.errors: dict[str, tuple[int, str | None]] = {}  # repo -> (status, X-Error-Code) for every request
        self.log: list[dict[str, Any]] = []
        self.served: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                stub._serve(self, head=True)

            def do_GET(self) -> None:
                stub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # another origin, like the hub's CDN
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self.cdn.server_address[1]}"
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.server, self.cdn)]

    def __enter__(self) -> "HubStub":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s in (self.server, self.cdn):
            s.shutdown()
            s.server_close()

    # ---------------------------------------------------------------- set-up helpers
    def add(self, repo: str, files: dict[str, bytes | Path], *, gated: bool = False, commit: str | None = None) -> None:
        self.repos[repo] = dict(files)
        if gated:
            self.gated.add(repo)
        if commit:
            self.commits[repo] = commit

    def commit(self, repo: str) -> str:
        return self.commits.get(repo, COMMIT)

    def is_lfs(self, repo: str, name: str) -> bool:
        return (repo, name) in self.lfs or name.endswith(LFS_SUFFIXES)

    def gets(self, filename: str) -> list[dict[str, Any]]:
        return [r for r in self.log if r["method"] == "GET" and r["path"].endswith("/" + filename)]

    def bytes_served(self, repo: str, name: str | None = None) -> int:
        return sum(n for (r, f), n in self.served.items() if r == repo and (name is None or f == name))

    # ---------------------------------------------------------------- answers
    def _json(self, h: BaseHTTPRequestHandler, body: Any, status: int = 200) -> None:
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        if code is not None:
            h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "0" if head else str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _tree_entry(self, repo: str, name: str, data: bytes | Path) -> dict[str, Any]:
        size = _size(data)
        oid = hashlib.sha1(f"{repo}/{name}/{size}".encode()).hexdigest()
        entry: dict[str, Any] = {"type": "file", "path": name, "size": size, "oid": oid}
        if self.is_lfs(repo, name):
            entry["lfs"] = {"oid": self.lfs.get((repo, name)) or sha256_of(data), "size": size, "pointerSize": 134}
        return entry

    def _api(self, h: BaseHTTPRequestHandler, rest: str, query: dict[str, list[str]], head: bool) -> None:
        repo = next((r for r in self.repos if rest == r or rest.startswith(r + "/")), None)
        if repo is None:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        tail = rest[len(repo):].lstrip("/")
        files = self.repos[repo]
        if tail == "" or tail.startswith("revision/"):
            rev = tail.partition("/")[2] or "main"
            if rev not in ("main", self.commit(repo)):
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return self._json(h, {"id": repo, "modelId": repo, "sha": self.commit(repo), "private": False,
                                  "gated": "manual" if repo in self.gated else False, "disabled": False,
                                  "siblings": [{"rfilename": f} for f in sorted(files)]})
        if tail.startswith("tree/"):
            _, _, after = tail.partition("/")
            rev, _, folder = after.partition("/")
            if rev not in ("main", self.commit(repo)):
                return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = folder.rstrip("/") + "/" if folder else ""
            entries, dirs = [], set()
            for name in sorted(files):
                if not name.startswith(prefix):
                    continue
                inner = name[len(prefix):]
                if "/" in inner and not recursive:
                    dirs.add(prefix + inner.split("/")[0])
                    continue
                entries.append(self._tree_entry(repo, name, files[name]))
            folders = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()}
                       for d in sorted(dirs)]
            return self._json(h, folders + entries)
        return self._error(h, 404, "EntryNotFound", f"no such API path: {rest}", head)

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        parsed = urlparse(h.path)
        path = unquote(parsed.path)
        query = parse_qs(parsed.query)
        cdn = h.server is self.cdn
        with self._lock:
            self.log.append({"method": h.command, "path": path, "range": h.headers.get("Range"), "cdn": cdn})
        for repo, (status, code) in self.errors.items():
            if f"/{repo}/" in path:
                return self._error(h, status, code, f"{code or status} (hub stub)", head)
        if path.startswith("/api/models/") and not cdn:
            return self._api(h, path[len("/api/models/"):], query, head)
        repo, sep, tail = path.lstrip("/").partition("/resolve/")
        if not sep or repo not in self.repos:
            return self._error(h, 404, "RepoNotFound", "Repository not found", head)
        rev, _, name = tail.partition("/")
        if rev not in ("main", self.commit(repo)):
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if repo in self.gated:
            return self._error(h, 403, "GatedRepo", f"Access to model {repo} is restricted. You must have access to "
                                                     "it and be authenticated to access it. Please log in.", head)
        data = self.repos[repo].get(name)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist on \"{rev}\"", head)
        etag = self.etag_override.get((repo, name), sha256_of(data) if self.is_lfs(repo, name) else
                                      hashlib.sha1(f"{repo}/{name}".encode()).hexdigest())
        size = _size(data)
        if self.is_lfs(repo, name) and not cdn:  # the hub redirects an LFS file to its CDN
            h.send_response(302)
            h.send_header("Location", f"{self.cdn_url}/{quote(repo)}/resolve/{self.commit(repo)}/{quote(name)}")
            h.send_header("X-Repo-Commit", self.commit(repo))
            h.send_header("X-Linked-Etag", f'"{etag}"')
            h.send_header("X-Linked-Size", str(size))
            h.send_header("ETag", f'W/"{hashlib.sha1(name.encode()).hexdigest()}"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if (repo, name) in self.refuse and not head:
            return self._json(h, {"error": "unavailable (hub stub)"}, status=503)
        start, end = 0, size - 1
        rng = h.headers.get("Range") if repo not in self.ignore_range else None
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a)
            end = min(int(b), size - 1) if b else size - 1
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        partial = bool(rng)
        h.send_response(206 if partial else 200)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Repo-Commit", self.commit(repo))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start + 1))
        if partial:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if head:
            return
        length = end - start + 1
        whole = not rng or rng.endswith("-")  # a download (all, or the rest): not a ranged header read
        cut = self.truncate_first_get if whole else self.cut_first_range
        if (repo, name) in cut:  # drop the connection half way through, once
            cut.discard((repo, name))
            length //= 2
            h.close_connection = True
        self._send_body(h, repo, name, data, start, length)

    def _send_body(self, h: BaseHTTPRequestHandler, repo: str, name: str, data: bytes | Path, start: int,
                   length: int) -> None:
        sent = 0
        try:
            if isinstance(data, bytes):
                h.wfile.write(data[start:start + length])
                sent = length
            else:
                with data.open("rb") as fh:
                    fh.seek(start)
                    while sent < length:
                        block = fh.read(min(2**20, length - sent))
                        if not block:
                            break
                        h.wfile.write(block)
                        sent += len(block)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True  # the client stopped reading (a bounded read)
        finally:
            with self._lock:
                self.served[(repo, name)] += sent


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """A HubStub that huggingface_hub (and ours) talk to: HF_ENDPOINT, online, no token."""
    import huggingface_hub.constants as hf_constants

    with HubStub() as stub:
        monkeypatch.setenv("HF_ENDPOINT", stub.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for the suite
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield stub


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


# --------------------------------------------------------------------------- a made-up repo of made-up bytes
REPO = "tars-test/Tiny-GGUF"
FILE = "tiny.Q4_K_M.gguf"


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


# --------------------------------------------------------------------------- real GGUFs for the repos
def split_gguf(src: Path, folder: Path, prefix: str, shards: int = 2) -> list[Path]:
    """``src`` rewritten as a split GGUF (``{prefix}-0000i-of-0000N.gguf`` in ``folder``): the
    same metadata and tensors, written by the gguf package as llama.cpp's gguf-split does."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(src))
    folder.mkdir(parents=True, exist_ok=True)
    names = [folder / f"{prefix}-{i:05d}-of-{shards:05d}.gguf" for i in range(1, shards + 1)]
    if all(n.is_file() for n in names):
        return names
    arch = str(reader.fields["general.architecture"].contents())
    per = -(-len(reader.tensors) // shards)
    w = gguf.GGUFWriter(str(folder / f"{prefix}.gguf"), arch, split_max_tensors=per)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name.startswith("split."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in reader.tensors:
        w.write_tensor_data(t.data)
    w.close()
    return names


def projector_gguf(dest: Path) -> Path:
    """A small GGUF whose header is a vision projector's (``clip`` architecture, ``mmproj``
    type): what a repo's ``mmproj-*.gguf`` looks like to the planner (it runs nothing)."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dest), "clip")
    w.add_string("general.type", "mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.embedding_length", 64)
    w.add_tensor("v.patch_embd.weight", np.zeros((64, 48), dtype=np.float16))
    w.add_tensor("mm.0.weight", np.zeros((576, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# --------------------------------------------------------------------------- made-up repos of real GGUFs
CACHE = Path(__import__("os").environ.get("TARS_TEST_CACHE", Path(__file__).resolve().parent.parent / ".test-cache"))
SMOL_REPO = "tars-test/SmolLM2-135M-Instruct-GGUF"  # Q4_1, Q8_0, Q4_K_M names (the same real file)
NODEFAULT_REPO = "tars-test/SmolLM2-NoDefault-GGUF"  # no Q4_K_M: Q8_0, q4_0, IQ4_XS, Q2_K
SPLIT_REPO = "tars-test/SmolLM2-Split-GGUF"  # Q4_K_M in two shards, in a subfolder
VISION_REPO = "tars-test/SmolLM2-Vision-GGUF"  # Q4_K_M + mmproj-*.gguf
GATED_REPO = "tars-test/Gated-GGUF"


@pytest.fixture(scope="session")
def smollm2_shards(smollm2_gguf: Path) -> list[Path]:
    """The embedded SmolLM2 GGUF (conftest's ``smollm2_gguf``) as a split model in two shards."""
    return split_gguf(smollm2_gguf, CACHE / "hub-split", "SmolLM2-135M-Instruct-Q4_K_M", 2)


@pytest.fixture(scope="session")
def projector() -> Path:
    return projector_gguf(CACHE / "hub-mmproj" / "mmproj-SmolLM2-f16.gguf")


def add_repos(stub: HubStub, smol: Path, shards: list[Path] | None = None, mmproj: Path | None = None) -> None:
    """The made-up repos above, of real GGUF files."""
    readme = b"# a model card\n"
    stub.add(SMOL_REPO, {"README.md": readme, "SmolLM2-135M-Instruct-Q4_1.gguf": smol,
                         "SmolLM2-135M-Instruct-Q8_0.gguf": smol, "SmolLM2-135M-Instruct-Q4_K_M.gguf": smol})
    stub.add(NODEFAULT_REPO, {"smollm2-Q8_0.gguf": smol, "smollm2-q4_0.gguf": smol, "smollm2-IQ4_XS.gguf": smol,
                              "smollm2-Q2_K.gguf": smol, "config.json": b"{}"})
    stub.add(GATED_REPO, {"gated-Q4_K_M.gguf": smol}, gated=True)
    if shards:
        stub.add(SPLIT_REPO, {f"Q4_K_M/{p.name}": p for p in shards} | {"README.md": readme})
    if mmproj is not None:
        stub.add(VISION_REPO, {"SmolLM2-135M-Instruct-Q4_K_M.gguf": smol, "mmproj-SmolLM2-f16.gguf": mmproj,
                               "mmproj-SmolLM2-Q8_0.gguf": mmproj})
