"""The in-process chat engine: one generation at a time, in a worker thread.

``GenerationQueue`` — a model in this process (llama-cpp-python, the fake backend) is not
thread-safe, and a newer request must never interrupt a running stream, so each chat
model runs one generation at a time in its own worker thread, behind a one-slot
``SlotQueue`` (``engine/slots.py``: the same bounds and 429s as llama-server's slots).
Tokens cross from the worker thread to the event loop through ``_Channel``: the thread
appends to a deque and wakes the loop only when no wake-up is pending, so a consumer
that lags gets several tokens per wake-up instead of one loop callback per token.
``LocalTarget`` (targets/local.py) puts a chat backend behind one.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import RequestTimeout
from .slots import SlotQueue

_END = object()


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

    # Read-only views of the slot (the Queue protocol); tests/cluster_support.Host's properties
    # have the same shape (boilerplate), nothing in common.
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
        held = [True]

        def free(_: Any = None) -> None:  # once: at the end marker, or when the worker thread returns
            if held[0]:
                held[0] = False
                self._running = False
                self._slot.release(ticket)

        # A stream that ends early (a client gone, a timeout, an error) frees the slot only when
        # the worker has really finished; one that reached its end marker frees it at once: its
        # backend stream is done, and the next request must not find the slot still taken while
        # this thread returns (the executor's one thread runs the jobs in turn anyway).
        job.add_done_callback(free)

        def _expire() -> None:
            cancel.set()
            chan.put(RequestTimeout(f"generation on model '{self.name}' exceeded the request timeout "
                                    f"of {self.timeout_s:g} s", timeout_s=self.timeout_s))

        timer = loop.call_at(deadline, _expire)
        try:
            while True:
                for item in await chan.get_all():
                    if item is _END:
                        free()
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
