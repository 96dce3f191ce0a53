"""Plain data shared by every layer. No behaviour beyond (de)serialisation.

These dataclasses cross process boundaries (JSON-RPC between hosts), so each
has ``to_dict()`` and ``from_dict()``; unknown keys are ignored on the way in so
that a newer peer can talk to an older one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

ModelKind = Literal["chat", "embed", "rerank"]
Role = Literal["server", "worker", "standalone"]

T = TypeVar("T")


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


class _Data:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _from_dict(cls, data)


# --------------------------------------------------------------------------- hardware
@dataclass
class GPUInfo(_Data):
    index: int
    name: str
    vram_total_mb: int
    vram_used_mb: int = 0
    vram_free_mb: int = 0
    uuid: str = ""
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: float | None = None
    compute_capability: str | None = None  # "8.6"
    driver_version: str | None = None
    cuda_version: str | None = None


@dataclass
class HostProfile(_Data):
    """What one host has. ``source`` says how it was obtained: nvml, torch, cpu, simulated:<preset>."""

    hostname: str
    cpu_model: str
    cpu_cores: int
    ram_total_mb: int
    ram_free_mb: int
    gpus: list[GPUInfo] = field(default_factory=list)
    source: str = "cpu"
    simulated: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. "NVML failed: ...; fell back to torch"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HostProfile":
        d = dict(data)
        d["gpus"] = [GPUInfo.from_dict(g) for g in d.get("gpus", [])]
        return _from_dict(cls, d)

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)

    @property
    def best_gpu(self) -> GPUInfo | None:
        return max(self.gpus, key=lambda g: (g.vram_total_mb, -g.index), default=None)


# --------------------------------------------------------------------------- models
@dataclass
class ModelSpec(_Data):
    """One catalog entry (see catalog.toml)."""

    id: str
    kind: ModelKind
    backend: str  # "llama_cpp" | "sentence" | "hf8bit" | "fake"
    params_b: float  # parameter count, billions
    quant: str  # "Q4_K_M", "int8", "fp16", "fp32"
    context: int  # native context length
    chat_format: str | None = None
    # where it comes from: a hub repo (+ file for GGUF) or an embedded package
    repo: str | None = None
    file: str | None = None
    package: str | None = None
    path: str | None = None  # a local file/folder the user registered (catalog entry)
    sha256: str | None = None
    size_mb: int | None = None  # weights on disk
    dim: int | None = None  # embedding dimension
    # architecture hints for the VRAM estimate when the file is not on disk
    n_layers: int | None = None
    n_embd: int | None = None
    n_head_kv: int | None = None
    head_dim: int | None = None
    embedded: bool = False  # ships with the package, no download
    description: str = ""
    # a chat template in place of the GGUF's own: a shipped name (distributed/templates/<name>.jinja)
    # or, from a user catalog, a file path (resolved when the catalog is read)
    chat_template: str | None = None
    # a GGUF from the hub (a catalog entry or a resolved hf.co reference, modelref.py):
    revision: str | None = None  # the repo commit it was resolved at (pulls fetch exactly that)
    shards: list[str] | None = None  # every file of a split GGUF (-00001-of-0000N.gguf), ``file`` first
    mmproj: str | None = None  # the vision projector: a file in ``repo``, or a local path (user catalog)
    mmproj_mb: int | None = None  # its size (VRAM the planner adds)

    @property
    def vision(self) -> bool:
        """The model sees images: it has a projector (llama-server ``--mmproj``)."""
        return bool(self.mmproj)


@dataclass
class Assignment(_Data):
    """Where one model runs, and why."""

    model: str
    kind: ModelKind
    node: str
    device: str  # "cuda:0" | "cpu"
    quant: str
    n_gpu_layers: int  # -1 = all layers; 0 = CPU
    vram_mb: int  # estimated VRAM on that device
    reason: str
    backend: str = ""
    ram_mb: int = 0  # estimated host RAM when (partly) on CPU
    # a model split across hosts (pooled VRAM): one share per GPU, the engine's host first —
    # [{"node", "device", "layers", "vram_mb"}]; None = the model runs on ``node`` alone
    split: list[dict[str, Any]] | None = None
    # engine slots of a GGUF chat model (llama-server ``-np``; each a KV cache of TARS_CONTEXT
    # tokens): TARS_PARALLEL, or fewer where the planner found VRAM short; None = not a slotted
    # engine, or a plan from a peer that predates the field (the engine then uses TARS_PARALLEL)
    slots: int | None = None
    # a shipped chat template this deploy asked for (POST /models "chat_template"), in place of
    # the catalog's or the GGUF's own; None = the spec's
    chat_template: str | None = None

    @property
    def split_nodes(self) -> list[str]:
        """Hosts other than ``node`` that this model needs (its RPC workers)."""
        return [s["node"] for s in self.split or [] if s["node"] != self.node]


@dataclass
class Unplaced(_Data):
    model: str
    reason: str


@dataclass
class Plan(_Data):
    assignments: list[Assignment] = field(default_factory=list)
    unplaced: list[Unplaced] = field(default_factory=list)
    # specs of models no host's catalog has on its own (hub references resolved by some host,
    # modelref.py): id -> ModelSpec.to_dict(), so every host loads the same files
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        specs = data.get("specs")
        return cls(
            assignments=[Assignment.from_dict(a) for a in data.get("assignments", [])],
            unplaced=[Unplaced.from_dict(u) for u in data.get("unplaced", [])],
            specs=dict(specs) if isinstance(specs, dict) else {},
        )

    def for_node(self, node: str) -> list[Assignment]:
        return [a for a in self.assignments if a.node == node]

    def where(self, model: str) -> Assignment | None:
        return next((a for a in self.assignments if a.model == model), None)


# --------------------------------------------------------------------------- requests
@dataclass
class GenerateRequest(_Data):
    """A chat (``messages``) or completion (``prompt``) request, after validation."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    # The OpenAI chat surface (api/schemas.py validates; an engine honours each or refuses
    # it by name with ValidationFailed). All plain JSON, so they cross hosts unchanged.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"?}}
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools: [{"type": "function", "function": {..}}]
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", ..}
    parallel_tool_calls: bool = True  # False: at most one call per answer
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per token (0-20) when logprobs
    n: int = 1  # choices; the API fans n > 1 out into n requests of n=1
    choice: int = 0  # this request's index in such a fan-out: the later ones are admitted with the first
    # llama.cpp's sampler extras the client set ({"top_k": 20, "min_p": 0.1, ...}; names, types and
    # bounds: distributed/sampling.py). Empty = the engine's defaults.
    sampling: dict[str, Any] = field(default_factory=dict)
    # Reach the chat template (llama-server's own request fields): "none" turns thinking off,
    # another effort is the template's ``reasoning_effort``; kwargs are extra template variables.
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    # The fields above are left out of to_rpc() while at their defaults, so a request
    # without them still reaches a peer of the previous version.
    _SURFACE = ("presence_penalty", "frequency_penalty", "response_format", "tools", "tool_choice",
                "parallel_tool_calls", "logprobs", "top_logprobs", "n", "choice", "sampling",
                "reasoning_effort", "chat_template_kwargs")

    def to_rpc(self) -> dict[str, Any]:
        d = self.to_dict()
        defaults = GenerateRequest()
        for name in self._SURFACE:
            if d.get(name) == getattr(defaults, name):
                d.pop(name, None)
        return d


@dataclass
class Timings(_Data):
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class Usage(_Data):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion(_Data):
    model: str
    node: str
    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    via: str | None = None
    fallback: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. "max_tokens clamped to 1800"
    # finish_reason "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": "<json>"}}]
    tool_calls: list[dict[str, Any]] | None = None
    # OpenAI chat "content" logprobs: [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]
    logprobs: list[dict[str, Any]] | None = None
    reasoning: str | None = None  # what a thinking model thought, apart from its answer (reasoning_content)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Completion":
        d = dict(data)
        d["usage"] = Usage.from_dict(d.get("usage", {}))
        d["timings"] = Timings.from_dict(d.get("timings", {}))
        return _from_dict(cls, d)


@dataclass
class TokenChunk(_Data):
    """One streamed piece. The last chunk of a stream has ``finish_reason`` set."""

    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # entries for the tokens of this piece (Completion.logprobs shape)
    tool_calls: list[dict[str, Any]] | None = None  # set on the piece that completes the tool calls (text "")
    tokens: int | None = None  # tokens this piece stands for when not exactly one (a tool-call piece, held text)
    reasoning: str | None = None  # a piece of a thinking model's reasoning (text "": not part of the answer)


@dataclass
class EmbedRequest(_Data):
    model: str | None = None
    input: list[str] = field(default_factory=list)
    normalize: bool = True


@dataclass
class Embeddings(_Data):
    """``vectors`` is a float32 numpy array (n, dim) locally; a list of lists on the wire."""

    model: str
    node: str
    vectors: Any
    prompt_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    via: str | None = None
    fallback: bool = False

    @property
    def dim(self) -> int:
        v = self.vectors
        return int(v.shape[1]) if hasattr(v, "shape") else (len(v[0]) if v else 0)
