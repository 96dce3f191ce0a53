"""The ``Target`` interface: one model as the node sees it, local or remote.

See docs/ARCHITECTURE.md ("Target") for the contract. ``TargetState`` values are the
strings that go on the wire (``/health``, ``/models``, heartbeats): a ``StrEnum``, so
``state == "ready"`` and JSON output are unchanged.
"""

from __future__ import annotations

import collections
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from ..compat import StrEnum
from typing import Any, ClassVar

from ..domain import Completion, EmbedRequest, Embeddings, GenerateRequest, ModelKind, TokenChunk
from ..errors import TarsError


class TargetState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"


#: states in which a target will never serve again (replace it)
GONE = (TargetState.FAILED, TargetState.UNAVAILABLE)


class Rate:
    """Events per second over a sliding window (records per request, not per token).
    ``clock`` is injectable so tests move time instead of sleeping."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._events: collections.deque[tuple[float, float]] = collections.deque()

    def add(self, amount: float) -> None:
        now = self._clock()
        self._events.append((now, amount))
        self._trim(now)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._events and self._events[0][0] < cutoff:
            self._events.popleft()

    def per_s(self) -> float:
        self._trim(self._clock())
        return sum(a for _, a in self._events) / self.window_s


class Target(ABC):
    """One model, local or remote. See docs/ARCHITECTURE.md for the contract.

    ``local`` says whether this host computes it (LocalTarget, an engine target) or a
    peer does (RemoteTarget). Local targets share a lifecycle: ``start()`` loads in the
    background, ``await wait_loaded()`` returns the state once loading ended, ``close()``
    unloads; ``assignment`` says how the plan placed it, ``error`` why it failed.
    """

    local: ClassVar[bool] = True
    model: str
    kind: ModelKind
    node: str
    assignment: Any = None
    error: str | None = None
    requests: int = 0

    @property
    @abstractmethod
    def state(self) -> TargetState:
        """loading | ready | failed | unavailable."""

    def start(self) -> None:  # noqa: B027 - optional hook
        """Begin loading in the background (default: nothing to load)."""

    async def wait_loaded(self, timeout: float | None = None) -> TargetState:
        """Wait until loading has ended (ready or failed); returns the state."""
        return self.state

    @abstractmethod
    def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        """Yield a TokenChunk per piece, then exactly one Completion (text "", stats filled)."""

    async def generate(self, req: GenerateRequest) -> Completion:
        """The whole answer at once (default: drain ``stream``)."""
        pieces: list[str] = []
        logprobs: list[dict[str, Any]] = []
        tool_calls: list[dict[str, Any]] | None = None
        async for item in self.stream(req):
            if isinstance(item, Completion):
                item.text = "".join(pieces)
                if logprobs and item.logprobs is None:
                    item.logprobs = logprobs
                if tool_calls and item.tool_calls is None:
                    item.tool_calls = tool_calls
                return item
            pieces.append(item.text)
            if item.logprobs:
                logprobs.extend(item.logprobs)
            if item.tool_calls:
                tool_calls = item.tool_calls
        raise TarsError(f"model '{self.model}' ended its stream without a result")

    @abstractmethod
    async def embed(self, req: EmbedRequest) -> Embeddings: ...

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """{"id","kind","backend","quant","node","state","queue_depth","requests",
        "tokens_generated","last_tokens_per_s","error"?}"""

    @property
    def queue_depth(self) -> int:
        return 0

    def tokens_per_s(self) -> float:
        """Recent generation rate (tokens/s over a short window)."""
        return 0.0

    def embeddings_per_s(self) -> float:
        return 0.0

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the target holds (default: nothing)."""
