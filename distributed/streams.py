"""One stream-to-wire loop, and waiting for a client that may go away.

``drain(first, agen, fmt)`` turns a node stream (``TokenChunk``s, then exactly one
``Completion``) into wire bytes through a ``WireFormat``: native SSE and OpenAI SSE
(api/), NDJSON JSON-RPC (rpc/server.py). The end is the ``Completion`` (by type); a
stream that ends without one, or fails after it started, ends with the format's error
item (no traceback reaches a client; the log gets it). The node stream is always
closed, so its generation stops and its queue slot is freed.

A generation must stop when its client goes away. uvicorn (ASGI spec 2.3) does not
fail ``send`` after a disconnect — it silently drops the bytes — so the only signal
is an ``http.disconnect`` message from ``receive``: ``until_disconnect`` awaits some
work unless that message comes first (then cancels the work: ``ClientGone``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

from starlette.types import Receive

from .domain import Completion, TokenChunk
from .errors import TarsError
from .logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")


class WireFormat(Protocol):
    def start(self) -> bytes | None:
        """Bytes before the first token (e.g. OpenAI's role delta), or None."""

    def token(self, chunk: TokenChunk) -> bytes: ...

    def done(self, completion: Completion) -> bytes: ...

    def error(self, exc: TarsError | None) -> bytes:
        """The closing error item; ``None``: an unexpected failure (say only "internal")."""


async def drain(first: TokenChunk | Completion, agen: Any, fmt: WireFormat) -> AsyncIterator[bytes]:
    """Wire bytes for a node stream whose first item is ``first`` (see the module doc)."""
    item: Any = first
    try:
        head = fmt.start()
        if head:
            yield head
        while not isinstance(item, Completion):
            data = fmt.token(item)
            if data:  # a piece may carry nothing to send (e.g. an empty text)
                yield data
            try:
                item = await agen.__anext__()
            except StopAsyncIteration:
                yield fmt.error(TarsError("the stream ended without a final result"))
                return
        yield fmt.done(item)
    except TarsError as exc:
        yield fmt.error(exc)
    except Exception:  # noqa: BLE001 - the client gets a generic message, the log the traceback
        log.exception("stream failed after its first token")
        yield fmt.error(None)
    finally:
        await agen.aclose()  # the caller left, or we finished: stop the generation now


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone.
    (Call only after the request body has been read.)"""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait((task, listener), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task.done():
        listener.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the work was cancelled on purpose
        pass
    raise ClientGone()
