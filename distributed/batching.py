"""Concurrency in front of a backend: the generation queue and the embedding micro-batcher.

``GenerationQueue`` — a llama model is not thread-safe, and a newer request must
never interrupt a running stream, so each chat model runs one generation at a
time in its own worker thread, behind a one-slot ``SlotQueue`` (below). Tokens cross from the
worker thread to the event loop through ``_Channel``: the thread appends to a
deque and wakes the loop only when no wake-up is pending, so a consumer that lags
gets several tokens per wake-up instead of one loop callback per token.

``MicroBatcher`` — embedding throughput comes from batching: concurrent requests
are merged into one ``encode`` call (up to ``max_batch`` sentences), sorted by
length to cut padding, run one batch at a time in a worker thread, and the rows
are handed back to each caller. An idle worker starts at once (no added latency
for a lone request); while it is busy, requests coalesce for the next batch,
which waits at most ``max_wait_ms`` (counted from its oldest request) to fill —
as does a batch that starts right after another one ended (a burst: the clients
just answered are about to send again).

``SlotQueue`` — admission in front of an engine that runs ``slots`` generations at
once itself (llama-server ``-np``): up to ``slots`` requests hold a slot, the rest wait
in a bounded FIFO, no thread. A request that finds the FIFO full, or that would wait
longer than ``max_wait_s`` by the recent time a slot is held, is refused at once
(``Overloaded``: 429 with ``retry_after``) instead of answered after its client gave up.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import Overloaded, RequestTimeout

_END = object()
BURST_WINDOW_S = 0.05  # a batch that ended this recently means more requests are on their way


class _Channel:
    """Thread → event loop hand-off with at most one pending wake-up."""

    __slots__ = ("_loop", "_items", "_lock", "_waiter", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._scheduled = False

    def put(self, item: Any) -> None:
        """Any thread. Wakes the loop unless a wake-up is already on its way."""
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def _wake(self) -> None:
        with self._lock:
            self._scheduled = False
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get_all(self) -> list[Any]:
        """Loop thread. Everything queued so far (at least one item)."""
        while True:
            with self._lock:
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
                self._waiter = self._loop.create_future()
            await self._waiter


class _Ewma:
    def __init__(self, initial: float, alpha: float = 0.3) -> None:
        self.value = initial
        self.alpha = alpha

    def add(self, x: float) -> None:
        self.value += self.alpha * (x - self.value)


class GenerationQueue:
    """One generation at a time for one model, behind a bounded FIFO.

    ``run(req, cancel)`` is the backend's synchronous ``stream``; it is called in the
    queue's single worker thread. Admission is a one-slot ``SlotQueue``: ``max_waiting``
    counts requests waiting *behind* the running one, ``max_wait_s`` bounds the wait it
    expects (see ``SlotQueue``).
    """

    def __init__(self, run: Callable[[Any, threading.Event], Iterator[Any]], *, max_waiting: int,
                 timeout_s: float, name: str = "model", max_wait_s: float = 0.0) -> None:
        self._run = run
        self.timeout_s = timeout_s
        self.name = name
        self._slot = SlotQueue(1, max_waiting=max_waiting, timeout_s=timeout_s, name=name, max_wait_s=max_wait_s)
        self._running = False  # for reporting: the slot itself frees when the worker thread returns
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gen-{name}")

    @property
    def max_waiting(self) -> int:
        return self._slot.max_waiting

    @property
    def waiting(self) -> int:
        return self._slot.waiting

    @property
    def depth(self) -> int:
        """Requests waiting plus the one running."""
        return self._slot.waiting + (1 if self._running else 0)

    def retry_after(self) -> float:
        return self._slot.retry_after()

    async def stream(self, req: Any) -> AsyncIterator[Any]:
        """Yield the backend's chunks in order. Leaving early (break, disconnect,
        cancellation) sets the cancel event, so the worker stops generating."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        ticket = await self._slot.acquire(bounded=not getattr(req, "choice", 0))
        cancel = threading.Event()
        chan = _Channel(loop)
        try:
            job = loop.run_in_executor(self._executor, self._work, req, cancel, chan)
        except BaseException:
            self._slot.release(ticket, learn=False)
            raise
        self._running = True

        def _done(_: Any) -> None:  # the slot frees only when the worker has really finished
            self._running = False
            self._slot.release(ticket)

        job.add_done_callback(_done)

        def _expire() -> None:
            cancel.set()
            chan.put(RequestTimeout(f"generation on model '{self.name}' exceeded the request timeout "
                                    f"of {self.timeout_s:g} s", timeout_s=self.timeout_s))

        timer = loop.call_at(deadline, _expire)
        try:
            while True:
                for item in await chan.get_all():
                    if item is _END:
                        self._running = False
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            timer.cancel()
            cancel.set()

    def _work(self, req: Any, cancel: threading.Event, chan: _Channel) -> None:
        """Worker thread: run the backend stream, push every chunk, then the end marker."""
        try:
            for chunk in self._run(req, cancel):
                chan.put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            chan.put(exc)
        finally:
            chan.put(_END)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class SlotQueue:
    """Up to ``slots`` requests at once; up to ``max_waiting`` more wait in FIFO order.

    ``async with queue.slot():`` holds a slot for the block (or ``ticket = await acquire()``
    … ``release(ticket)``). A request is refused at once with ``Overloaded`` (429,
    ``retry_after``) when the queue is full, or when the wait it can expect — how long a slot
    is held, times the requests ahead of it, over the slots — is over ``max_wait_s`` (0: no
    such bound). Better a prompt "retry in N s" than an answer that comes after the client
    gave up. How long a slot is held: the moving average of the slots released, raised to
    the time every slot has been held without one coming free (a slowdown shows before
    anything finishes). Before the first release nothing is known: then at most a quarter of
    the queue (at least one round, ``slots``) may wait — a burst at start-up on a starved host
    otherwise waits minutes. ``bounded=False`` skips these bounds (not the queue size): the
    later choices of an ``n > 1`` request, admitted with its first. A request admitted but
    still waiting after ``timeout_s`` → ``RequestTimeout``. ``on_change`` (busy, waiting) is
    called whenever either changes (metrics gauges).
    """

    def __init__(self, slots: int, *, max_waiting: int, timeout_s: float, name: str = "model",
                 max_wait_s: float = 0.0, on_change: Callable[[int, int], None] | None = None) -> None:
        self.slots = max(1, int(slots))
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.max_wait_s = max_wait_s
        self.name = name
        self.on_change = on_change
        self.busy = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._held = _Ewma(2.0)
        self._held_seen = 0  # releases that reported how long the slot was held
        self._holding: list[float] = []  # tickets (monotonic time a slot was taken) not yet released

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def depth(self) -> int:
        """Requests waiting plus those holding a slot."""
        return self.busy + len(self._waiters)

    def held_estimate(self) -> float | None:
        """Seconds a slot is held (see the class docstring); None while nothing is known."""
        all_held_for = 0.0
        if self._holding and len(self._holding) >= self.slots:
            all_held_for = time.monotonic() - max(self._holding)
        if not self._held_seen:
            return all_held_for or None
        return max(self._held.value, all_held_for)

    def expected_wait(self) -> float:
        """Seconds a request arriving now can expect to wait for a slot (0.0 with no estimate)."""
        if self.busy < self.slots and not self._waiters:
            return 0.0
        return (self.held_estimate() or 0.0) * (len(self._waiters) + 1) / self.slots

    def retry_after(self) -> float:
        held = self.held_estimate() or self._held.value
        return float(min(120, max(1, math.ceil(held * (len(self._waiters) + 1) / self.slots))))

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.busy, len(self._waiters))

    @asynccontextmanager
    async def slot(self, bounded: bool = True) -> AsyncIterator[None]:
        ticket = await self.acquire(bounded)
        try:
            yield
        finally:
            self.release(ticket)

    def _admit_or_refuse(self, bounded: bool) -> None:
        """Raise ``Overloaded`` if a request arriving now must not join the queue."""
        busy = f"{self.busy} of {self.slots} slot{'s' if self.slots != 1 else ''} busy, {len(self._waiters)} waiting"
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(f"model '{self.name}' is busy ({busy}; queue size {self.max_waiting}); retry later",
                             retry_after=self.retry_after(), model=self.name, queue_size=self.max_waiting,
                             slots=self.slots)
        if self.max_wait_s <= 0 or not bounded:
            return
        cold_cap = max(self.slots, self.max_waiting // 4)
        if not self._held_seen and len(self._waiters) >= cold_cap:
            raise Overloaded(f"model '{self.name}' is busy ({busy}) and has not yet measured how long a request "
                             f"takes: until it has, at most {cold_cap} wait; retry later",
                             retry_after=self.retry_after(), model=self.name, slots=self.slots)
        wait = self.expected_wait()
        if wait > self.max_wait_s:
            raise Overloaded(f"model '{self.name}' is busy ({busy}): this request would wait about {wait:.0f} s "
                             f"for a slot, over the {self.max_wait_s:g} s bound (TARS_QUEUE_MAX_WAIT_S); retry later",
                             retry_after=self.retry_after(), model=self.name, expected_wait_s=round(wait, 1),
                             max_wait_s=self.max_wait_s, slots=self.slots)

    async def acquire(self, bounded: bool = True) -> float:
        """Take a slot, waiting in line if need be; returns the ticket for ``release``."""
        if self.busy < self.slots and not self._waiters:
            self.busy += 1
            self._changed()
            return self._took()
        self._admit_or_refuse(bounded)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot just as we gave up: pass it on
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                self._changed()
            if isinstance(exc, asyncio.TimeoutError):
                raise RequestTimeout(f"request waited {self.timeout_s:g} s for a slot of model '{self.name}' "
                                     "and timed out", timeout_s=self.timeout_s) from None
            raise
        return self._took()

    def _took(self) -> float:
        ticket = time.monotonic()
        self._holding.append(ticket)
        return ticket

    def release(self, ticket: float | None = None, *, learn: bool = True) -> None:
        """Free the slot taken with ``ticket`` (``learn``: count how long it was held): hand
        it straight to the oldest waiter (busy stays), else busy - 1."""
        if ticket is not None:
            try:
                self._holding.remove(ticket)
            except ValueError:
                pass
            if learn:
                self._learn(time.monotonic() - ticket)
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._changed()
                return
        self.busy = max(0, self.busy - 1)
        self._changed()

    def _learn(self, held_s: float) -> None:
        if self._held_seen:
            self._held.add(held_s)
        else:
            self._held.value = held_s  # the first measurement replaces the guess
        self._held_seen += 1


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
