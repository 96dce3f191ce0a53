"""The split relay: llama.cpp RPC between hosts, only behind the cluster token.

llama.cpp's RPC worker (``rpc-server``) has no authentication. So it listens on the worker
host's 127.0.0.1 only, and engine → worker traffic crosses hosts through two relays run
by the nodes::

    llama-server --rpc 127.0.0.1:T ──► Tunnel (engine host, 127.0.0.1:T)
        ──TCP, token preface──► RelayServer (worker host, TARS_HOST:TARS_SPLIT_PORT)
        ──► rpc-server (worker host, 127.0.0.1 only)

**Preface** (client first, 64 bytes, so a client without the token is answered nothing at
all): ``MAGIC (8) | unix time, u64 big-endian (8) | random nonce (16) |
HMAC-SHA256(token, MAGIC | time | nonce | target) (32)``. The server checks the MAC with
``hmac.compare_digest`` (constant time), the time within ``SKEW_S`` of its clock and the
nonce against those seen in that window (a captured preface cannot be replayed). Anything
else — a short read, a wrong MAC, a stale or replayed preface, no token configured — and
the connection is closed without a byte sent. Only then does the server connect to its
local target and answer ``HMAC-SHA256(token, "ok" | nonce)`` (32 bytes), which proves to
the client that it reached a holder of the token; after that, bytes flow both ways
unchanged. The MAC covers the target name, so a preface for one worker opens no other.
The bytes after the preface are not encrypted: the token decides who may open a channel,
as it decides who may call ``/rpc`` (docs/RPC.md, *Pooled VRAM*).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ..errors import PeerUnavailable, Unauthorized
from ..logs import fields, get_logger

log = get_logger(__name__)

MAGIC = b"TARSRLY1"
PREFACE_LEN = 8 + 8 + 16 + 32
SKEW_S = 300.0  # clocks of the two hosts may differ this much (seconds)
HANDSHAKE_TIMEOUT_S = 5.0
CHUNK = 256 * 1024

Targets = Callable[[], "dict[str, tuple[str, int]]"]  # the local targets now: name -> (host, port)


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def make_preface(token: str, target: str, *, now: float | None = None, nonce: bytes | None = None) -> bytes:
    """The 64 bytes a client sends first (see the module doc)."""
    stamp = struct.pack(">Q", int(time.time() if now is None else now))
    nonce = os.urandom(16) if nonce is None else nonce
    return MAGIC + stamp + nonce + _mac(token.encode(), MAGIC, stamp, nonce, target.encode())


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Forward(asyncio.Protocol):
    """One direction of a channel: what its transport reads is written to the peer's
    transport at once, in the event loop's callback (no task switch per message — each RPC
    message costs one wake-up here). Flow control: a full write buffer on one side pauses
    reading on the other."""

    def __init__(self, channel: "_Splice", transport: asyncio.Transport, way: str) -> None:
        self.channel, self.transport = channel, transport
        self.peer: _Forward | None = None
        self.nbytes, self.nreads = f"bytes_{way}", f"reads_{way}"
        channel.stats.setdefault(self.nbytes, 0)
        channel.stats.setdefault(self.nreads, 0)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)
        self.channel.stats[self.nbytes] += len(data)
        self.channel.stats[self.nreads] += 1  # about one per RPC message: a LAN round trip each

    def eof_received(self) -> bool:
        assert self.peer is not None
        try:
            if self.peer.transport.can_write_eof():
                self.peer.transport.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass
        self.channel.ended()
        return True  # half-closed: the other direction may still be flushing

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()


class _Splice:
    def __init__(self, stats: dict[str, int]) -> None:
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.transports: list[asyncio.Transport] = []
        self._timer: asyncio.TimerHandle | None = None

    def ended(self) -> None:
        """One direction ended: give the other a moment to flush, then end the channel."""
        if self._timer is None:
            self._timer = self.loop.call_later(0.5, self.close)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for t in self.transports:
            t.close()
        if not self.done.done():
            self.done.set_result(None)


def _take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What the stream reader holds already (read past the preface), and whether it saw EOF."""
    buf = getattr(reader, "_buffer", None)
    data = bytes(buf) if buf else b""
    if buf:
        buf.clear()
    return data, reader.at_eof() or bool(getattr(reader, "_eof", False))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        pass


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter], stats: dict[str, int],
                 live: "set[_Splice] | None" = None) -> None:
    """Copy bytes both ways until either side closes; then close both. ``stats`` counts
    bytes and reads each way (``up``: a → b), live. The streams' transports get a plain
    forwarding protocol each (asyncio streams cost a task switch per message)."""
    ch = _Splice(stats)
    # a socket stream's transport is a full Transport (it reads too), typed as its write half
    ta, tb = cast(asyncio.Transport, a[1].transport), cast(asyncio.Transport, b[1].transport)
    ch.transports = [ta, tb]
    if live is not None:
        live.add(ch)
    try:
        if ta.is_closing() or tb.is_closing():
            return
        up, down = _Forward(ch, ta, "up"), _Forward(ch, tb, "down")
        up.peer, down.peer = down, up
        left_a, eof_a = _take_buffered(a[0])
        left_b, eof_b = _take_buffered(b[0])
        ta.set_protocol(up)
        tb.set_protocol(down)
        for data, proto in ((left_a, up), (left_b, down)):
            if data:
                proto.data_received(data)
        for eof, proto in ((eof_a, up), (eof_b, down)):
            if eof:
                proto.eof_received()
        ta.resume_reading()
        tb.resume_reading()
        await ch.done
    finally:
        ch.close()
        if live is not None:
            live.discard(ch)


class _Listener:
    """One listening socket and its live connections, so close() ends them all."""

    def __init__(self) -> None:
        self.server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.splices: set[_Splice] = set()

    async def listen(self, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                     host: str, port: int) -> int:
        """Start listening (once) on host:port; the port it listens on (a free one for 0)."""
        if self.server is None:
            self.server = await asyncio.start_server(handle, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    def track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for ch in list(self.splices):  # open channels end as if a side had closed
            ch.close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for t in list(self.tasks):  # still in the handshake
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()
        self.server = None


class RelayServer:
    """Worker side: accepts token-checked channels and forwards each to a local target.

    ``targets()`` gives the local targets a preface may name, ``{name: (host, port)}`` — the
    RPC workers running on 127.0.0.1 now. ``host`` is the node's own address.
    """

    def __init__(self, token: str, host: str, port: int, targets: Targets, *, name: str = "relay",
                 skew_s: float = SKEW_S, handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self._token = token.encode()
        self.host, self.port, self.name = host, port, name
        self._targets = targets
        self._skew = skew_s
        self._timeout = handshake_timeout_s
        self._seen: dict[bytes, float] = {}
        self._listener = _Listener()
        self.stats: dict[str, int] = {"accepted": 0, "refused": 0, "open": 0}

    async def start(self) -> None:
        if self._listener.server is None:
            self.port = await self._listener.listen(self._handle, self.host, self.port)
            log.info("split relay listening on %s:%d (cluster token first)", self.host, self.port,
                     extra=fields(relay=self.name))

    async def close(self) -> None:
        await self._listener.close()

    def info(self) -> dict[str, Any]:
        return {"listen": f"{self.host}:{self.port}", **self.stats}

    def _check(self, preface: bytes, targets: dict[str, tuple[str, int]]) -> tuple[str, int] | None:
        """The local address the preface opens, or None. Constant-time MAC check."""
        if not self._token or len(preface) != PREFACE_LEN or preface[:8] != MAGIC:
            return None
        stamp, nonce, mac = preface[8:16], preface[16:32], preface[32:]
        now = time.time()
        self._seen = {n: t for n, t in self._seen.items() if now - t <= 2 * self._skew}
        where = None
        for name, address in targets.items():
            if hmac.compare_digest(mac, _mac(self._token, MAGIC, stamp, nonce, name.encode())):
                where = address
        if where is None or abs(now - struct.unpack(">Q", stamp)[0]) > self._skew or nonce in self._seen:
            return None
        self._seen[nonce] = now
        return where

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._listener.track()
        peer = writer.get_extra_info("peername")
        try:
            preface = await asyncio.wait_for(reader.readexactly(PREFACE_LEN), self._timeout)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
            preface = b""
        targets = self._targets()
        where = self._check(preface, targets)
        if where is None:
            self.stats["refused"] += 1
            log.warning("split relay refused %s: no valid cluster-token preface%s", peer,
                        "" if targets else " (and no RPC worker runs here)", extra=fields(relay=self.name))
            await _close(writer)
            return
        try:
            local = await asyncio.wait_for(asyncio.open_connection(*where), self._timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            self.stats["refused"] += 1
            log.warning("split relay: RPC worker at %s:%d does not answer (%s)", *where, exc, extra=fields(relay=self.name))
            await _close(writer)
            return
        self.stats["accepted"] += 1
        self.stats["open"] += 1
        _nodelay(writer)
        _nodelay(local[1])
        writer.write(_mac(self._token, b"ok", preface[16:32]))
        try:
            await splice((reader, writer), local, self.stats, self._listener.splices)
        finally:
            self.stats["open"] -= 1


async def open_channel(host: str, port: int, token: str, target: str = "worker",
                       timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Client side of the preface: a stream to ``target`` behind the relay at host:port.

    Raises PeerUnavailable when the relay cannot be reached, Unauthorized when it closes
    the connection instead of proving that it holds the token too.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerUnavailable(f"split relay at {host}:{port} unreachable: {exc or 'timeout'}",
                              peer=f"{host}:{port}") from None
    _nodelay(writer)
    preface = make_preface(token, target)
    writer.write(preface)
    try:
        proof = await asyncio.wait_for(reader.readexactly(32), timeout)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError):
        await _close(writer)
        raise Unauthorized(f"split relay at {host}:{port} closed the channel: wrong cluster token, clocks "
                           f"more than {SKEW_S:.0f} s apart, or no RPC worker running there") from None
    if not hmac.compare_digest(proof, _mac(token.encode(), b"ok", preface[16:32])):
        await _close(writer)
        raise Unauthorized(f"split relay at {host}:{port} does not hold the cluster token")
    return reader, writer


class Tunnel:
    """Engine side: a 127.0.0.1 listener whose every connection becomes a token-checked
    channel to ``target`` behind the relay at ``remote`` (host, port). The engine's
    ``--rpc`` points at ``.address``."""

    def __init__(self, token: str, remote: tuple[str, int], *, target: str = "worker", port: int = 0,
                 name: str = "tunnel", timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        self._token, self.remote, self.target, self.port, self.name = token, remote, target, port, name
        self._timeout = timeout
        self._listener = _Listener()
        self.stats: dict[str, int] = {"accepted": 0, "failed": 0, "open": 0}
        self.last_error: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.port = await self._listener.listen(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        await self._listener.close()

    def info(self) -> dict[str, Any]:
        return {"listen": self.address, "remote": f"{self.remote[0]}:{self.remote[1]}", **self.stats,
                **({"error": self.last_error} if self.last_error else {})}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._listener.track()
        _nodelay(writer)
        try:
            remote = await open_channel(*self.remote, self._token, self.target, self._timeout)
        except (PeerUnavailable, Unauthorized) as exc:
            self.stats["failed"] += 1
            self.last_error = exc.message
            log.warning("split tunnel %s: %s", self.name, exc.message, extra=fields(relay=self.name))
            await _close(writer)
            return
        self.last_error = None
        self.stats["accepted"] += 1
        self.stats["open"] += 1
        try:
            await splice((reader, writer), remote, self.stats, self._listener.splices)
        finally:
            self.stats["open"] -= 1
