"""What every model computed on this host keeps, whatever computes it.

``LocalTarget`` (a backend in this process) and ``EngineTarget`` (a llama-server child,
engine/target.py) each hold one ``Served``: the lifecycle state and the flag that says
loading ended, the counters and rates ``/status`` and the metrics show, the common part of
``info()``, the refusal of a request while the model is not ready, and the note of a
``max_tokens`` clamped to the context. What differs — how the model loads, how a request
is admitted and run — stays with each target (composition, not a shared parent).

``served_attr(name)`` forwards one ``Target`` attribute (``state``, ``error``,
``requests``, ``progress`` …) to the ``served`` of the target that declares it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ..domain import Assignment, ModelSpec
from ..errors import ModelFailed, ModelLoading, TarsError
from ..metrics import Metrics
from .base import Rate, TargetState


class Served:
    """Lifecycle and counters of one model computed here (see the module doc)."""

    def __init__(self, spec: ModelSpec, assignment: Assignment, *, node: str, metrics: Metrics | None = None,
                 backend_name: str | None = None, sees_images: bool = False) -> None:
        self.spec = spec
        self.model = spec.id
        self.kind = spec.kind
        self.node = node
        self.assignment = assignment
        self.metrics = metrics
        self.backend_name = backend_name or assignment.backend or spec.backend
        # the engine loads a vision projector (llama-server --mmproj; the in-process engine loads none)
        self.sees_images = sees_images
        self.state = TargetState.LOADING
        self.error: str | None = None
        self.closed = False
        self.load_s: float | None = None
        # {"done_bytes","total_bytes","percent"} while the model is being pulled (deploy/pull.py)
        self.progress: dict[str, Any] | None = None
        self.loaded = LoadedFlag()  # set once loading ended (from any thread)
        self.requests = 0
        self.tokens_generated = 0
        self.embeddings = 0
        self.last_tokens_per_s = 0.0
        self.token_rate = Rate()
        self.embed_rate = Rate()

    # ----------------------------------------------------------------- lifecycle
    def ready(self, load_s: float | None = None) -> None:
        self.state, self.error = TargetState.READY, None
        if load_s is not None:
            self.load_s = load_s

    def failed(self, exc_or_why: BaseException | str) -> str:
        """State "failed" with the reason (a TarsError's message, else the exception's type
        and text); returns the reason."""
        why = exc_or_why if isinstance(exc_or_why, str) else describe(exc_or_why)
        self.state, self.error = TargetState.FAILED, why
        return why

    def close(self) -> None:
        """No more requests: "unavailable" (a failure stays "failed", with its reason)."""
        self.closed = True
        if self.state != TargetState.FAILED:
            self.state = TargetState.UNAVAILABLE

    async def wait_loaded(self, timeout: float | None = None) -> TargetState:
        """Wait until loading has finished (ready or failed), at most ``timeout`` seconds;
        returns the state."""
        await self.loaded.wait(timeout)
        return self.state

    def check_ready(self, *, loading: str = "still loading", failed: str = "failed to load") -> None:
        """Raise what a request gets while the model is not ready: 503 loading (retry in a
        few seconds), 503 failed with the reason, 503 not available."""
        if self.state == TargetState.READY:
            return
        m, node = self.model, self.node
        if self.state == TargetState.FAILED:
            raise ModelFailed(f"model '{m}' {failed} on {node}: {self.error}", model=m, node=node)
        if self.state == TargetState.LOADING:
            raise ModelLoading(f"model '{m}' is {loading} on {node}; retry in a few seconds", model=m, node=node,
                               retry_after=2)
        raise ModelFailed(f"model '{m}' is not available on {node} ({self.state})", model=m, node=node)

    # ----------------------------------------------------------------- accounting
    def generated(self, n: int, ttft: float | None, tokens_per_s: float) -> None:
        """One generation ended with ``n`` tokens (``ttft``: seconds to its first token)."""
        self.tokens_generated += n
        self.token_rate.add(n)
        if n:
            self.last_tokens_per_s = tokens_per_s
        if self.metrics is not None:
            self.metrics.observe_generation(self.model, n, ttft)

    def embedded(self, n: int) -> None:
        self.embeddings += n
        self.embed_rate.add(n)
        if self.metrics is not None:
            self.metrics.observe_embeddings(self.model, n)

    # ----------------------------------------------------------------- reporting
    def info(self, queue_depth: int, **extra: Any) -> dict[str, Any]:
        """The ``info()`` shape of a model computed here; ``extra`` keys are the target's own."""
        a = self.assignment
        out: dict[str, Any] = {
            "id": self.model, "kind": self.kind, "backend": self.backend_name,
            "quant": a.quant or self.spec.quant, "node": self.node, "state": self.state,
            "local": True, "device": a.device, "n_gpu_layers": a.n_gpu_layers,
            "queue_depth": queue_depth, "requests": self.requests,
            "tokens_generated": self.tokens_generated, "last_tokens_per_s": round(self.last_tokens_per_s, 3),
            "embeddings": self.embeddings, "load_s": None if self.load_s is None else round(self.load_s, 3),
            "vision": self.spec.vision and self.sees_images,  # a projector, loaded: it sees images (vision.py)
            **extra,
        }
        progress = self.progress
        if progress is not None and self.state == TargetState.LOADING:
            out["state"] = "pulling"  # still "loading" for routing and /health
            out["progress"] = dict(progress)
        if self.error:
            out["error"] = self.error
        return out


def served_attr(name: str) -> Any:
    """A property of a target that reads and writes ``target.served.<name>``."""
    return property(lambda self: getattr(self.served, name), lambda self, value: setattr(self.served, name, value),
                    doc=f"``served.{name}``")


def describe(exc: BaseException) -> str:
    """What a failure says to the user: a TarsError's message, else its type and text."""
    return exc.message if isinstance(exc, TarsError) else f"{type(exc).__name__}: {exc}"


def clamp_notes(max_tokens: int, prompt_tokens: int, context: int) -> list[str]:
    """The note an answer carries when the prompt plus ``max_tokens`` overrun the context
    (the engine then generates at most what is left)."""
    if prompt_tokens + max_tokens <= context:
        return []
    room = max(0, context - prompt_tokens)
    return [f"max_tokens clamped from {max_tokens} to {room}: the prompt ({prompt_tokens} tokens) plus max_tokens "
            f"must fit the context of {context} tokens"]


class LoadedFlag:
    """A ``threading.Event``-like flag whose ``set()`` (from any thread) also wakes the
    coroutines in ``wait()``, each on a future of its own loop: no polling."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that loop has closed: nobody waits any more
                pass

    async def wait(self, timeout: float | None = None) -> bool:
        """True once set; False when ``timeout`` seconds passed first."""
        if self._event.is_set():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return True
            self._waiters.append((loop, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
