"""Embedding coalescing: concurrent requests bound for one peer share one channel call.

A channel call costs about as much CPU as a small encode, so one call per client
request would halve embedding throughput on a small machine. ``RemoteTarget``
hands each embedding request to a ``Coalescer``, which sends a lone request at
once and merges the ones that arrive while a call is in flight into the next
``embed.encode`` call (one ``group`` per request), pipelined so the peer's encoder
always has the next batch; the answer is split back per request. docs/RPC.md
describes the same on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import PeerError, PeerUnavailable, TarsError
from ..logs import get_logger
from ..tasks import TaskSet

log = get_logger(__name__)


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[Any]


@dataclass
class _Lane:
    """Requests with the same ``normalize`` flag (they can share one call)."""

    waiting: list[_Job] = field(default_factory=list)
    waiting_n: int = 0  # sentences waiting
    sizes: list[int] = field(default_factory=list)  # sentences of each call in flight

    @property
    def inflight(self) -> int:
        return len(self.sizes)


class Coalescer:
    """Merge concurrent embed requests bound for one peer into one channel call.

    ``send(texts, normalize, groups)`` performs the call and returns the client's
    embed() answer (numpy ``vectors`` + ``group_tokens``); ``max_items`` caps the
    sentences in one call.

    When to send: at once when nothing is in flight (a lone request waits for
    nothing). While a call is in flight, requests wait — and a second call goes
    out as soon as a full batch's worth (as many sentences as the call in flight)
    is waiting, so it reaches the peer while the first is still being encoded and
    the peer's encoder never idles for a network round trip between batches.
    At most ``max_inflight`` calls run at once; a returning call sends whatever
    waits when nothing else is in flight.
    """

    def __init__(self, send: Callable[[list[str], bool, list[int]], Awaitable[dict[str, Any]]], *,
                 max_items: int = 256, max_inflight: int = 2) -> None:
        self._send = send
        self.max_items = max_items
        self.max_inflight = max(1, max_inflight)
        self._lanes: dict[bool, _Lane] = {}
        self._tasks = TaskSet("coalescer")
        self.calls = 0

    def _ready(self, lane: _Lane) -> bool:
        if not lane.waiting:
            return False
        if not lane.sizes:
            return True
        return lane.inflight < self.max_inflight and lane.waiting_n >= min(min(lane.sizes), self.max_items)

    async def submit(self, texts: list[str], normalize: bool) -> tuple[Any, int, str]:
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future())
        lane = self._lanes.setdefault(normalize, _Lane())
        lane.waiting.append(job)
        lane.waiting_n += len(texts)
        if self._ready(lane):
            self._launch(normalize, lane)
        return await job.future

    def _launch(self, normalize: bool, lane: _Lane) -> None:
        batch: list[_Job] = []
        n = 0
        while lane.waiting and (not batch or n + len(lane.waiting[0].texts) <= self.max_items):
            job = lane.waiting.pop(0)
            lane.waiting_n -= len(job.texts)
            if job.future.done():  # its caller went away while it waited
                continue
            batch.append(job)
            n += len(job.texts)
        if not batch:
            return
        lane.sizes.append(n)
        self._tasks.spawn(self._run(normalize, lane, batch, n))

    async def _run(self, normalize: bool, lane: _Lane, batch: list[_Job], n: int) -> None:
        released = False

        def release() -> None:
            # Send the next batch *before* handing this one's rows back, so the peer
            # starts on it while this node writes the answers (the two overlap).
            nonlocal released
            if not released:
                released = True
                lane.sizes.remove(n)
                if self._ready(lane):
                    self._launch(normalize, lane)

        try:
            await self._deliver(normalize, batch, release)
        finally:
            release()

    async def _deliver(self, normalize: bool, batch: list[_Job], on_answer: Callable[[], None] | None = None) -> None:
        texts = [t for job in batch for t in job.texts]
        groups = [len(job.texts) for job in batch]
        self.calls += 1
        try:
            res = await self._send(texts, normalize, groups)
        except TarsError as exc:
            if len(batch) > 1 and not isinstance(exc, (PeerUnavailable, PeerError)):
                # One request may be at fault (e.g. an empty input): let each get its own answer.
                await asyncio.gather(*(self._deliver(normalize, [job]) for job in batch))
                return
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        except BaseException as exc:
            err = exc if isinstance(exc, asyncio.CancelledError) else PeerError(
                f"embedding call failed: {type(exc).__name__}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.exception("coalesced embed call failed")
            return
        if on_answer is not None:
            on_answer()
        vectors, tokens, node = res["vectors"], res.get("group_tokens") or [0] * len(batch), res.get("node", "")
        start = 0
        for job, count in zip(batch, tokens):
            end = start + len(job.texts)
            if not job.future.done():
                job.future.set_result((vectors[start:end], count, node))
            start = end

    @property
    def busy(self) -> bool:
        return bool(self._tasks) or any(lane.waiting for lane in self._lanes.values())

    async def close(self) -> None:
        self._tasks.cancel()
        for lane in self._lanes.values():
            for job in lane.waiting:
                if not job.future.done():
                    job.future.cancel()
            lane.waiting.clear()
            lane.waiting_n = 0
