"""The embedding micro-batcher: concurrent requests merged into one encode call.

``MicroBatcher`` — embedding throughput comes from batching: concurrent requests
are merged into one ``encode`` call (up to ``max_batch`` sentences), sorted by
length to cut padding, run one batch at a time in a worker thread, and the rows
are handed back to each caller. An idle worker starts at once (no added latency
for a lone request); while it is busy, requests coalesce for the next batch,
which waits at most ``max_wait_ms`` (counted from its oldest request) to fill —
as does a batch that starts right after another one ended (a burst: the clients
just answered are about to send again). ``LocalTarget`` puts every embedding and
rerank model behind one. (Chat admission lives with the engine: ``engine/slots.py``.)
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import Overloaded, RequestTimeout

BURST_WINDOW_S = 0.05  # a batch that ended this recently means more requests are on their way


class _Ewma:
    def __init__(self, initial: float, alpha: float = 0.3) -> None:
        self.value = initial
        self.alpha = alpha

    def add(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)


@dataclass
class _Item:
    texts: list[str]
    normalize: bool
    future: asyncio.Future[Any]
    t0: float
    tokens: list[int] | None = field(default=None)


class MicroBatcher:
    """Merge concurrent embedding requests into one encode call.

    ``encode(texts, normalize)`` returns ``(vectors, token_counts)``: a float32 array
    (len(texts), dim) and a token count per text (or None); it runs in the batcher's
    single worker thread. ``max_queue`` bounds the sentences waiting (→ ``Overloaded``).
    """

    def __init__(self, encode: Callable[[list[str], bool], tuple[Any, list[int] | None]], *,
                 max_batch: int, max_wait_ms: float, max_queue: int, timeout_s: float,
                 name: str = "model") -> None:
        self._encode = encode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.name = name
        self._pending: collections.deque[_Item] = collections.deque()
        self._pending_n = 0  # sentences waiting
        self._running_n = 0  # sentences in the batch being encoded
        self._task: asyncio.Task[None] | None = None
        self._full: asyncio.Future[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"embed-{name}")
        self._batch_s = _Ewma(0.05)
        self._last_end = -1e9  # loop time the last batch finished
        self.batches = 0

    @property
    def depth(self) -> int:
        """Sentences waiting plus those being encoded."""
        return self._pending_n + self._running_n

    async def embed(self, texts: list[str], normalize: bool = True) -> tuple[Any, list[int] | None]:
        """Vectors (and per-text token counts) for ``texts``, computed in some shared batch."""
        n = len(texts)
        if self._pending_n and self._pending_n + n > self.max_queue:
            raise Overloaded(f"embedding model '{self.name}' has {self._pending_n} sentences waiting "
                             f"(limit {self.max_queue}); retry later",
                             retry_after=float(max(1, math.ceil(self._batch_s.value * 2))), model=self.name)
        loop = asyncio.get_running_loop()
        item = _Item(texts, normalize, loop.create_future(), loop.time())
        self._pending.append(item)
        self._pending_n += n
        if self._full is not None and self._pending_n >= self.max_batch and not self._full.done():
            self._full.set_result(None)
        if self._task is None:
            self._task = loop.create_task(self._drain())
        timer = loop.call_later(self.timeout_s, self._expire, item)
        try:
            return await item.future
        finally:
            timer.cancel()
            if not item.future.done():  # caller cancelled: drop it if still waiting
                item.future.cancel()

    def _expire(self, item: _Item) -> None:
        if not item.future.done():
            item.future.set_exception(RequestTimeout(
                f"embedding on model '{self.name}' exceeded the request timeout of {self.timeout_s:g} s",
                timeout_s=self.timeout_s))

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._pending:
            item = self._pending[0]
            n = len(item.texts)
            if batch and size + n > self.max_batch:
                break
            self._pending.popleft()
            self._pending_n -= n
            if item.future.done():  # cancelled or timed out while waiting
                continue
            batch.append(item)
            size += n
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        # A lone request on an idle worker starts at once. During a burst (a batch ended
        # moments ago), the clients it answered are about to send their next requests, so
        # the batch waits up to max_wait for them instead of going out nearly empty.
        first = loop.time() - self._last_end > BURST_WINDOW_S
        try:
            while self._pending:
                if not first and self._pending_n < self.max_batch and self.max_wait > 0:
                    delay = self._pending[0].t0 + self.max_wait - loop.time()
                    if delay > 0:
                        self._full = loop.create_future()
                        try:
                            await asyncio.wait_for(self._full, delay)
                        except asyncio.TimeoutError:
                            pass
                        self._full = None
                first = False
                batch = self._take()
                if batch:
                    await self._run_batch(loop, batch)
                    self._last_end = loop.time()
        finally:
            self._task = None

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        texts: list[str] = []
        for it in batch:
            texts.extend(it.texts)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        sorted_texts = [texts[i] for i in order]
        flags = {it.normalize for it in batch}
        normalize = flags.pop() if len(flags) == 1 else False
        self._running_n = len(texts)
        t0 = time.monotonic()
        try:
            vecs, counts = await loop.run_in_executor(self._executor, self._encode, sorted_texts, normalize)
        except asyncio.CancelledError:
            for it in batch:
                if not it.future.done():
                    it.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        finally:
            self._running_n = 0
            self._batch_s.add(time.monotonic() - t0)
        self.batches += 1
        inverse = np.empty(len(order), dtype=np.intp)
        inverse[np.asarray(order, dtype=np.intp)] = np.arange(len(order), dtype=np.intp)
        vecs = np.asarray(vecs)[inverse]
        if counts is not None:
            counts = [counts[i] for i in inverse.tolist()]
        start = 0
        for it in batch:
            n = len(it.texts)
            rows = vecs[start:start + n]
            if not normalize and it.normalize:
                norms = np.linalg.norm(rows, axis=1, keepdims=True)
                rows = rows / np.maximum(norms, 1e-12)
            if not it.future.done():
                it.future.set_result((rows, counts[start:start + n] if counts is not None else None))
            start += n

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
