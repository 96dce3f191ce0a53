"""The backend interface and the lazy registry.

A backend owns one loaded model and does the heavy work *synchronously*; the
node runs it in worker threads, one generation at a time per chat model and one
batch at a time per embedding model. Lifecycle::

    b = create_backend(spec, assignment, options, model_path)
    b.load()      # heavy; may raise TarsError (ModelFailed, MissingDependency)
    b.warmup()    # one tiny request so the first user request is not slow
    ...           # stream()/embed()
    b.unload()

Heavy libraries (llama_cpp, torch, sentence_transformers, transformers) are
imported inside ``load()`` through ``distributed.optional.require`` — importing a
backend module is cheap.
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..domain import Assignment, GenerateRequest, ModelKind, ModelSpec, TokenChunk
from ..errors import ConfigError, ModelFailed, ValidationFailed


@dataclass
class BackendOptions:
    """Per-backend knobs derived from settings + plan + profiler tuning."""

    context: int = 2048
    threads: int = 0  # 0 = library default
    batch_size: int = 64  # embedding encode batch
    extra: dict[str, Any] = field(default_factory=dict)
    # embedding/rerank models: "auto" | "torch" | "onnx" | "openvino" (TARS_EMBED_RUNTIME), and
    # the folder their exports and measured choices live in (<models dir>/runtimes)
    runtime: str = "torch"
    runtime_dir: Path | None = None


class Backend(ABC):
    name: ClassVar[str]
    kind: ClassVar[ModelKind]

    def __init__(self, spec: ModelSpec, assignment: Assignment, options: BackendOptions,
                 model_path: Path | str | None = None) -> None:
        self.spec = spec
        self.assignment = assignment
        self.options = options
        self.model_path = model_path
        # Things an operator should know about how this model actually runs (e.g. "asked
        # for cuda:0, no CUDA here: running on CPU"). Targets show them in info().
        self.notes: list[str] = []

    @abstractmethod
    def load(self) -> None: ...

    def model_source(self) -> tuple[str, bool]:
        """Where a folder-based model loads from — the file store's folder, else the catalog's
        ``path`` or hub ``repo`` — and whether it is a local folder (then the hub is never
        asked: ``HF_HUB_OFFLINE``). Raises ModelFailed when there is none or the folder is gone."""
        import os

        source = str(self.model_path) if self.model_path is not None else (self.spec.path or self.spec.repo or "")
        if not source:
            raise ModelFailed(f"model '{self.spec.id}': no folder or repo given to the {self.name} backend")
        local = Path(source).exists()
        if self.model_path is not None and not local:
            raise ModelFailed(f"model '{self.spec.id}': folder not found: {source}", path=source)
        if local:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return source, local

    def warmup(self) -> None:  # noqa: B027 - optional hook
        """Run one tiny request. Default: nothing."""

    @abstractmethod
    def unload(self) -> None: ...

    def memory_mb(self) -> dict[str, float]:
        """Memory this model holds now: {"vram_mb": .., "ram_mb": ..} (best effort)."""
        return {"vram_mb": 0.0, "ram_mb": 0.0}

    def runtime_info(self) -> dict[str, Any] | None:
        """The runtime the loaded model runs on and why ({"name", "why", ...}; shown in
        /models), where there is a choice (embedding and rerank models); else None."""
        return None


# The optional parts of the OpenAI chat surface, by the request fields that ask for them.
FEATURE_FIELDS: dict[str, tuple[str, ...]] = {
    "penalties": ("presence_penalty", "frequency_penalty"),
    "response_format": ("response_format",),
    "tools": ("tools", "tool_choice"),
    "logprobs": ("logprobs", "top_logprobs"),
    "template_inputs": ("reasoning_effort", "chat_template_kwargs"),  # values handed to the chat template
}


def requested_features(req: GenerateRequest) -> dict[str, str]:
    """{feature: the first field that asks for it} for the features ``req`` uses."""
    used: dict[str, str] = {}
    if req.presence_penalty:
        used["penalties"] = "presence_penalty"
    elif req.frequency_penalty:
        used["penalties"] = "frequency_penalty"
    if req.response_format and req.response_format.get("type", "text") != "text":
        used["response_format"] = "response_format"
    if req.tools:
        used["tools"] = "tools"
    elif req.tool_choice not in (None, "none", "auto"):
        used["tools"] = "tool_choice"
    if req.logprobs:
        used["logprobs"] = "logprobs"
    elif req.top_logprobs:
        used["logprobs"] = "top_logprobs"
    if getattr(req, "reasoning_effort", None) is not None:
        used["template_inputs"] = "reasoning_effort"
    elif getattr(req, "chat_template_kwargs", None):
        used["template_inputs"] = "chat_template_kwargs"
    return used


class ChatBackend(Backend):
    kind = "chat"
    # Which of FEATURE_FIELDS this backend honours; check_request refuses the rest by name.
    features: ClassVar[frozenset[str]] = frozenset()
    # Which of llama.cpp's sampler extras (distributed/sampling.py) it honours; the rest are refused by name.
    sampling_knobs: ClassVar[frozenset[str]] = frozenset()

    def check_request(self, req: GenerateRequest) -> None:
        """Raise ValidationFailed (400) naming the first field this backend cannot honour.
        Runs before the request is queued; a backend adds its own checks (a bad schema)."""
        for feature, field_name in requested_features(req).items():
            if feature not in self.features:
                raise ValidationFailed(
                    f"'{field_name}' is not supported by the {self.name} engine that serves model "
                    f"'{self.spec.id}'; leave it out", field=field_name, engine=self.name)
        for name in getattr(req, "sampling", None) or ():
            if name not in self.sampling_knobs:
                raise ValidationFailed(
                    f"'{name}' is not supported by the {self.name} engine that serves model '{self.spec.id}' "
                    "(the llama-server engine honours it); leave it out", field=name, engine=self.name)
        if req.n != 1:
            raise ValidationFailed("only n=1 reaches an engine (the API serves n > 1 as n requests)", field="n")

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Tokens of context the loaded model was created with."""

    @abstractmethod
    def prompt_tokens(self, req: GenerateRequest) -> int:
        """Number of tokens the request's prompt takes (chat template applied)."""

    @abstractmethod
    def stream(self, req: GenerateRequest, cancel: threading.Event) -> Iterator[TokenChunk]:
        """Yield text pieces as they are decoded; the last chunk has finish_reason set
        ("stop", "length" or "cancelled"). Checks ``cancel`` between tokens and stops
        promptly when it is set. ``req.max_tokens`` is already clamped by the node."""


class EmbedBackend(Backend):
    kind = "embed"

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    def max_seq_length(self) -> int:
        return 512

    @abstractmethod
    def embed(self, texts: list[str], normalize: bool = True) -> Any:
        """Return a float32 numpy array of shape (len(texts), dim)."""

    def count_tokens(self, texts: list[str]) -> int:
        return sum(len(t.split()) for t in texts)


_REGISTRY: dict[str, str] = {
    "llama_cpp": "distributed.backends.llama_cpp:LlamaCppBackend",
    "sentence": "distributed.backends.sentence:SentenceBackend",
    "hf8bit": "distributed.backends.hf8bit:HF8BitBackend",
    "fake": "distributed.backends.fake:FakeChatBackend",
    "fake_embed": "distributed.backends.fake:FakeEmbedBackend",
    "cross_encoder": "distributed.backends.cross_encoder:CrossEncoderBackend",
    "fake_rerank": "distributed.backends.cross_encoder:FakeRerankBackend",
}


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_class(name: str) -> type[Backend]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backend '{name}'; known backends: {', '.join(backend_names())}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def create_backend(spec: ModelSpec, assignment: Assignment, options: BackendOptions,
                   model_path: Path | str | None = None, backend: str | None = None) -> Backend:
    """Instantiate (not load) the backend for ``spec``. ``backend`` overrides spec.backend;
    the override "fake" picks the fake backend of the spec's kind."""
    name = backend or assignment.backend or spec.backend
    if name == "fake" and spec.kind in ("embed", "rerank"):
        name = "fake_embed" if spec.kind == "embed" else "fake_rerank"
    return backend_class(name)(spec, assignment, options, model_path)
