"""Rerankers: a sentence-transformers ``CrossEncoder`` scoring (query, document) pairs.

A cross-encoder reads the query and one document together and outputs one relevance
score — slower than comparing embeddings but much better at ordering a short list,
which is what a reranker is for. The backend plugs into the node like an embedding
model: ``LocalTarget`` puts it behind the same ``MicroBatcher``, whose items here are
``Pair``s instead of strings, so concurrent rerank requests share one ``predict`` call.
``embed(pairs)`` therefore returns a float32 vector of scores (one per pair), not
embeddings; ``dim`` is 1. A one-label model's score goes through a sigmoid (the
library's default for one label), so scores lie in 0..1 like Cohere's relevance_score.

Local folders load offline (``local_files_only``), as the sentence backend does.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelFailed
from ..logs import fields, get_logger
from ..optional import require
from .base import EmbedBackend
from .devices import apply_cuda_tuning, pick_device, wants_fp16

log = get_logger(__name__)

_PURPOSE = "rerank models (cross_encoder backend)"


class Pair(tuple):
    """(query, document). Its length is the text length, so the micro-batcher's sort by
    length (to cut padding) orders pairs by how long they are to encode."""

    __slots__ = ()

    def __new__(cls, query: str, document: str) -> "Pair":
        return super().__new__(cls, (query, document))

    def __len__(self) -> int:
        return len(self[0]) + len(self[1])


class CrossEncoderBackend(EmbedBackend):
    """``kind = "rerank"`` models. ``embed(pairs)`` → scores, shape (len(pairs),)."""

    name = "cross_encoder"
    kind = "rerank"  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._np: Any = None
        self._counter: Any = None
        self._device = "cpu"

    def load(self) -> None:
        source, local = self.model_source()
        self._np = require("numpy", purpose=_PURPOSE)
        torch = require("torch", purpose=_PURPOSE)
        st = require("sentence_transformers", "sentence-transformers", _PURPOSE)
        self._device = pick_device(torch, self.assignment.device, self.spec.id, self.notes, log)
        apply_cuda_tuning(torch, self._device, self.options.extra)
        max_length = min(self.spec.context, 512) if self.spec.context else None
        try:
            model = st.CrossEncoder(source, device=self._device, max_length=max_length, local_files_only=local)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFailed(f"model '{self.spec.id}' failed to load from {source}: {exc}", path=source) from exc
        if wants_fp16(self._device, self.options.extra):
            model.model.half()
        model.model.eval()
        self._model = model
        self._counter = self._make_counter(model)
        log.info("loaded reranker", extra=fields(model=self.spec.id, device=self._device,
                                                 max_length=self.max_seq_length))

    def _make_counter(self, model: Any) -> Any:
        backend_tok = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        if backend_tok is None:
            return None
        tokenizers = require("tokenizers", purpose=_PURPOSE)
        counter = tokenizers.Tokenizer.from_str(backend_tok.to_str())  # private copy: see sentence.py
        counter.no_padding()
        counter.enable_truncation(max_length=self.max_seq_length)
        return counter

    def warmup(self) -> None:
        self.embed([Pair("warm up", "a document")], normalize=False)

    def unload(self) -> None:
        model, self._model = self._model, None
        self._counter = None
        if model is not None and self._device.startswith("cuda"):
            del model
            torch = require("torch", purpose=_PURPOSE)
            torch.cuda.empty_cache()

    @property
    def dim(self) -> int:
        return 1

    @property
    def max_seq_length(self) -> int:
        model = self._model
        length = getattr(model, "max_length", None) if model is not None else None
        return int(length or 512)

    def embed(self, texts: list[Any], normalize: bool = True) -> Any:
        """Scores of ``texts`` — (query, document) pairs — as float32, shape (n,)."""
        model = self._model
        if model is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        np = self._np
        if not texts:
            return np.zeros((0,), dtype=np.float32)
        pairs = [[str(q), str(d)] for q, d in texts]
        scores = model.predict(pairs, batch_size=self.options.batch_size, show_progress_bar=False,
                               convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim > 1:  # a multi-label model: the last label is "relevant"
            scores = scores[:, -1]
        return scores

    def count_tokens(self, texts: list[Any]) -> int:
        return sum(self.count_tokens_each(texts))

    def count_tokens_each(self, texts: list[Any]) -> list[int]:
        if self._counter is None:
            return [len(str(q).split()) + len(str(d).split()) for q, d in texts]
        return [len(e.ids) for e in self._counter.encode_batch([(str(q), str(d)) for q, d in texts])]

    def memory_mb(self) -> dict[str, float]:
        if self._model is None:
            return {"vram_mb": 0.0, "ram_mb": 0.0}
        nbytes = sum(p.numel() * p.element_size() for p in self._model.model.parameters())
        mb = round(nbytes / 2**20, 1)
        return {"vram_mb": mb, "ram_mb": 0.0} if self._device.startswith("cuda") else {"vram_mb": 0.0, "ram_mb": mb}


class FakeRerankBackend(EmbedBackend):
    """The fake reranker (``TARS_BACKEND=fake``): the share of the query's words found in
    the document — deterministic, instant, and right on obvious cases."""

    name = "fake_rerank"
    kind = "rerank"  # type: ignore[assignment]

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    @property
    def dim(self) -> int:
        return 1

    def embed(self, texts: list[Any], normalize: bool = True) -> Any:
        import numpy as np

        out = np.zeros((len(texts),), dtype=np.float32)
        for i, (query, doc) in enumerate(texts):
            words = {w.strip(".,!?;:").lower() for w in str(query).split()}
            found = {w.strip(".,!?;:").lower() for w in str(doc).split()}
            out[i] = len(words & found) / max(1, len(words))
        return out

    def count_tokens_each(self, texts: list[Any]) -> list[int]:
        return [len(str(q).split()) + len(str(d).split()) for q, d in texts]
