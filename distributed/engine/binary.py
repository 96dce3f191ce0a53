"""Where the engine binary comes from: ``llama-server`` (and ``ggml-rpc-server``).

Order: ``TARS_ENGINE_BIN`` (the ``llama-server`` file, or the folder holding it) → the
build cache of ``scripts/build_engine.sh``:
``${TARS_ENGINE_CACHE:-~/.cache/tars/engine}/<llama-cpp-python version>-<kind>/bin``, where
the kind (cpu | cuda) is that of the installed llama-cpp-python build (so the whole install
runs one llama.cpp version); the other kind's build is taken when only that one exists.

API::

    locate(override="") -> EngineBinary | None        # never raises
    why_not(override="") -> str                         # the reason locate() found nothing
    EngineBinary(server, rpc_server, version, kind, build, source).to_dict()
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

SERVER = "llama-server"
RPC_SERVER = "ggml-rpc-server"


@dataclass(frozen=True)
class EngineBinary:
    server: Path
    rpc_server: Path | None
    version: str  # llama-cpp-python release whose vendored llama.cpp it was built from ("" = unknown)
    kind: str  # "cpu" | "cuda" | "" (unknown: an override)
    build: str  # llama-server --version, first line ("version: 1 (abc123)")
    source: str  # "TARS_ENGINE_BIN" | "cache"

    def to_dict(self) -> dict[str, str | None]:
        d = asdict(self)
        d["server"] = str(self.server)
        d["rpc_server"] = str(self.rpc_server) if self.rpc_server else None
        return d

    def describe(self) -> str:
        what = f"llama.cpp of llama-cpp-python {self.version}" if self.version else "llama-server"
        kind = f", {self.kind}" if self.kind else ""
        return f"{what}{kind}: {self.server} ({self.build or 'build unknown'}; from {self.source})"


def cache_root() -> Path:
    return Path(os.environ.get("TARS_ENGINE_CACHE") or Path.home() / ".cache" / "tars" / "engine").expanduser()


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return ""


def llama_cpp_python_kind() -> str:
    """cuda when the installed llama-cpp-python carries libggml-cuda, else cpu (no import:
    importing llama_cpp loads the native library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return "cpu"
    for folder in spec.submodule_search_locations:
        if any(Path(folder).glob("lib/libggml-cuda*")):
            return "cuda"
    return "cpu"


@functools.lru_cache(maxsize=16)
def _build_of(server: Path, mtime: float) -> str:
    stamp = server.parent.parent / "VERSION"
    text = ""
    if stamp.is_file() and stamp.stat().st_mtime >= mtime:
        text = stamp.read_text(errors="replace")
    else:
        try:
            out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=20)
            text = (out.stdout or "") + (out.stderr or "")
        except (OSError, subprocess.SubprocessError) as exc:
            return f"does not run: {exc}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith(("version:", "built with"))]
    return "; ".join(lines) or text.strip().splitlines()[-1:][0] if text.strip() else ""


def _from_file(server: Path, version: str, kind: str, source: str) -> EngineBinary:
    rpc = server.with_name(RPC_SERVER)
    return EngineBinary(server=server, rpc_server=rpc if rpc.is_file() else None, version=version, kind=kind,
                        build=_build_of(server, server.stat().st_mtime), source=source)


def _override(override: str) -> tuple[EngineBinary | None, str]:
    p = Path(override).expanduser()
    if p.is_dir():
        p = p / SERVER
    if not p.is_file() or not os.access(p, os.X_OK):
        return None, f"TARS_ENGINE_BIN={override} is not an executable llama-server"
    return _from_file(p, "", "", "TARS_ENGINE_BIN"), ""


def _search(override: str) -> tuple[EngineBinary | None, str]:
    if override:
        return _override(override)
    version = llama_cpp_python_version()
    if not version:
        return None, "llama-cpp-python is not installed, so no engine build matches it"
    kind = llama_cpp_python_kind()
    root = cache_root()
    for k in (kind, "cuda" if kind == "cpu" else "cpu"):
        server = root / f"{version}-{k}" / "bin" / SERVER
        if server.is_file() and os.access(server, os.X_OK):
            return _from_file(server, version, k, "cache"), ""
    return None, (f"no llama-server built for llama-cpp-python {version} ({kind}) in {root}; "
                  f"build it with scripts/build_engine.sh --kind {kind}")


def locate(override: str = "") -> EngineBinary | None:
    """The engine binary to run, or None (see ``why_not``)."""
    return _search(override)[0]


def why_not(override: str = "") -> str:
    return _search(override)[1]
