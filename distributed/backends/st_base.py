"""What the two sentence-transformers backends share: loading on the planned device and the
chosen runtime, the private token counter, unloading, memory.

``SentenceBackend`` (embeddings) and ``CrossEncoderBackend`` (rerank) differ only in the
model class they open and the call that runs it (``encode`` / ``predict``). Both load the
torch model first — it is the reference every other runtime is compared to, the source of
the exports, and the runtime that always works — then ``runtime.choose`` settles what runs
(``TARS_EMBED_RUNTIME``, ``STCandidates`` below), and the torch weights are dropped when
another runtime won.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from abc import abstractmethod
from pathlib import Path
from typing import Any

from ..errors import ModelFailed
from ..logs import fields, get_logger
from ..optional import require
from . import exported
from .base import EmbedBackend
from .devices import apply_cuda_tuning, pick_device, wants_fp16
from .runtime import PROBE_SENTENCES, Choice, ChoiceCache, RuntimeUnavailable, choose

log = get_logger(__name__)

_PURPOSE = "embedding and rerank models (sentence-transformers)"
_VERSIONED = ("torch", "transformers", "sentence-transformers", "onnxruntime", "openvino")


class STBackend(EmbedBackend):
    """A sentence-transformers model behind the micro-batcher, on the runtime ``options.runtime``
    asks for ("auto": measured, see ``runtime.py``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._model: Any = None
        self._np: Any = None
        self._counter: Any = None  # a tokenizers.Tokenizer of our own, or None
        self._device = "cpu"
        self.runtime: Choice | None = None
        self._runtime_mb: float | None = None  # RAM of an exported model's weights

    # ------------------------------------------------------------------ per model class
    @abstractmethod
    def open_model(self, st: Any, source: str, device: str, local: bool) -> Any:
        """The library's model object (``SentenceTransformer`` / ``CrossEncoder``) on ``device``."""

    @abstractmethod
    def infer(self, model: Any, items: list[Any], normalize: bool) -> Any:
        """``model``'s output for ``items`` (non-empty) as a float32 numpy array (what ``embed``
        returns)."""

    @abstractmethod
    def probe_items(self) -> list[Any]:
        """The fixed inputs every runtime is compared and timed on."""

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        source, local = self.model_source()
        self._np = require("numpy", purpose=_PURPOSE)
        torch = require("torch", purpose=_PURPOSE)
        st = require("sentence_transformers", "sentence-transformers", _PURPOSE)
        self._device = pick_device(torch, self.assignment.device, self.spec.id, self.notes, log)
        apply_cuda_tuning(torch, self._device, self.options.extra)
        try:
            model = self.open_model(st, source, self._device, local)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFailed(f"model '{self.spec.id}' failed to load from {source}: {exc}", path=source) from exc
        model.eval()
        root = runtimes_root(self.options.runtime_dir, self.spec.id)
        cands = STCandidates(self, model, torch, exported.Exports(root, source))
        self.runtime = choose(self.options.runtime, cands, cache=ChoiceCache(root), key=self._cache_key(torch, cands),
                              model=self.spec.id, log=log)
        self._runtime_mb = cands.sizes.get(self.runtime.name)
        if self.options.runtime not in ("auto", self.runtime.name.split("-")[0]):
            self.notes.append(self.runtime.why)  # asked for a runtime it could not have
        del cands  # the losers (and the torch weights, when another runtime won) go with it
        self._model = model
        self._counter = self._make_counter(model)
        log.info("loaded %s %s on %s (%s)", self.kind, self.spec.id, self._device, self.runtime.why,
                 extra=fields(model=self.spec.id, device=self._device, runtime=self.runtime.name,
                              max_seq_length=self.max_seq_length))

    def _cache_key(self, torch: Any, cands: STCandidates) -> dict[str, Any]:
        """What a measured choice depends on: host, device, libraries, model files, candidates."""
        from ..profiler import cpu_model

        gpu = torch.cuda.get_device_name(self._device) if self._device.startswith("cuda") else None
        return {"model": self.spec.id, "files": exported.source_fingerprint(str(cands.exports.source)),
                "kind": self.kind, "device": self._device, "batch_size": self.options.batch_size,
                "host": {"cpu": cpu_model(), "cpus": len(os.sched_getaffinity(0)), "gpu": gpu},
                "versions": {p: exported.version(p) for p in _VERSIONED}, "candidates": cands.names()}

    def _make_counter(self, model: Any) -> Any:
        """A private copy of the model's fast tokenizer for counting tokens: counting happens
        on the event loop while ``embed`` may be tokenizing in a worker thread, and a Rust
        tokenizer shared between the two can fail with "Already borrowed"."""
        backend_tok = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
        if backend_tok is None:
            return None
        tokenizers = require("tokenizers", purpose=_PURPOSE)
        counter = tokenizers.Tokenizer.from_str(backend_tok.to_str())
        counter.no_padding()
        counter.enable_truncation(max_length=self.max_seq_length)
        return counter

    def unload(self) -> None:
        model, self._model = self._model, None
        self._counter = None
        if model is not None and self._device.startswith("cuda"):
            del model
            torch = require("torch", purpose=_PURPOSE)
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ serving
    def embed(self, texts: list[Any], normalize: bool = True) -> Any:
        model = self._model
        if model is None:
            raise ModelFailed(f"model '{self.spec.id}' is not loaded")
        return self.infer(model, texts, normalize) if texts else self.empty()

    def empty(self) -> Any:
        return self._np.zeros((0, self.dim), dtype=self._np.float32)

    @property
    def device(self) -> str:
        return self._device

    def runtime_info(self) -> dict[str, Any] | None:
        return self.runtime.info() if self.runtime is not None else None

    def memory_mb(self) -> dict[str, float]:
        if self._model is None:
            return {"vram_mb": 0.0, "ram_mb": 0.0}
        nbytes = sum(p.numel() * p.element_size() for p in self._model.parameters())
        mb = round(nbytes / 2**20, 1) + (self._runtime_mb or 0.0)
        return {"vram_mb": mb, "ram_mb": 0.0} if self._device.startswith("cuda") else {"vram_mb": 0.0, "ram_mb": mb}


def runtimes_root(runtime_dir: Path | None, model_id: str) -> Path:
    """Where one model's exports and measured choices live (``<models dir>/runtimes/<id>``; a
    temporary folder when no models folder was given, as in a library call)."""
    base = runtime_dir if runtime_dir is not None else Path(tempfile.gettempdir()) / "tars-runtimes"
    return base / re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


class STCandidates:
    """``runtime.Candidates`` for a loaded sentence-transformers model: its transformer's
    forward pass is swapped between torch (fp32, or fp16 on CUDA) and the exports."""

    def __init__(self, backend: STBackend, model: Any, torch: Any, exports: exported.Exports) -> None:
        self.backend = backend
        self.model = model
        self.torch = torch
        self.exports = exports
        self.device = backend.device
        self.items = backend.probe_items()
        self.module = model[0]
        self.loaded: dict[str, Any] = {"torch": self.module.model}
        self.sizes: dict[str, float] = {}
        # explicit TARS_EMBED_RUNTIME=torch keeps no fp32 reference: fp16 is made in place
        self.keep_reference = backend.options.runtime != "torch"

    def names(self) -> list[str]:
        return ["torch", "torch-fp16"] if self.device.startswith("cuda") else ["torch", "onnx", "openvino"]

    def default(self) -> str:
        cuda_fp16 = wants_fp16(self.device, self.backend.options.extra)
        return "torch-fp16" if cuda_fp16 else "torch"

    def prepare(self, name: str) -> None:
        if name in self.loaded:
            return
        torch_model = self.loaded["torch"]
        if name == "torch-fp16":
            self.loaded[name] = (copy.deepcopy(torch_model) if self.keep_reference else torch_model).half()
            return
        missing = exported.installed(name)
        if missing:
            raise RuntimeUnavailable(missing)
        names, output = self._io()
        example = {k: v for k, v in self._features().items() if k in names}
        folder = self.exports.export(name, torch_model, example, names, output)
        run = exported.load(name, folder)
        self.loaded[name] = exported.runtime_module(run, names, output, torch_model.config)
        self.sizes[name] = exported.size_mb(folder)

    def _features(self) -> dict[str, Any]:
        prep = getattr(self.model, "preprocess", None) or self.model.tokenize
        return prep([list(i) if isinstance(i, tuple) else i for i in self.items])  # pairs as the library takes them

    def _io(self) -> tuple[list[str], str]:
        """The export's inputs (the tokenizer's tensors) and its one output."""
        config = getattr(self.module, "modality_config", None) or {}
        text = config.get("text") or {}
        output = text.get("method_output_name")
        if set(config) != {"text"} or text.get("method") != "forward" or not isinstance(output, str):
            raise RuntimeUnavailable(f"only text models are exported (this one's transformer gives {config!r})")
        features = self._features()
        order = list(getattr(self.model.tokenizer, "model_input_names", ()) or features)
        names = [n for n in order if n in features and hasattr(features[n], "dim") and features[n].dim() == 2]
        if "input_ids" not in names:
            raise RuntimeUnavailable("the tokenizer gives no input_ids")
        return names, output

    def _use(self, name: str) -> None:
        self.module.model = self.loaded[name]

    def outputs(self, name: str) -> Any:
        self._use(name)
        return self.backend.infer(self.model, self.items, True)

    def run_workload(self, name: str) -> None:
        self._use(name)
        self.backend.infer(self.model, self.items * 2, True)
        for item in self.items[:4]:
            self.backend.infer(self.model, [item], True)

    def activate(self, name: str) -> None:
        self._use(name)
        self.loaded = {name: self.loaded[name]}
