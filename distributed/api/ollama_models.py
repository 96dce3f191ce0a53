"""Ollama's model rows — ``/api/tags``, ``/api/ps``, ``/api/show`` — and the status lines
of ``/api/pull``, from the catalog spec, the model's ``Target.info()`` and, when this host
has the model's file, the file itself (GGUF header, or a folder's ``config.json``).

What each field means here (docs/OLLAMA.md): ``size`` is the file (the catalog's figure
when the file is on another host); ``digest`` the catalog's sha256 of the file, else a
stable hash of the id and quantisation; ``modified_at`` the file's time; ``expires_at`` far
ahead (a model stays loaded until the cluster removes it); ``model_info`` the GGUF's
scalar metadata, with ``<arch>.context_length`` the context the model is *served* with
(what a client may send), the trained one under ``tars.trained_context_length``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..domain import ModelSpec
from ..errors import ModelFailed
from .ollama_options import tagged

MIB = 2**20
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"  # chat templates shipped with the package
FOREVER = "2318-01-01T00:00:00Z"  # models stay loaded until removed (Ollama's keep_alive -1 reads alike)
_FORMATS = {"llama_cpp": "gguf"}
_SKIP = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


def parameter_size(params_b: float) -> str:
    """0.135 → "135M", 7.24 → "7.2B" (Ollama's style)."""
    if params_b >= 1:
        return f"{params_b:.1f}B"
    millions = params_b * 1000
    return f"{millions:.0f}M" if millions >= 100 else f"{millions:.1f}M"


def quantization(quant: str) -> str:
    return {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "INT8"}.get(quant.lower(), quant.upper())


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int) -> dict[str, Any]:
    """What the file says (cached per path and modification time)."""
    p = Path(path)
    if p.is_dir():
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        return {"size": size, "family": config.get("model_type"), "fields": {}}
    from ..vram import read_gguf

    try:
        meta = read_gguf(p)
    except Exception:  # noqa: BLE001 - not a GGUF, or unreadable: the catalog's figures stand
        return {"size": p.stat().st_size, "family": None, "fields": {}}
    return {"size": p.stat().st_size, "family": meta.arch, "fields": dict(meta.fields)}


class ModelFacts:
    """One model as Ollama's listings describe it."""

    def __init__(self, spec: ModelSpec, path: Path | None) -> None:
        self.spec = spec
        self.path = path
        read: dict[str, Any] = {}
        if path is not None:
            try:
                read = _read(str(path), path.stat().st_mtime_ns)
            except OSError:
                read = {}
        self.fields: dict[str, Any] = read.get("fields", {})
        self.size = int(read.get("size") or (spec.size_mb or 0) * MIB)
        self.family = str(read.get("family") or spec.id.split("-")[0].lower())
        when = path.stat().st_mtime if path is not None and path.exists() else None
        self.modified_at = (datetime.fromtimestamp(when, timezone.utc) if when else datetime.now(timezone.utc)) \
            .isoformat().replace("+00:00", "Z")
        self.digest = spec.sha256 or hashlib.sha256(f"{spec.id}:{spec.quant}".encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        s = self.spec
        return {"parent_model": "", "format": _FORMATS.get(s.backend, "safetensors"), "family": self.family,
                "families": [self.family], "parameter_size": parameter_size(s.params_b),
                "quantization_level": quantization(s.quant)}

    def row(self) -> dict[str, Any]:
        name = tagged(self.spec.id)
        return {"name": name, "model": name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details()}

    def template(self) -> str:
        """The chat template the model is served with: the catalog's own file when the entry
        names one (``chat_template``: a shipped name or a path), else the GGUF's."""
        named = getattr(self.spec, "chat_template", None)
        if named:
            path = Path(named) if Path(named).is_absolute() else TEMPLATES / f"{named}.jinja"
            try:
                return path.read_text()
            except OSError:
                pass
        return str(self.fields.get("tokenizer.chat_template") or "")

    def model_info(self, context: int) -> dict[str, Any]:
        s = self.spec
        arch = str(self.fields.get("general.architecture") or self.family)
        info: dict[str, Any] = {k: v for k, v in self.fields.items()
                                if k != "tokenizer.chat_template" and not k.startswith("GGUF.")}
        for key in _SKIP:
            if key in info:
                info[key] = []  # Ollama leaves these out unless verbose
        trained = int(self.fields.get(f"{arch}.context_length") or s.context)
        info.update({"general.architecture": arch, "general.parameter_count": int(round(s.params_b * 1e9)),
                     f"{arch}.context_length": context, "tars.trained_context_length": trained})
        if s.n_embd and f"{arch}.embedding_length" not in info:
            info[f"{arch}.embedding_length"] = s.dim or s.n_embd
        if s.n_layers and f"{arch}.block_count" not in info:
            info[f"{arch}.block_count"] = s.n_layers
        return info


def served_context(spec: ModelSpec, info: dict[str, Any], settings_context: int) -> int:
    """The context a client may fill: the target's when it reports one, else what the
    settings give a model of this kind."""
    ctx = info.get("context")
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    own = spec.context or settings_context  # 0: a spec built from a peer's report that gave none
    return min(settings_context, own) if spec.kind == "chat" else own


def capabilities(spec: ModelSpec, info: dict[str, Any]) -> list[str]:
    if spec.kind == "embed":
        return ["embedding"]
    caps = ["completion"]
    template = (info.get("engine") or {}).get("template_caps") or {}
    if template.get("supports_tool_calls"):
        caps.append("tools")
    return caps


def ps_row(facts: ModelFacts, info: dict[str, Any], context: int) -> dict[str, Any]:
    memory = info.get("memory") or {}
    vram = int(float(memory.get("vram_mb") or 0) * MIB)
    size = int((float(memory.get("vram_mb") or 0) + float(memory.get("ram_mb") or 0)) * MIB) or facts.size
    if not memory and str(info.get("device", "")).startswith("cuda"):
        vram = facts.size
    return {**facts.row(), "expires_at": FOREVER, "size": size, "size_vram": vram, "context_length": context,
            "node": info.get("node"), "state": info.get("state")}


def show_body(facts: ModelFacts, info: dict[str, Any], context: int) -> dict[str, Any]:
    s = facts.spec
    parameters = f"num_ctx                        {context}"
    modelfile = (f"# Modelfile generated by TARS Distributed (not used to build the model)\n"
                 f"# {s.description}\nFROM {tagged(s.id)}\nPARAMETER {parameters}\n")
    return {"license": "", "modelfile": modelfile, "parameters": parameters, "template": facts.template(),
            "details": facts.details(), "model_info": facts.model_info(context),
            "capabilities": capabilities(s, info), "modified_at": facts.modified_at,
            "node": info.get("node"), "state": info.get("state")}


class PullProgress:
    """The status lines of one ``/api/pull`` as the model's row in ``GET /models`` changes:
    ``pulling manifest``, ``pulling <digest>`` with bytes while its host downloads it,
    ``verifying sha256 digest`` once downloaded, ``loading model``, then ``success``."""

    def __init__(self, facts: ModelFacts) -> None:
        self.digest = facts.digest
        self.size = facts.size
        self.on_disk = facts.spec.embedded or facts.path is not None  # nothing to download (here, at least)
        self.pulled = False
        self.said: set[str] = set()
        self.last: tuple[int, int] | None = None

    def first(self) -> dict[str, Any]:
        return {"status": "pulling manifest"}

    def update(self, row: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
        """(lines to send, finished). Raises ModelFailed when the model failed."""
        if row is None:
            return [], False
        state = row.get("state")
        out: list[dict[str, Any]] = []
        if state == "pulling":
            self.pulled = True
            p = row.get("progress") or {}
            return self._bytes(int(p.get("done_bytes") or 0), int(p.get("total_bytes") or 0)), False
        if state == "failed":
            raise ModelFailed(f"model '{row.get('id')}' failed on {row.get('node')}: {row.get('error') or 'no reason'}",
                              model=row.get("id"), node=row.get("node"))
        if self.pulled:
            out += self._once("verifying sha256 digest")
        elif self.on_disk or state == "ready":  # nothing was downloaded: all of it is here
            out += self._bytes(self.size, self.size)
        if state == "ready":
            return out + [{"status": "success"}], True
        return out + self._once("loading model"), False

    def _bytes(self, done: int, total: int) -> list[dict[str, Any]]:
        if (done, total) == self.last:
            return []
        self.last = (done, total)
        return [{"status": f"pulling {self.digest[:12]}", "digest": f"sha256:{self.digest}", "total": total,
                 "completed": done}]

    def _once(self, status: str) -> list[dict[str, Any]]:
        if status in self.said:
            return []
        self.said.add(status)
        return [{"status": status}]
