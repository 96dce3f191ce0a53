"""A minimal HTTP/1.1 client for one thing: a streamed POST whose answer is read as it comes.

Two streams of one small event per token use it: the engine's SSE (engine/sse.py, our own
llama-server on loopback) and a peer's NDJSON ``inference.stream`` (rpc/client.py). A
general client spends tens to hundreds of microseconds of Python per event (httpx: h11
parsing, an anyio cancel scope per read, text decoding and line splitting) — CPU a 2-core
host takes from the engine itself (issue 18.4). This reads the socket with asyncio's stream
reader, takes whatever has arrived in one read, de-chunks it in one pass and hands out the
body bytes of all the chunks it held. One connection per request (``Connection: close``);
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

_READ = 1 << 16


class ConnectTimeout(Exception):
    """The connection did not open within ``connect_timeout``."""


class ReadTimeout(Exception):
    """Nothing arrived for ``read_timeout`` seconds."""


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
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set while a read timeout is kept
        self._deadline = 0.0
        self.timed_out = False
        self.connected = False  # the connection opened (a failure since is not a connect failure)
        self.status = 0
        self.headers: dict[str, str] = {}

    async def open(self) -> None:
        host, port = self._addr
        connect = asyncio.open_connection(host, port, limit=1 << 20, ssl=self._ssl,
                                          server_hostname=host if self._ssl is not None else None)
        try:
            reader, writer = await asyncio.wait_for(connect, self._connect_timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(f"no connection to {host}:{port} within {self._connect_timeout:g} s") from None
        self._reader, self._writer = reader, writer
        self.connected = True
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for level, opt, setting in self._options:
                sock.setsockopt(level, opt, setting)
        if self._read_timeout is not None:
            self._loop = loop = asyncio.get_running_loop()
            self._deadline = loop.time() + self._read_timeout
            self._timer = loop.call_at(self._deadline, self._check)
        writer.write(self._req)
        await writer.drain()
        status_line = await self._line()
        parts = status_line.split(None, 2)
        self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        while True:
            line = await self._line()
            if line in (b"\r\n", b"\n"):
                break
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
        if self._writer is not None:
            self._writer.transport.abort()  # the pending read ends (EOF): reported as ReadTimeout

    def _moved(self) -> None:
        if self._loop is not None and self._read_timeout is not None:
            self._deadline = self._loop.time() + self._read_timeout

    async def _line(self) -> bytes:
        assert self._reader is not None
        line = await self._reader.readline()
        if not line.endswith(b"\n"):
            self._ended()
        self._moved()
        return line

    def _ended(self) -> None:
        if self.timed_out:
            raise ReadTimeout(f"nothing arrived for {self._read_timeout:g} s")
        raise asyncio.IncompleteReadError(b"", None)

    async def _read(self) -> bytes:
        assert self._reader is not None
        data = await self._reader.read(_READ)
        if not data:
            if self.timed_out:
                self._ended()
            return b""
        self._moved()
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
        while left is None or left > 0:
            data = await self._read()
            if not data:
                if left is not None:
                    self._ended()
                return
            if left is not None:
                data = data[:left]
                left -= len(data)
            yield data

    async def _chunked(self) -> AsyncIterator[bytes]:
        buf = b""
        while True:
            data = await self._read()
            if not data:
                self._ended()
            buf += data
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

    async def read_all(self) -> bytes:
        return b"".join([data async for data in self.body()])

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def __aenter__(self) -> "StreamedPost":
        try:
            await self.open()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
