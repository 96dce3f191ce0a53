"""Our own llama-server's streamed answer, read as SSE on loopback (``http1.StreamedPost``).

Why not httpx here: a streamed answer is one small event per token, and httpx spends a
few hundred microseconds of Python per event (h11 parsing, decoding, line splitting) —
CPU a 2-core host takes from the engine itself. ``StreamedPost`` reads the socket with a
bare asyncio protocol and de-chunks whatever one read brought; this splits it into the
SSE ``data:`` payloads, as bytes. One connection per request (``Connection: close``);
closing it early (the client went away) makes llama-server cancel that task and free its slot.

API::

    async with SseStream(host, port, path, body, key) as s:   # raises EngineRefused(status, body) on non-200
        async for data in s: ...                               # bytes of each `data:` line, "[DONE]" excluded
    # connection problems raise OSError / asyncio.IncompleteReadError (the engine is gone)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..http1 import StreamedPost


class EngineRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class SseStream:
    def __init__(self, host: str, port: int, path: str, body: bytes, key: str) -> None:
        self._post = StreamedPost(host, port, path, body, {"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json",
                                                          "Accept": "text/event-stream"})

    async def __aenter__(self) -> "SseStream":
        post = self._post
        try:
            await post.open()
            if post.status != 200:
                raise EngineRefused(post.status, await post.read_all())
        except BaseException:
            await post.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._post.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        buf = b""
        async for data in self._post.body():
            buf += data
            cut = buf.rfind(b"\n")
            if cut < 0:
                continue
            lines, buf = buf[:cut].split(b"\n"), buf[cut + 1:]
            for line in lines:
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield payload
        if buf.startswith(b"data:") and buf[5:].strip() not in (b"", b"[DONE]"):
            yield buf[5:].strip()
