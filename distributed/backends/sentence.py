"""Sentence embeddings through sentence-transformers.

One ``SentenceTransformer`` per backend, on the device from the plan ("cuda:N" or "cpu") and
the runtime ``TARS_EMBED_RUNTIME`` settles (``st_base.py``, ``runtime.py``): torch — in fp16
on CUDA where that is faster (the profiler's ``dtype`` knob keeps older cards in fp32) —,
ONNX Runtime or OpenVINO. Cosine ranking is unchanged at the precision embeddings are compared
at. ``embed`` is one ``encode`` call: the node's micro-batcher has already merged concurrent
requests into ``texts``.

Local folders load with ``local_files_only`` (and ``HF_HUB_OFFLINE=1`` when nobody set it)
so that loading an on-disk model never reaches a hub.
"""

from __future__ import annotations

from typing import Any

from .runtime import PROBE_SENTENCES
from .st_base import STBackend


class SentenceBackend(STBackend):
    name = "sentence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dim = 0

    def open_model(self, st: Any, source: str, device: str, local: bool) -> Any:
        model = st.SentenceTransformer(source, device=device, local_files_only=local)
        # renamed in sentence-transformers 6; older releases only have the long name
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self._dim = int(dim_of() or 0)
        return model

    def infer(self, model: Any, items: list[Any], normalize: bool) -> Any:
        vectors = model.encode(items, batch_size=self.options.batch_size, convert_to_numpy=True,
                               normalize_embeddings=normalize, show_progress_bar=False)
        return self._np.asarray(vectors, dtype=self._np.float32)

    def probe_items(self) -> list[Any]:
        return list(PROBE_SENTENCES)

    def warmup(self) -> None:
        self.embed(["warm up"], normalize=True)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_seq_length(self) -> int:
        if self._model is None:
            return 512
        return int(self._model.max_seq_length or 512)

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model sees (special tokens included, truncation applied)."""
        return sum(self.count_tokens_each(texts))

    def count_tokens_each(self, texts: list[str]) -> list[int]:
        """Per-text token counts in one tokenizer call (the micro-batcher splits usage
        back to the requests it merged)."""
        if self._counter is None:
            return [super(SentenceBackend, self).count_tokens([t]) for t in texts]
        return [len(e.ids) for e in self._counter.encode_batch(texts)]
