"""``LocalTarget``: a model computed in this process — a backend behind its
``GenerationQueue`` (chat: the in-process engine, engine/inprocess.py) or ``MicroBatcher``
(embeddings, rerank: batching.py).

It loads its backend in a background thread (the node answers ``/health`` 503
"loading" meanwhile), keeps the error text when loading fails (the node stays up and
reports it), and does the context checks before a request queues, so a prompt that
can never fit is refused at once instead of after a wait. Its lifecycle, counters and
the common ``info()`` live in its ``served`` (targets/served.py), as an EngineTarget's do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ..backends.base import Backend, ChatBackend, EmbedBackend
from ..batching import MicroBatcher
from ..domain import Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, ModelSpec, Timings, TokenChunk, Usage
from ..engine.inprocess import GenerationQueue
from ..errors import InputTooLong, ModelFailed, TarsError, ValidationFailed
from ..logs import fields, get_logger
from ..metrics import Metrics
from .base import Target, TargetState
from .served import Served, clamp_notes, served_attr

log = get_logger(__name__)


class LocalTarget(Target):
    """A backend on this host. ``factory`` builds the (unloaded) backend; it runs in the
    loading thread, so resolving model files (which may assemble a GGUF) happens there too."""

    def __init__(self, spec: ModelSpec, assignment: Assignment, factory: Callable[[], Backend], *,
                 node: str, queue_size: int = 16, timeout_s: float = 300.0, queue_max_wait_s: float = 0.0,
                 embed_max_batch: int = 64,
                 embed_max_wait_ms: float = 2.0, metrics: Metrics | None = None,
                 backend_name: str | None = None) -> None:
        self.served = Served(spec, assignment, node=node, metrics=metrics, backend_name=backend_name)
        self.model, self.kind, self.node, self.spec, self.assignment = spec.id, spec.kind, node, spec, assignment
        self.metrics = metrics
        self.backend: Backend | None = None
        self._factory = factory
        self.queue: GenerationQueue | None = None
        self.batcher: MicroBatcher | None = None
        if self.kind == "chat":
            self.queue = GenerationQueue(self._run_stream, max_waiting=queue_size, timeout_s=timeout_s, name=self.model,
                                         max_wait_s=queue_max_wait_s)
        else:
            self.batcher = MicroBatcher(self._encode, max_batch=embed_max_batch, max_wait_ms=embed_max_wait_ms,
                                        max_queue=max(queue_size * embed_max_batch, embed_max_batch),
                                        timeout_s=timeout_s, name=self.model)

    # ----------------------------------------------------------------- lifecycle
    state = served_attr("state")
    error = served_attr("error")
    requests = served_attr("requests")
    progress = served_attr("progress")  # set by the loading thread while it pulls (deploy/pull.py)
    load_s = served_attr("load_s")

    def start(self) -> None:
        """Load in a background thread; returns at once."""
        threading.Thread(target=self._load, name=f"load-{self.model}", daemon=True).start()

    def _load(self) -> None:
        t0 = time.monotonic()
        try:
            backend = self._factory()
            backend.load()
            backend.warmup()
            if self.served.closed:
                backend.unload()
                return
            self.backend = backend
            self.served.ready(time.monotonic() - t0)
            log.info("model %s ready in %.1f s", self.model, self.served.load_s,
                     extra=fields(model=self.model, backend=backend.name))
        except Exception as exc:  # noqa: BLE001 - the node stays up and reports the failure
            why = self.served.failed(exc)
            log.error("model %s failed to load: %s", self.model, why, exc_info=not isinstance(exc, TarsError),
                      extra=fields(model=self.model))
        finally:
            self.served.loaded.set()

    async def wait_loaded(self, timeout: float | None = None) -> TargetState:
        """Wait until loading has finished (ready or failed), at most ``timeout`` seconds;
        returns the state."""
        return await self.served.wait_loaded(timeout)

    async def close(self) -> None:
        self.served.close()
        if self.queue is not None:
            self.queue.close()
        if self.batcher is not None:
            self.batcher.close()
        backend, self.backend = self.backend, None
        if backend is not None:
            held_mb = await asyncio.to_thread(_unload, backend)
            del backend  # the last reference: give_back() can then free it
            if held_mb > 0:  # (a fake backend holds nothing: no collection pause for it)
                await asyncio.to_thread(_give_back, self.model, self.node, held_mb)

    def _check_ready(self) -> Backend:
        backend = self.backend
        if self.served.state == TargetState.READY and backend is not None:
            return backend
        self.served.check_ready()  # raises unless ready
        raise ModelFailed(f"model '{self.model}' is not available on {self.node} ({self.served.state})",
                          model=self.model, node=self.node)

    # ----------------------------------------------------------------- chat
    def _run_stream(self, req: GenerateRequest, cancel: threading.Event) -> Any:
        backend = self.backend
        if backend is None:
            raise ModelFailed(f"model '{self.model}' was unloaded", model=self.model)
        return backend.stream(req, cancel)  # type: ignore[attr-defined]

    def prepare(self, req: GenerateRequest) -> tuple[GenerateRequest, int, list[str]]:
        """Context checks: refuse a prompt that cannot fit, clamp max_tokens that cannot."""
        backend = self._check_ready()
        if self.kind != "chat" or not isinstance(backend, ChatBackend):
            raise ValidationFailed(f"model '{self.model}' is an embedding model; it cannot generate text",
                                   field="model")
        if not req.messages and not (req.prompt or "").strip():
            raise ValidationFailed("the prompt is empty; send a non-empty 'prompt' or 'messages'", field="prompt")
        backend.check_request(req)  # a parameter this engine cannot honour → 400 naming it
        n = backend.prompt_tokens(req)
        ctx = backend.context_length
        if n >= ctx:
            raise InputTooLong(f"the prompt is {n} tokens but model '{self.model}' has a context of {ctx} tokens; "
                               f"shorten it to fewer than {ctx} tokens", limit=ctx, got=n,
                               field="messages" if req.messages else "prompt")
        notes = clamp_notes(req.max_tokens, n, ctx)
        if notes:
            req = dataclasses.replace(req, max_tokens=ctx - n)
        return req, n, notes

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        t0 = time.perf_counter()
        req, prompt_tokens, notes = self.prepare(req)
        assert self.queue is not None
        self.served.requests += 1
        n = 0
        first: float | None = None
        finish = "stop"
        tool_calls = None
        try:
            async for chunk in self.queue.stream(req):
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if chunk.tool_calls:  # the hidden text of the call(s) counts as generated tokens
                    tool_calls = chunk.tool_calls
                    n += chunk.tokens or 0
                    yield chunk
                elif chunk.text:
                    if first is None:
                        first = time.perf_counter()
                    n += chunk.tokens or 1  # a piece held back for a stop string may span tokens
                    yield chunk
        finally:
            end = time.perf_counter()
            ttft = (first - t0) if first is not None else None
            if n > 1 and first is not None and end > first:
                tps = (n - 1) / (end - first)
            else:
                tps = n / (end - t0) if end > t0 else 0.0
            self.served.generated(n, ttft, tps)
        yield Completion(model=self.model, node=self.node, text="", finish_reason=finish,
                         usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=n),
                         timings=Timings(ttft_ms=round((ttft or 0.0) * 1000, 3), total_ms=round((end - t0) * 1000, 3),
                                         tokens_per_s=round(tps, 3)),
                         notes=notes, tool_calls=tool_calls)

    # ----------------------------------------------------------------- embeddings
    def _encode(self, texts: list[str], normalize: bool) -> tuple[Any, list[int] | None]:
        backend = self.backend
        if backend is None:
            raise ModelFailed(f"model '{self.model}' was unloaded", model=self.model)
        assert isinstance(backend, EmbedBackend)
        vecs = backend.embed(texts, normalize)
        counter = getattr(backend, "count_tokens_each", None)
        counts = counter(texts) if counter is not None else [backend.count_tokens([t]) for t in texts]
        return vecs, counts

    async def embed(self, req: EmbedRequest) -> Embeddings:
        t0 = time.perf_counter()
        backend = self._check_ready()
        if self.kind != "embed":
            raise ValidationFailed(f"model '{self.model}' is a chat model; it cannot embed", field="model")
        if not req.input:
            raise ValidationFailed("'input' is empty; send a string or a list of strings", field="input")
        for i, text in enumerate(req.input):
            if not isinstance(text, str) or not text:
                raise ValidationFailed(f"input[{i}] is empty; every input must be a non-empty string",
                                       field=f"input[{i}]")
        assert self.batcher is not None
        del backend
        self.served.requests += 1
        vecs, counts = await self.batcher.embed(req.input, req.normalize)
        n = len(req.input)
        self.served.embedded(n)
        total = (time.perf_counter() - t0) * 1000
        return Embeddings(model=self.model, node=self.node, vectors=vecs, prompt_tokens=sum(counts or ()),
                          timings=Timings(total_ms=round(total, 3)))

    # ----------------------------------------------------------------- reporting
    @property
    def queue_depth(self) -> int:
        if self.queue is not None:
            return self.queue.depth
        return self.batcher.depth if self.batcher is not None else 0

    def tokens_per_s(self) -> float:
        return self.served.token_rate.per_s()

    def embeddings_per_s(self) -> float:
        return self.served.embed_rate.per_s()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        b = self.backend
        if b is not None:
            if isinstance(b, ChatBackend):
                out["context"] = b.context_length
            elif isinstance(b, EmbedBackend):
                out["dim"] = b.dim
            if getattr(b, "notes", None):
                out["notes"] = list(b.notes)
            runtime = b.runtime_info()
            if runtime is not None:
                out["runtime"] = runtime  # embeddings/rerank: torch, onnx or openvino, and why
            try:
                out["memory"] = b.memory_mb()
            except Exception:  # noqa: BLE001 - best effort figure
                pass
        return self.served.info(self.queue_depth, **out)


def _unload(backend: Backend) -> float:
    """Unload ``backend``; returns the MB it said it held (RAM and VRAM) before."""
    try:
        held = float(sum(backend.memory_mb().values()))
    except Exception:  # noqa: BLE001 - a best-effort figure; unloading matters more
        held = 0.0
    backend.unload()
    return held


def _give_back(model: str, node: str, held_mb: float) -> None:
    """After ``model`` was unloaded: hand the memory it held back to the OS, and say how much."""
    from ..memory import give_back

    freed = give_back()
    log.info("unloaded model %s on %s (it held %.0f MB); this process shrank by %.0f MB", model, node, held_mb,
             freed, extra=fields(model=model, held_mb=round(held_mb, 1), freed_mb=round(freed, 1)))
