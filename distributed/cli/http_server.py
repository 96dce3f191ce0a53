"""The HTTP server of ``tars serve``: uvicorn, with connection limits it does not have.

A client without credentials must not be able to starve the node of sockets or
file descriptors. uvicorn closes idle keep-alive connections (``timeout_keep_alive``)
but not a connection that never sends a request, nor one that sends its headers a
byte at a time, and it accepts connections until ``accept()`` fails for lack of file
descriptors (then ``/health`` fails too). So uvicorn's protocol class is subclassed
here (``guarded``) and one ``ConnectionGuard`` per server watches every connection:

* **headers deadline** — a connection waiting for a request (new, or kept alive after
  a response) must deliver the request's headers within ``TARS_HEADER_TIMEOUT_S``
  (default 10 s) and in at most ``MAX_HEADER_BYTES``; otherwise it is closed;
* **body progress** — while a request body is being received, each pause between
  bytes may last at most the same deadline;
* **TLS handshakes count** — with HTTPS the handshake is done here, inside the guarded
  protocol (``loop.start_tls``), not by the event loop before the protocol exists: a
  connection is counted and under the headers deadline from its first byte, so sockets
  that never finish a handshake are shed like sockets that never send headers. (An HTTPS
  node runs on asyncio's loop: uvloop starts reading a new connection even when its
  protocol paused it, and the ClientHello would reach the protocol instead of TLS.)
* **keep-alive idle** — ``TARS_KEEPALIVE_S`` (default 5 s), uvicorn's own timer;
* **a bound on open connections** below the process's file limit (``RLIMIT_NOFILE``,
  whose soft value is raised to the hard one at start): when it is reached, the
  connection that has waited longest *without a request in progress* is closed to make
  room, so requests keep being served however many idle sockets a client opens; only
  when every connection carries a request is the new one turned away.

A sweep once a second checks the deadlines (one loop over the open connections).
"""

from __future__ import annotations

import asyncio
import resource
import ssl
import time
from typing import Any

MAX_HEADER_BYTES = 64 * 1024
FD_RESERVE = 128  # descriptors kept for model files, peers, child processes, logs
SWEEP_S = 1.0


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (capped at 65536); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return 65536 if soft == resource.RLIM_INFINITY else soft


def connection_bound(configured: int, file_limit: int) -> int:
    """Open connections at most: the setting, never above the file limit less a reserve."""
    ceiling = max(16, file_limit - FD_RESERVE)
    return min(configured, ceiling) if configured else ceiling


class ConnectionGuard:
    """Deadlines and the connection bound for one server (see the module docstring)."""

    def __init__(self, max_connections: int, header_timeout_s: float, log: Any = None) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.log = log
        self.conns: dict[Any, None] = {}  # insertion-ordered set of protocols
        self.closed_idle = 0  # counters, for logs and tests
        self.refused = 0
        self._sweeper: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ per connection
    def opened(self, conn: Any) -> bool:
        """A new connection. False: no room (every other connection has a request in progress)."""
        now = time.monotonic()
        conn._tars_waiting_since = now
        conn._tars_last_data = now
        conn._tars_header_bytes = 0
        conn._tars_cycle = None
        if len(self.conns) >= self.max_connections:
            victim = self._longest_waiting(now)
            if victim is None:
                self.refused += 1
                return False
            self._close(victim, "the connection limit was reached and it had no request in progress")
        self.conns[conn] = None
        if self._sweeper is None:
            self._schedule()
        return True

    def gone(self, conn: Any) -> None:
        self.conns.pop(conn, None)

    def received(self, conn: Any, nbytes: int) -> None:
        """Bytes arrived (before the parser runs)."""
        conn._tars_last_data = time.monotonic()
        if conn._tars_waiting_since is not None:
            conn._tars_header_bytes += nbytes

    def parsed(self, conn: Any) -> None:
        """After the parser ran: a new request cycle means its headers are complete."""
        cycle = getattr(conn, "cycle", None)
        if cycle is not None and cycle is not conn._tars_cycle:
            conn._tars_cycle = cycle
            conn._tars_waiting_since = None
            conn._tars_header_bytes = 0
        elif conn._tars_waiting_since is not None and conn._tars_header_bytes > MAX_HEADER_BYTES and \
                not _busy(conn):
            self._close(conn, f"its request headers exceeded {MAX_HEADER_BYTES} bytes")

    # ------------------------------------------------------------ sweeping
    def _schedule(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(SWEEP_S, self.sweep)

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def sweep(self) -> None:
        now = time.monotonic()
        limit = self.header_timeout_s
        for conn in list(self.conns):
            cycle = getattr(conn, "cycle", None)
            if _busy(conn):
                conn._tars_waiting_since = None
                if getattr(cycle, "more_body", False) and now - conn._tars_last_data > limit:
                    self._close(conn, f"its request body made no progress for {limit:g} s")
                continue
            if conn._tars_waiting_since is None:  # its last response just completed: wait for the next
                conn._tars_waiting_since = now
                conn._tars_header_bytes = 0
            elif now - conn._tars_waiting_since > limit:
                self._close(conn, f"no complete request headers within {limit:g} s")
        self._schedule() if self.conns else setattr(self, "_sweeper", None)

    def _longest_waiting(self, now: float) -> Any:
        best, since = None, now + 1
        for conn in self.conns:
            w = conn._tars_waiting_since
            if w is not None and w < since and not _busy(conn):
                best, since = conn, w
        return best

    def _close(self, conn: Any, why: str) -> None:
        self.conns.pop(conn, None)
        self.closed_idle += 1
        if self.log is not None:
            peer = getattr(getattr(conn, "transport", None), "get_extra_info", lambda _: None)("peername")
            self.log.debug("closing the connection of %s: %s", peer, why)
        transport = getattr(conn, "transport", None) or getattr(conn, "_tars_raw", None)
        if transport is not None and not transport.is_closing():
            transport.abort()


def _busy(conn: Any) -> bool:
    """A request is in progress on ``conn`` (headers received, response not finished)."""
    cycle = getattr(conn, "cycle", None)
    return cycle is not None and not getattr(cycle, "response_complete", True)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def guarded(base: type, guard: ConnectionGuard, tls: ssl.SSLContext | None = None) -> type:
    """A subclass of uvicorn's protocol class ``base`` reporting to ``guard``; with ``tls``
    it also does the server side of the TLS handshake itself (see the module docstring)."""

    class Guarded(base):  # type: ignore[misc,valid-type]
        _tars_raw: Any = None
        _tars_early: list[bytes] | None = None  # plaintext that arrived before uvicorn's setup ran
        _tars_made = False

        def connection_made(self, transport: Any) -> None:
            if tls is None:
                super().connection_made(transport)
                self._tars_made = True
            else:  # no byte may reach us before start_tls takes the transport (the ClientHello). uvloop
                transport.pause_reading()  # starts reading after connection_made whatever it says: asyncio only
                self._tars_raw, self._tars_early = transport, []
            if not guard.opened(self):
                transport.abort()
            elif tls is not None:
                self._tars_handshake = asyncio.get_running_loop().create_task(self._tars_start_tls(transport))

        async def _tars_start_tls(self, raw: Any) -> None:
            loop = asyncio.get_running_loop()
            assert tls is not None  # only started when the server has TLS
            try:  # the guard's headers deadline closes a stalled handshake first; this is a backstop
                wrapped = await loop.start_tls(raw, self, tls, server_side=True,
                                               ssl_handshake_timeout=guard.header_timeout_s + 2 * SWEEP_S)
            except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
                guard.gone(self)
                raw.abort()
                return
            if raw.is_closing():
                return
            super().connection_made(wrapped)
            self._tars_made = True
            early, self._tars_early = self._tars_early or [], None
            for data in early:
                super().data_received(data)
            guard.parsed(self)

        def connection_lost(self, exc: Any) -> None:
            guard.gone(self)
            if self._tars_made:
                super().connection_lost(exc)

        def eof_received(self) -> Any:
            return super().eof_received() if self._tars_made else None

        def data_received(self, data: bytes) -> None:
            guard.received(self, len(data))
            if self._tars_early is not None:
                self._tars_early.append(data)
                return
            super().data_received(data)
            guard.parsed(self)

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


def build_server(app: Any, settings: Any, log: Any) -> Any:
    """A uvicorn ``Server`` for ``app`` with the guard, deadlines and (optionally) TLS."""
    import uvicorn

    from ..optional import available

    http = "httptools" if available("httptools") else "h11"
    base: type[Any]
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    file_limit = raise_file_limit()
    guard = ConnectionGuard(connection_bound(settings.max_connections, file_limit), settings.header_timeout_s, log)
    tls = server_tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    scheme = "https" if tls else "http"
    host, port = settings.host, settings.port

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                log.info("listening on %s://%s:%d (at most %d connections, file limit %d)", scheme, host, port,
                         guard.max_connections, file_limit)

        async def shutdown(self, sockets: Any = None) -> None:
            guard.stop()
            log.info("connection guard: %d connection(s) closed for idling or slow headers/body, %d turned away "
                     "(all busy)", guard.closed_idle, guard.refused)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            loop="uvloop" if available("uvloop") and tls is None else "asyncio",
                            http=guarded(base, guard, tls),
                            timeout_keep_alive=max(1, round(settings.keepalive_s)), timeout_graceful_shutdown=5,
                            server_header=False, backlog=2048)
    server = Server(config)
    server.guard = guard  # type: ignore[attr-defined]
    return server
