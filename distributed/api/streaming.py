"""Server-sent events and client-disconnect handling for the HTTP API.

A generation must stop when its client goes away. uvicorn (ASGI spec 2.3) does
not fail ``send`` after a disconnect — it silently drops the bytes — so the only
signal is an ``http.disconnect`` message from ``receive``. ``EventStream`` (a
``streams.ByteStream``) pumps the events in one task and listens for the disconnect in
another; a disconnect cancels the pump, which closes the node's stream, which sets the
generation's cancel event in the worker thread. ``until_disconnect`` (``distributed/streams.py``,
shared with ``/rpc``) does the same for a non-streamed generation that is still
waiting or computing; ``streams.drain`` is the one stream-to-wire loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.types import Receive

from ..streams import ByteStream, ClientGone, drain, until_disconnect

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


class EventStream(ByteStream):
    """``text/event-stream`` from an async iterator of ready-made event bytes."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        super().__init__(events, {"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
