"""A minimal HTTP/1.1 client for one thing: a streamed POST whose answer is read as it comes.

Two streams of one small event per token use it: the engine's SSE (engine/sse.py, our own
llama-server on loopback) and a peer's NDJSON ``inference.stream`` (rpc/client.py). A
general client spends tens to hundreds of microseconds of Python per event (httpx: h11
parsing, an anyio cancel scope per read, text decoding and line splitting) — CPU a 2-core
host takes from the engine itself (issue 18.4). This reads the socket with a bare asyncio
protocol (what arrived is kept as it came, one future wakes the reader: none of the stream
reader's buffer copying and bookkeeping per arrival), takes whatever has arrived, de-chunks
it in one pass and hands out the body bytes of all the chunks it held. One connection per request (``Connection: close``);
closing it early (the client went away) makes the server stop that answer.

API::

    post = StreamedPost(host, port, path, body, headers, ssl=None, connect_timeout=None,
                        read_timeout=None, socket_options=())
    await post.open()          # connect, send, read the status line and headers
    post.status, post.headers  # int, {lower-case name: value}
    async for data in post.body(): ...   # body bytes, de-chunked, as they come
    await post.aclose()

Errors: connecting raises ``OSError`` (refused, unreachable, TLS) or ``ConnectTimeout``;
afterwards ``asyncio.IncompleteReadError`` (the connection ended before the answer did),
``OSError`` (the link), or ``ReadTimeout`` (nothing came for ``read_timeout`` seconds: one
timer per stream, moved by each read, not one per read).
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

_MAX_HEAD = 1 << 16  # the status line and headers of an answer, at most
_HELD = 1 << 20  # bytes read ahead of the reader before the socket is paused


class ConnectTimeout(Exception):
    """The connection did not open within ``connect_timeout``."""


class ReadTimeout(Exception):
    """Nothing arrived for ``read_timeout`` seconds."""


class _Inbox(asyncio.Protocol):
    """What the socket delivered, kept as it came, and one waiter for the reader."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.chunks: list[bytes] = []
        self.size = 0  # bytes held; past _HELD the socket is not read until the reader catches up
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.exc: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > _HELD and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()  # a slow reader holds the sender back, as TCP would
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.exc = exc
        self._wake()

    async def read(self) -> bytes:
        """What has arrived since the last read, waiting for something; b"" at the end (or the
        connection's error)."""
        chunks = self.chunks
        if not chunks:
            if not self.closed:
                self.waiter = self.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            if not chunks:
                if self.exc is not None:
                    raise self.exc
                return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.size = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data


class StreamedPost:
    def __init__(self, host: str, port: int, path: str, body: bytes, headers: Mapping[str, str], *,
                 ssl: ssl_.SSLContext | None = None, connect_timeout: float | None = None,
                 read_timeout: float | None = None, socket_options: Iterable[tuple[int, int, int]] = ()) -> None:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._req = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}Connection: close\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self._addr = (host, port)
        self._ssl = ssl
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._options = list(socket_options)
        self._inbox: _Inbox | None = None
        self._transport: asyncio.Transport | None = None
        self._rest = b""  # body bytes that came with the headers
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set while a read timeout is kept
        self._deadline = 0.0
        self.timed_out = False
        self.connected = False  # the connection opened (a failure since is not a connect failure)
        self.status = 0
        self.headers: dict[str, str] = {}

    async def open(self) -> None:
        host, port = self._addr
        loop = asyncio.get_running_loop()
        inbox = _Inbox(loop)
        connect = loop.create_connection(lambda: inbox, host, port, ssl=self._ssl,
                                         server_hostname=host if self._ssl is not None else None)
        try:
            transport, _ = await asyncio.wait_for(connect, self._connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"no connection to {host}:{port} within {self._connect_timeout:g} s") from None
        self._inbox, self._transport = inbox, transport
        self.connected = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for level, opt, setting in self._options:
                sock.setsockopt(level, opt, setting)
        if self._read_timeout is not None:
            self._loop = loop
            self._deadline = loop.time() + self._read_timeout
            self._timer = loop.call_at(self._deadline, self._check)
        transport.write(self._req)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise asyncio.IncompleteReadError(buf[:100], None)  # not an HTTP answer we can read
            data = await self._read()
            if not data:
                self._ended()
            buf += data
        lines = buf[:end].split(b"\r\n")
        self._rest = buf[end + 4:]
        parts = lines[0].split(None, 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")

    def _check(self) -> None:
        """The read timer: fires at the deadline; a read since then moved it further."""
        loop = self._loop
        assert loop is not None
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._check)
            return
        self.timed_out = True
        if self._transport is not None:
            self._transport.abort()  # the pending read ends: reported as ReadTimeout

    def _ended(self) -> None:
        if self.timed_out:
            raise ReadTimeout(f"nothing arrived for {self._read_timeout:g} s")
        raise asyncio.IncompleteReadError(b"", None)

    async def _read(self) -> bytes:
        assert self._inbox is not None
        try:
            data = await self._inbox.read()
        except OSError:
            if self.timed_out:
                self._ended()
            raise
        if not data:
            if self.timed_out:
                self._ended()
            return b""
        if self._loop is not None and self._read_timeout is not None:
            self._deadline = self._loop.time() + self._read_timeout
        return data

    def body(self) -> AsyncIterator[bytes]:
        """The body as it comes: each read's complete chunks joined (a chunked answer ended
        without its last chunk raises IncompleteReadError). The reading generator itself, not
        one that passes its items on: one layer less per token."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return self._chunked()
        return self._plain()

    async def _plain(self) -> AsyncIterator[bytes]:
        left = int(self.headers["content-length"]) if "content-length" in self.headers else None
        data, self._rest = self._rest, b""
        while left is None or left > 0:
            if not data:
                data = await self._read()
                if not data:
                    if left is not None:
                        self._ended()
                    return
            if left is not None:
                data = data[:left]
                left -= len(data)
            yield data
            data = b""

    async def _chunked(self) -> AsyncIterator[bytes]:
        buf, self._rest = self._rest, b""
        while True:
            out: list[bytes] = []
            pos, last = 0, False
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    last = True
                    break
                end = eol + 2 + size
                if len(buf) < end + 2:
                    break  # the rest of this chunk is still on its way
                out.append(buf[eol + 2:end])
                pos = end + 2
            buf = buf[pos:]
            if out:
                yield out[0] if len(out) == 1 else b"".join(out)
            if last:
                return
            data = await self._read()
            if not data:
                self._ended()
            buf += data

    async def read_all(self) -> bytes:
        return b"".join([data async for data in self.body()])

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.close()

    async def __aenter__(self) -> "StreamedPost":
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
