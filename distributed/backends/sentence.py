"""Sentence embeddings through sentence-transformers.

One ``SentenceTransformer`` per backend, on the device from the plan ("cuda:N" or "cpu"),
in fp16 on CUDA (half the VRAM and faster from Volta on; the profiler's ``dtype`` knob keeps
older cards in fp32). Cosine ranking is unchanged at the precision embeddings are compared at. ``embed`` is one ``encode`` call:
the node's micro-batcher has already merged concurrent requests into ``texts``.

Local folders load with ``local_files_only`` (and ``HF_HUB_OFFLINE=1`` when nobody set it)
so that loading an on-disk model never reaches a hub.

Token counting uses a private copy of the model's fast tokenizer: counting happens on the
event loop while ``encode`` may be tokenizing in a worker thread, and a Rust tokenizer
shared between the two can fail with "Already borrowed" when the Python wrapper
reconfigures its truncation in the middle.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelFailed
from ..logs import fields, get_logger
from ..optional import require
from .base import EmbedBackend
from .devices import apply_cuda_tuning, pick_device, wants_fp16

log = get_logger(__name__)

_PURPOSE = "embedding models (sentence backend)"


class SentenceBackend(EmbedBackend):
    name = "sentence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._np: Any = None
        self._counter: Any = None  # a tokenizers.Tokenizer of our own, or None
        self._dim = 0
        self._device = "cpu"

    def load(self) -> None:
        source, local = self.model_source()
        self._np = require("numpy", purpose=_PURPOSE)
        torch = require("torch", purpose=_PURPOSE)
        st = require("sentence_transformers", "sentence-transformers", _PURPOSE)
        self._device = pick_device(torch, self.assignment.device, self.spec.id, self.notes, log)
        apply_cuda_tuning(torch, self._device, self.options.extra)
        try:
            model = st.SentenceTransformer(source, device=self._device, local_files_only=local)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFailed(f"model '{self.spec.id}' failed to load from {source}: {exc}", path=source) from exc
        if wants_fp16(self._device, self.options.extra):
            model.half()
        model.eval()
        self._model = model
        # renamed in sentence-transformers 6; older releases only have the long name
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self._dim = int(dim_of() or 0)
        self._counter = self._make_counter(model)
        log.info("loaded embeddings", extra=fields(model=self.spec.id, device=self._device, dim=self._dim,
                                                  max_seq_length=self.max_seq_length))

    def _make_counter(self, model: Any) -> Any:
        backend_tok = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        if backend_tok is None:
            return None
        tokenizers = require("tokenizers", purpose=_PURPOSE)
        counter = tokenizers.Tokenizer.from_str(backend_tok.to_str())
        counter.no_padding()
        counter.enable_truncation(max_length=self.max_seq_length)
        return counter

    def warmup(self) -> None:
        self.embed(["warm up"], normalize=True)

    def unload(self) -> None:
        model, self._model = self._model, None
        self._counter = None
        if model is not None and self._device.startswith("cuda"):
            del model
            torch = require("torch", purpose=_PURPOSE)
            torch.cuda.empty_cache()

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_seq_length(self) -> int:
        if self._model is None:
            return 512
        return int(self._model.max_seq_length or 512)

    def embed(self, texts: list[str], normalize: bool = True) -> Any:
        model = self._model
        if model is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        np = self._np
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        vectors = model.encode(texts, batch_size=self.options.batch_size, convert_to_numpy=True,
                               normalize_embeddings=normalize, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model sees (special tokens included, truncation applied)."""
        return sum(self.count_tokens_each(texts))

    def count_tokens_each(self, texts: list[str]) -> list[int]:
        """Per-text token counts in one tokenizer call (the micro-batcher splits usage
        back to the requests it merged)."""
        if self._counter is None:
            return [super(SentenceBackend, self).count_tokens([t]) for t in texts]
        return [len(e.ids) for e in self._counter.encode_batch(texts)]

    def memory_mb(self) -> dict[str, float]:
        if self._model is None:
            return {"vram_mb": 0.0, "ram_mb": 0.0}
        nbytes = sum(p.numel() * p.element_size() for p in self._model.parameters())
        mb = round(nbytes / 2**20, 1)
        return {"vram_mb": mb, "ram_mb": 0.0} if self._device.startswith("cuda") else {"vram_mb": 0.0, "ram_mb": mb}
