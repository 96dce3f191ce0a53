"""How much GPU memory a model needs, and how many of its layers fit in a budget.

VRAM = weights + KV cache at the configured context + compute overhead.

- **GGUF on disk**: the numbers come from the file itself — tensor sizes, block count,
  embedding length, KV heads, key/value lengths (keys as defined by the ``gguf``
  package). Users of other tools complain that VRAM estimates are wrong; reading the
  file we will load is the cheapest way not to be.
- **Otherwise** (not downloaded yet, or not GGUF): the catalog's hints (``size_mb``,
  ``n_layers``, ``n_embd``, ``n_head_kv``, ``head_dim``) or ``params_b`` × bytes per
  parameter of the quantisation.

The KV cache is f16 (llama.cpp's default) for every layer at the full context, which is
conservative for sliding-window models such as Gemma 3. A llama-server chat engine holds
one KV cache of ``context`` tokens per slot (``-np``): ``estimate(..., slots=N)`` /
``with_slots`` count N of them (the planner may count fewer where VRAM is short).
Overhead is the CUDA runtime (context + cuBLAS workspace, ~250 MB, which nvidia-smi shows
but no model file mentions) plus the compute buffer: for llama.cpp dominated by the
attention scores of one 512-token micro-batch against the whole context
(``512 × ctx × heads × 4`` bytes).

The header itself is read by ``gguf_header.py`` (a file on disk, a header fetched by ranged
reads and cached, the shards of a split model together).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .domain import ModelSpec
from .errors import ConfigError
from .gguf_header import GGUFMeta, read_gguf

__all__ = ["GGUFMeta", "VramEstimate", "estimate", "layers_that_fit", "read_gguf", "effective_context"]

MIB = 1024 * 1024
RUNTIME_MB = 250  # CUDA context + cuBLAS workspace per process using the GPU
UBATCH = 512  # llama.cpp micro-batch: sets the size of the attention-score buffer
BYTES_PER_PARAM = {  # weights only; int8 keeps norms/embeddings in fp16 → a little over 1
    "q4_k_m": 4.85 / 8, "q4_0": 4.5 / 8, "q5_k_m": 5.7 / 8, "q8_0": 8.5 / 8,
    "int8": 1.1, "int4": 0.6, "nf4": 0.6, "fp16": 2.0, "bf16": 2.0, "f16": 2.0, "fp32": 4.0, "f32": 4.0,
}


@dataclass(frozen=True)
class VramEstimate:
    """Memory one model needs on a GPU (MB = MiB). ``total_mb`` = weights + kv + overhead."""

    model: str
    weights_mb: int
    kv_mb: int
    overhead_mb: int  # runtime + compute buffer
    total_mb: int
    n_layers: int  # repeating blocks (0 when unknown): the unit of partial offload
    context: int
    source: str  # "gguf" | "catalog"
    compute_mb: int = 0  # part of overhead that is needed on CPU too
    layer_mb: float = 0.0  # weights + KV of one repeating block
    partial_ok: bool = False  # llama.cpp can split layers between GPU and CPU
    notes: tuple[str, ...] = field(default_factory=tuple)
    slots: int = 1  # KV caches of ``context`` tokens counted in kv_mb (engine slots, ``with_slots``)

    @property
    def ram_mb(self) -> int:
        """Host RAM when the whole model runs on CPU (no CUDA runtime)."""
        return self.weights_mb + self.kv_mb + self.compute_mb

    def vram_for_layers(self, n_gpu_layers: int) -> int:
        """VRAM with ``n_gpu_layers`` blocks offloaded (-1 or >= n_layers: everything)."""
        if n_gpu_layers < 0 or n_gpu_layers >= self.n_layers:
            return self.total_mb
        if n_gpu_layers == 0:
            return 0
        return self.overhead_mb + math.ceil(n_gpu_layers * self.layer_mb)

    def ram_for_layers(self, n_gpu_layers: int) -> int:
        """Host RAM for the part left on CPU."""
        if n_gpu_layers < 0 or (self.n_layers and n_gpu_layers >= self.n_layers):
            return 0
        if n_gpu_layers == 0:
            return self.ram_mb
        on_gpu = math.floor(n_gpu_layers * self.layer_mb)
        return max(0, self.weights_mb + self.kv_mb - on_gpu) + self.compute_mb

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


def layers_that_fit(est: VramEstimate, budget_mb: int) -> int:
    """``n_gpu_layers`` for llama.cpp under ``budget_mb``: -1 when all fit, else 0..n_layers-1."""
    if est.total_mb <= budget_mb:
        return -1
    if not est.partial_ok or est.n_layers <= 0 or est.layer_mb <= 0:
        return 0
    n = math.floor((budget_mb - est.overhead_mb) / est.layer_mb)
    return max(0, min(n, est.n_layers - 1))


# --------------------------------------------------------------------------- estimate
def _mb(n_bytes: float) -> int:
    return math.ceil(n_bytes / MIB)


def _attn_compute_mb(context: int, n_head: int) -> int:
    return 64 + _mb(UBATCH * context * max(1, n_head) * 4)


def _from_gguf(spec: ModelSpec, context: int, meta: GGUFMeta) -> VramEstimate:
    n_layers = int(meta.arch_field("block_count", 0) or 0)
    n_embd = int(meta.arch_field("embedding_length", 0) or 0)
    n_head = meta.arch_field("attention.head_count", 0) or 0
    n_head = max(n_head) if isinstance(n_head, list) else int(n_head)
    kv = meta.arch_field("attention.head_count_kv", n_head)
    kv_per_layer = kv if isinstance(kv, list) else [int(kv)] * n_layers
    head_dim = n_embd // n_head if n_head else 0
    k_len = int(meta.arch_field("attention.key_length", head_dim) or head_dim)
    v_len = int(meta.arch_field("attention.value_length", head_dim) or head_dim)
    kv_bytes = sum(h * (k_len + v_len) for h in kv_per_layer) * context * 2  # f16
    weights = sum(meta.tensor_bytes.values())
    blocks = sum(b for name, b in meta.tensor_bytes.items() if name.startswith("blk."))
    compute = _attn_compute_mb(context, n_head)
    weights_mb, kv_mb = _mb(weights), _mb(kv_bytes)
    overhead = RUNTIME_MB + compute
    return VramEstimate(
        model=spec.id, weights_mb=weights_mb, kv_mb=kv_mb, overhead_mb=overhead,
        total_mb=weights_mb + kv_mb + overhead, n_layers=n_layers, context=context, source="gguf",
        compute_mb=compute, layer_mb=(blocks + kv_bytes) / MIB / n_layers if n_layers else 0.0,
        partial_ok=n_layers > 0,
    )


def _from_catalog(spec: ModelSpec, context: int, notes: tuple[str, ...]) -> VramEstimate:
    gguf_like = spec.backend == "llama_cpp"
    per_param = BYTES_PER_PARAM.get(spec.quant.lower())
    if gguf_like and spec.size_mb:
        weights_mb = int(spec.size_mb)
    elif per_param is not None:
        weights_mb = _mb(spec.params_b * 1e9 * per_param)
    else:
        weights_mb = _mb(spec.params_b * 1e9 * 2.0)
        notes += (f"unknown quantisation '{spec.quant}': assumed 2 bytes per parameter",)
    n_layers = spec.n_layers or 0
    kv_mb = 0
    if spec.kind == "chat":
        if n_layers and spec.n_head_kv and spec.head_dim:
            kv_mb = _mb(2 * n_layers * spec.n_head_kv * spec.head_dim * context * 2)
        else:
            notes += ("no architecture hints in the catalog: KV cache not counted",)
    if gguf_like:
        n_head = (spec.n_embd // spec.head_dim) if spec.n_embd and spec.head_dim else 32
        compute = _attn_compute_mb(context, n_head)
    else:  # activations of a transformers / sentence-transformers forward pass
        compute = 64 + _mb(weights_mb * MIB * 0.10)
    overhead = RUNTIME_MB + compute
    blocks = weights_mb * 0.95 if gguf_like else weights_mb
    return VramEstimate(
        model=spec.id, weights_mb=weights_mb, kv_mb=kv_mb, overhead_mb=overhead,
        total_mb=weights_mb + kv_mb + overhead, n_layers=n_layers, context=context, source="catalog",
        compute_mb=compute, layer_mb=(blocks + kv_mb) / n_layers if n_layers else 0.0,
        partial_ok=gguf_like and n_layers > 0, notes=notes,
    )


def has_slots(spec: ModelSpec) -> bool:
    """Does this model run in an engine with slots? A GGUF chat model (llama-server ``-np``)."""
    return spec.kind == "chat" and spec.backend == "llama_cpp"


def with_slots(est: VramEstimate, spec: ModelSpec, slots: int) -> VramEstimate:
    """``est`` (one slot) with a KV cache of ``context`` tokens for each of ``slots`` engine
    slots; unchanged for a model without slots (see ``has_slots``) or ``slots`` <= 1."""
    if slots <= 1 or not has_slots(spec):
        return est
    if est.kv_mb <= 0:  # no architecture hints: the KV cache is not counted at all
        return replace(est, slots=slots)
    extra = est.kv_mb * (slots - 1)
    per_layer = est.kv_mb / est.n_layers if est.n_layers else 0.0
    return replace(est, kv_mb=est.kv_mb + extra, total_mb=est.total_mb + extra,
                   layer_mb=est.layer_mb + per_layer * (slots - 1), slots=slots,
                   notes=(*est.notes, f"KV cache for {slots} engine slots of {est.context} tokens"))


PROJECTOR_COMPUTE_MB = 256  # the buffer a vision projector encodes one image in (an estimate)


def with_projector(est: VramEstimate, spec: ModelSpec) -> VramEstimate:
    """A vision model's projector (``mmproj``): its weights and the buffer that encodes an image.
    llama-server puts it on the GPU of the model's layers, or in RAM on CPU: counted with the
    overhead (on the GPU with any offloaded layer) and the compute part (in RAM on CPU)."""
    if not spec.mmproj:
        return est
    mb = int(spec.mmproj_mb or 0) + PROJECTOR_COMPUTE_MB
    return replace(est, overhead_mb=est.overhead_mb + mb, compute_mb=est.compute_mb + mb, total_mb=est.total_mb + mb,
                   notes=est.notes + (f"vision projector: {mb} MB (its weights + an image's encoding buffer)",))


def effective_context(spec: ModelSpec, context: int) -> int:
    """The context a model is loaded with: the configured one, capped at the model's native one."""
    return spec.context if spec.kind in ("embed", "rerank") else max(1, min(context, spec.context))


def estimate(spec: ModelSpec, context: int, path: str | Path | None = None, *, slots: int = 1) -> VramEstimate:
    """VRAM estimate for ``spec`` at ``context`` (capped at the model's native context) per
    slot, with ``slots`` engine slots (``with_slots``).

    Uses the GGUF file's own metadata when ``path`` is a readable GGUF; falls back to the
    catalog (with a note saying why) when the file is absent or unreadable.
    """
    ctx = effective_context(spec, context)
    notes: tuple[str, ...] = ()
    if path is not None and spec.backend == "llama_cpp":
        p = Path(path)
        if p.is_file():
            try:
                return with_projector(with_slots(_from_gguf(spec, ctx, read_gguf(p)), spec, slots), spec)
            except ConfigError as exc:
                notes = (f"GGUF metadata unreadable ({exc.message}): used catalog hints",)
        else:
            notes = (f"'{p}' not on disk: used catalog hints",)
    return with_projector(with_slots(_from_catalog(spec, ctx, notes), spec, slots), spec)
