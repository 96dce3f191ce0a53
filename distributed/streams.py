"""One stream-to-wire loop, and waiting for a client that may go away.

``drain(first, agen, fmt)`` turns a node stream (``TokenChunk``s, then exactly one
``Completion``) into wire bytes through a ``WireFormat``: native SSE and OpenAI SSE
(api/), NDJSON JSON-RPC (rpc/server.py). The end is the ``Completion`` (by type); a
stream that ends without one, or fails after it started, ends with the format's error
item (no traceback reaches a client; the log gets it). The node stream is always
closed, so its generation stops and its queue slot is freed.

``drain_choices(firsts, agens, fmts, end)`` is the same loop over the ``n`` choices of one
request streamed at once (OpenAI ``n > 1``): each choice's items go through its own format,
in its order, the choices interleaved as their items come; after the last ``Completion``,
``end(completions)`` closes the stream (OpenAI: the usage chunk and ``[DONE]``). ``drain``
is its one-choice case.

A generation must stop when its client goes away. uvicorn (ASGI spec 2.3) does not
fail ``send`` after a disconnect — it silently drops the bytes — so the only signal
is an ``http.disconnect`` message from ``receive``: ``until_disconnect`` awaits some
work unless that message comes first (then cancels the work: ``ClientGone``), and
``ByteStream`` sends a stream's bytes unless it comes first (then cancels the sending,
which closes the node stream: its generation stops, its slot is freed).

``ByteStream`` is the lean streamed answer of SSE (api/streaming.py ``EventStream``), Ollama's
NDJSON and ``/rpc``'s ``inference.stream``: one ``send`` per item straight to the server, where
Starlette's ``StreamingResponse`` adds an anyio task group and a cancel scope per stream and
an ``await`` per chunk through its wrappers (issue 18.4: the node's CPU per streamed token).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .domain import Completion, TokenChunk
from .errors import TarsError
from .logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")
_FINISHED = object()  # a choice's stream has nothing more


class WireFormat(Protocol):
    def start(self) -> bytes | None:
        """Bytes before the first token (e.g. OpenAI's role delta), or None."""

    def token(self, chunk: TokenChunk) -> bytes: ...

    def done(self, completion: Completion) -> bytes: ...

    def error(self, exc: TarsError | None) -> bytes:
        """The closing error item; ``None``: an unexpected failure (say only "internal")."""


def drain(first: TokenChunk | Completion, agen: Any, fmt: WireFormat) -> AsyncIterator[bytes]:
    """Wire bytes for a node stream whose first item is ``first`` (see the module doc)."""
    return drain_choices([first], [agen], [fmt])


async def drain_choices(firsts: Sequence[TokenChunk | Completion | None], agens: Sequence[Any],
                        fmts: Sequence[WireFormat],
                        end: Callable[[list[Completion]], bytes] | None = None) -> AsyncIterator[bytes]:
    """Wire bytes for the node streams of the choices of one request (see the module doc);
    ``firsts[i]``: the item already read from ``agens[i]``, or None. One choice (nearly
    every stream) is read in this loop itself, no generator between it and the node stream:
    one layer less per token (issue 18.4)."""
    n = len(agens)
    done: dict[int, Completion] = {}
    items = _interleave(firsts, agens) if n > 1 else None
    try:
        for fmt in fmts:
            head = fmt.start()
            if head:
                yield head
        if items is None:  # one choice
            fmt, item = fmts[0], firsts[0]
            while True:
                if isinstance(item, Completion):
                    done[0] = item
                    yield fmt.done(item)
                    break
                if item is not None:
                    data = fmt.token(item)
                    if data:  # a piece may carry nothing to send (e.g. an empty text)
                        yield data
                try:
                    item = await agens[0].__anext__()
                except StopAsyncIteration:
                    break
        else:
            async for i, item in items:
                if isinstance(item, Completion):
                    done[i] = item
                    yield fmts[i].done(item)
                    continue
                data = fmts[i].token(item)
                if data:
                    yield data
        if len(done) < n:
            yield fmts[0].error(TarsError("the stream ended without a final result"))
        elif end is not None:
            yield end([done[i] for i in range(n)])
    except TarsError as exc:
        yield fmts[0].error(exc)
    except Exception:  # noqa: BLE001 - the client gets a generic message, the log the traceback
        log.exception("stream failed after its first token")
        yield fmts[0].error(None)
    finally:
        if items is not None:
            await items.aclose()
        for agen in agens:  # the caller left, or we finished: stop the generations now
            await agen.aclose()


async def _interleave(firsts: Sequence[Any], agens: Sequence[Any]) -> AsyncGenerator[tuple[int, Any], None]:
    """Every stream's items up to its Completion, as (i, item), in the order they come."""
    queue: asyncio.Queue[tuple[int, Any, Exception | None]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            item = firsts[i] if firsts[i] is not None else await agens[i].__anext__()
            while True:
                await queue.put((i, item, None))
                if isinstance(item, Completion):
                    break
                item = await agens[i].__anext__()
        except StopAsyncIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - raised where the items are read
            await queue.put((i, None, exc))
        await queue.put((i, _FINISHED, None))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(agens))]
    try:
        running = len(tasks)
        while running:
            i, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if item is _FINISHED:
                running -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # none is inside its stream when it is closed


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


class ByteStream(Response):
    """A streamed answer from an async iterator of ready-made bytes (see the module doc)."""

    media_type = "application/octet-stream"

    def __init__(self, chunks: AsyncIterator[bytes], headers: Mapping[str, str] | None = None,
                 media_type: str | None = None) -> None:
        self.events = chunks
        self.status_code = 200
        self.background = None
        if media_type is not None:
            self.media_type = media_type
        self.init_headers(headers)

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        listener = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait((pump, listener), return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the client went away: stop generating
                log.info("client disconnected during a stream; cancelling its generation",
                         extra={"path": scope.get("path")})
                pump.cancel()
                try:
                    await pump
                except asyncio.CancelledError:
                    pass
            else:
                pump.result()  # re-raise a failure of the pump itself
        finally:
            listener.cancel()
            if not pump.done():  # we were cancelled: the pump stops before its stream is closed
                pump.cancel()
                await asyncio.wait({pump})
                if not pump.cancelled():
                    pump.exception()  # retrieved: no "never retrieved" warning
            aclose: Any = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
