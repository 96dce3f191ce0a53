"""Fire-and-forget tasks, kept referenced until they finish (one helper for the package).

``asyncio`` keeps only a weak reference to a task, so a task nobody holds can be garbage
collected mid-way. ``TaskSet`` holds its tasks until they are done and can cancel them
all (a node or cluster stopping); ``background`` is the module-wide set for callers that
own no set of their own. A task that fails is logged, never silently dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from .logs import get_logger

log = get_logger(__name__)


class TaskSet:
    """Tasks started by one owner; ``cancel()`` ends those still running."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("background task %s failed: %s", task.get_name(), exc, exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every running task; returns them (gather them to wait for the unwinding)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    async def wait(self) -> None:
        """Wait for the tasks running now (and those they start meanwhile) to finish."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


_BACKGROUND = TaskSet("background")


def background(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Fire and forget on the module-wide set."""
    return _BACKGROUND.spawn(coro)
