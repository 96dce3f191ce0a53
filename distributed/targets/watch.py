"""``GoneWatch``: await the steps of a stream in the caller's own task, unless an event
(a peer declared dead) is set first.

Running each step in a task of its own and waiting on it and on the event together costs a
task, a waiter and ``asyncio.wait``'s callbacks per await, tens of microseconds — per token,
on a forwarded stream (issue 18.4). ``GoneWatch`` instead arms a callback on one waiter for
the whole stream (and for a one-shot call, ``RemoteTarget._watch``, the same way): while a step is being awaited, the
event being set cancels the awaiting task, and the step raises ``PeerGone`` whatever the
cancelled step raised (the task's cancellation is withdrawn: it was ours, not the caller's). Between steps (the stream's
consumer is sending the token) the callback does nothing; the next step sees the event.
A cancellation from elsewhere passes through unchanged.

API::

    gone = GoneWatch(peer.gone)
    try:
        msg = await gone.step(agen.__anext__())   # PeerGone when the event was set
    finally:
        gone.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class PeerGone(Exception):
    """The watched event was set before or while a step was awaited."""


class GoneWatch:
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event
        self._task: asyncio.Task[Any] | None = None  # the task awaiting a step, while armed
        self._fired = False
        self._waiter = asyncio.ensure_future(event.wait())
        self._waiter.add_done_callback(self._on_set)

    def _on_set(self, waiter: asyncio.Future[Any]) -> None:
        task = self._task
        if task is not None and not waiter.cancelled():
            self._fired = True
            task.cancel()

    async def step(self, aw: Awaitable[T]) -> T:
        if self.event.is_set():
            close = getattr(aw, "close", None)
            if close is not None:
                close()  # a coroutine never awaited: no "never awaited" warning
            raise PeerGone()
        self._task = asyncio.current_task()
        try:
            result = await aw
        except BaseException:  # once we cancelled, whatever the step raises is the cancellation's doing
            if not self._fired:
                raise
            self._withdraw()
            raise PeerGone() from None
        finally:
            self._task = None
        if self._fired:  # the step swallowed our cancellation and returned anyway
            self._withdraw()
            raise PeerGone()
        return result

    def _withdraw(self) -> None:
        self._fired = False
        uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python >= 3.11 counts cancellations
        if uncancel is not None:
            uncancel()

    def close(self) -> None:
        self._waiter.cancel()
