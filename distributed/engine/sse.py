"""A minimal HTTP/1.1 client for one thing: a streamed POST to our own llama-server on loopback.

Why not httpx here: a streamed answer is one small event per token, and httpx spends a
few hundred microseconds of Python per event (h11 parsing, decoding, line splitting) —
CPU a 2-core host takes from the engine itself. This reads the socket with asyncio's
stream reader, de-chunks, and hands out each SSE ``data:`` payload as bytes. One
connection per request (``Connection: close``); closing it early (the client went away)
makes llama-server cancel that task and free its slot.

API::

    async with SseStream(host, port, path, body, key) as s:   # raises EngineRefused(status, body) on non-200
        async for data in s: ...                               # bytes of each `data:` line, "[DONE]" excluded
    # connection problems raise OSError / asyncio.IncompleteReadError (the engine is gone)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any


class EngineRefused(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


class SseStream:
    def __init__(self, host: str, port: int, path: str, body: bytes, key: str) -> None:
        self._req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nAccept: text/event-stream\r\nConnection: close\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self._addr = (host, port)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._chunked = False
        self._length: int | None = None

    async def __aenter__(self) -> "SseStream":
        reader, writer = await asyncio.open_connection(*self._addr, limit=1 << 20)
        self._reader, self._writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(self._req)
        await writer.drain()
        status_line = await reader.readline()
        if not status_line:
            raise asyncio.IncompleteReadError(b"", None)
        parts = status_line.split(None, 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
            elif name == b"content-length":
                self._length = int(value.strip() or 0)
        if status != 200:
            body = b"".join([piece async for piece in self._pieces()])
            await self.aclose()
            raise EngineRefused(status, body)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def _pieces(self) -> AsyncIterator[bytes]:
        r = self._reader
        assert r is not None
        if self._chunked:
            while True:
                size_line = await r.readline()
                if not size_line:
                    raise asyncio.IncompleteReadError(b"", None)  # ended without the last chunk
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    return
                data = await r.readexactly(size + 2)
                yield data[:-2]
        elif self._length is not None:
            if self._length:
                yield await r.readexactly(self._length)
        else:
            while True:
                data = await r.read(1 << 16)
                if not data:
                    return
                yield data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        buf = b""
        async for data in self._pieces():
            buf += data
            while True:
                cut = buf.find(b"\n")
                if cut < 0:
                    break
                line, buf = buf[:cut].rstrip(b"\r"), buf[cut + 1:]
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    yield payload
        if buf.startswith(b"data:") and buf[5:].strip() not in (b"", b"[DONE]"):
            yield buf[5:].strip()
