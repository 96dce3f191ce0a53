"""Server-sent events and client-disconnect handling for the HTTP API.

A generation must stop when its client goes away. uvicorn (ASGI spec 2.3) does
not fail ``send`` after a disconnect — it silently drops the bytes — so the only
signal is an ``http.disconnect`` message from ``receive``. ``EventStream`` pumps
the events in one task and listens for the disconnect in another; a disconnect
cancels the pump, which closes the node's stream, which sets the generation's
cancel event in the worker thread. ``until_disconnect`` (``distributed/streams.py``,
shared with ``/rpc``) does the same for a non-streamed generation that is still
waiting or computing; ``streams.drain`` is the one stream-to-wire loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ..logs import get_logger
from ..streams import ClientGone, drain, until_disconnect
from ..streams import wait_disconnect as _wait_disconnect

log = get_logger(__name__)

__all__ = ["ClientGone", "EventStream", "drain", "first_item", "until_disconnect"]


async def first_item(receive: Receive, agen: Any) -> Any:
    """The first item of a node stream (which is when a streamed answer may start), or
    raise ClientGone if the client left first. On any failure the stream is closed, so its
    generation stops and its queue slot is freed."""
    try:
        return await until_disconnect(receive, agen.__anext__())
    except BaseException:
        await agen.aclose()
        raise


class EventStream(Response):
    """``text/event-stream`` from an async iterator of ready-made event bytes."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async for chunk in self.events:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        listener = asyncio.ensure_future(_wait_disconnect(receive))
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
            if not pump.done():
                pump.cancel()
            aclose: Any = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
