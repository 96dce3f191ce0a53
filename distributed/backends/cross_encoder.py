"""Rerankers: a sentence-transformers ``CrossEncoder`` scoring (query, document) pairs.

A cross-encoder reads the query and one document together and outputs one relevance
score — slower than comparing embeddings but much better at ordering a short list,
which is what a reranker is for. The backend plugs into the node like an embedding
model: ``LocalTarget`` puts it behind the same ``MicroBatcher``, whose items here are
``Pair``s instead of strings, so concurrent rerank requests share one ``predict`` call.
``embed(pairs)`` therefore returns a float32 vector of scores (one per pair), not
embeddings; ``dim`` is 1. A one-label model's score goes through a sigmoid (the
library's default for one label), so scores lie in 0..1 like Cohere's relevance_score.

Local folders load offline (``local_files_only``), as the sentence backend does, and on the
runtime ``TARS_EMBED_RUNTIME`` settles (``st_base.py``: the same choice as embeddings).
"""

from __future__ import annotations

from typing import Any

from .base import EmbedBackend
from .runtime import PROBE_SENTENCES
from .st_base import STBackend


class Pair(tuple):
    """(query, document). Its length is the text length, so the micro-batcher's sort by
    length (to cut padding) orders pairs by how long they are to encode."""

    __slots__ = ()

    def __new__(cls, query: str, document: str) -> "Pair":
        return super().__new__(cls, (query, document))

    def __len__(self) -> int:
        return len(self[0]) + len(self[1])


class CrossEncoderBackend(STBackend):
    """``kind = "rerank"`` models. ``embed(pairs)`` → scores, shape (len(pairs),)."""

    name = "cross_encoder"
    kind = "rerank"  # type: ignore[assignment]

    def open_model(self, st: Any, source: str, device: str, local: bool) -> Any:
        max_length = min(self.spec.context, 512) if self.spec.context else None
        return st.CrossEncoder(source, device=device, max_length=max_length, local_files_only=local)

    def infer(self, model: Any, items: list[Any], normalize: bool) -> Any:
        """Scores of ``items`` — (query, document) pairs — as float32, shape (n,)."""
        np = self._np
        pairs = [[str(q), str(d)] for q, d in items]
        scores = model.predict(pairs, batch_size=self.options.batch_size, show_progress_bar=False,
                               convert_to_numpy=True)
        scores = np.asarray(scores, dtype=np.float32)
        if scores.ndim > 1:  # a multi-label model: the last label is "relevant"
            scores = scores[:, -1]
        return scores

    def probe_items(self) -> list[Any]:
        n = len(PROBE_SENTENCES)
        return [Pair(PROBE_SENTENCES[i], PROBE_SENTENCES[(i * 5 + 3) % n]) for i in range(n)]

    def empty(self) -> Any:
        return self._np.zeros((0,), dtype=self._np.float32)

    def warmup(self) -> None:
        self.embed([Pair("warm up", "a document")], normalize=False)

    @property
    def dim(self) -> int:
        return 1

    @property
    def max_seq_length(self) -> int:
        model = self._model
        length = getattr(model, "max_length", None) if model is not None else None
        return int(length or 512)

    def count_tokens(self, texts: list[Any]) -> int:
        return sum(self.count_tokens_each(texts))

    def count_tokens_each(self, texts: list[Any]) -> list[int]:
        if self._counter is None:
            return [len(str(q).split()) + len(str(d).split()) for q, d in texts]
        return [len(e.ids) for e in self._counter.encode_batch([(str(q), str(d)) for q, d in texts])]


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
