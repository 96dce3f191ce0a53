"""Admission in front of an engine that runs ``slots`` generations at once itself.

``SlotQueue`` — llama-server ``-np`` batches its slots continuously; the node keeps what is
ours: up to ``slots`` requests hold a slot, the rest wait in a bounded FIFO (no thread). A
request that finds the FIFO full, or that would wait longer than ``max_wait_s`` by the
recent time a slot is held, is refused at once (``Overloaded``: 429 with ``retry_after``)
instead of answered after its client gave up. ``EngineTarget`` admits through one with
``TARS_PARALLEL`` (or the planned) slots; the in-process engine's ``GenerationQueue``
(``engine/inprocess.py``) through one with a single slot.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from ..errors import Overloaded, RequestTimeout

HELD_ALPHA = 0.3  # weight of the newest release in the moving average of the hold time


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
        self._held_s = 2.0  # moving average of how long a slot is held (a guess until measured)
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
        return max(self._held_s, all_held_for)

    def expected_wait(self) -> float:
        """Seconds a request arriving now can expect to wait for a slot (0.0 with no estimate)."""
        if self.busy < self.slots and not self._waiters:
            return 0.0
        return (self.held_estimate() or 0.0) * (len(self._waiters) + 1) / self.slots

    def retry_after(self) -> float:
        held = self.held_estimate() or self._held_s
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
            self._held_s += HELD_ALPHA * (held_s - self._held_s)
        else:
            self._held_s = held_s  # the first measurement replaces the guess
        self._held_seen += 1
