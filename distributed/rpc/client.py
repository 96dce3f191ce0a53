"""JSON-RPC 2.0 calling side: ``PeerClient`` talks to one peer's ``/rpc``.

One pooled ``httpx.AsyncClient`` per peer (keep-alive connections are reused
across calls — on loopback a new TCP connection costs more than the call).
The transport is injectable: ``httpx.ASGITransport(app)`` wires two nodes in one
process without sockets, ``httpx.MockTransport`` scripts a peer in unit tests.

httpx exceptions never leave this module; they are translated here, at the
boundary:

    connect error, timeouts, a dropped connection → PeerUnavailable (503) naming the peer,
                                                    ``details["phase"]``: "connect" or "link" (the
                                                    call never reached the peer: serve it elsewhere)
                                                    or "answer" (it may have)
    an answer that is not JSON-RPC                → PeerError (502) naming the peer
    HTTP 401                                      → Unauthorized (token mismatch)
    a JSON-RPC error object                       → the TarsError it encodes (protocol.error_from_rpc)

Only idempotent methods (``protocol.IDEMPOTENT_METHODS``) are retried, with
exponential backoff, and only on transport failures: a generation that may
have reached the peer is never sent twice.

An ``https://`` peer with ``pins`` (``tls.Pins``) is pinned: before the first call
the client reads the peer's certificate in a handshake that sends nothing and
trusts exactly that certificate if its SHA-256 fingerprint is pinned (no CA, no
host name check); a different certificate fails before the token is sent.

Sized for a LAN: a connection must open within ``connect_timeout`` (TARS_CONNECT_TIMEOUT_S,
1 s), and on Linux the sockets carry ``TCP_USER_TIMEOUT`` of the same length, so data the
peer's kernel does not acknowledge in that time (a pulled cable, a host that vanished
behind a kept-alive connection) fails the call then, with phase "link", instead of
waiting for the answer's timeout. A long generation is not cut by it: once the request is
acknowledged, nothing is outstanding while the peer computes.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import itertools
import os
import socket
import ssl
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import PeerError, PeerUnavailable, TarsError, Unauthorized
from ..http1 import ConnectTimeout, ReadTimeout, StreamedPost
from . import protocol as p

if TYPE_CHECKING:
    from ..tls import Pins

_HEADERS = {"content-type": "application/json", "accept": f"application/json, {p.NDJSON}"}
_LINK_ERRNOS = {errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def _link_options(timeout_s: float) -> list[tuple[int, int, int]]:
    """Socket options bounding unacknowledged data to ``timeout_s`` (Linux; elsewhere none)."""
    opt = getattr(socket, "TCP_USER_TIMEOUT", None)
    return [(socket.IPPROTO_TCP, opt, max(1, int(timeout_s * 1000)))] if opt is not None else []


def _link_errno(exc: BaseException) -> int | None:
    """The errno of the OSError behind an httpx error, when it says the link is down."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _LINK_ERRNOS:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    return None


class PeerClient:
    """Calls one peer. ``name`` is how errors and logs name it (its node name once
    known, its URL before)."""

    def __init__(self, base_url: str, token: str, *, transport: httpx.AsyncBaseTransport | None = None,
                 timeout: float = 5.0, long_timeout: float = 300.0, name: str | None = None,
                 retries: int = 3, backoff_s: float = 0.1, max_backoff_s: float = 2.0,
                 max_connections: int = 64, pins: "Pins | None" = None, connect_timeout: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.long_timeout = long_timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._ids = itertools.count(1)
        self._pinned = pins.context() if pins and self.base_url.startswith("https://") else None
        verify = self._pinned.ssl if self._pinned is not None else True
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # streams on a socket of their own (``stream``): the headers they send, or None with an
        # injected transport (in-process peers, scripted ones in tests), which they go through
        self._direct: dict[str, str] | None = None
        if transport is None:  # ours: the LAN-sized link timeout on every socket (tests inject theirs)
            transport = httpx.AsyncHTTPTransport(verify=verify, limits=limits,
                                                 socket_options=_link_options(connect_timeout))
            self._direct = {"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                            "Accept": p.NDJSON}
        self._client = httpx.AsyncClient(
            verify=verify,
            base_url=self.base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            headers={"authorization": f"Bearer {token}", **_HEADERS},
            limits=limits,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _pin(self) -> None:
        """Pin the peer's certificate before the first request (https peers with pins)."""
        if self._pinned is not None and not self._pinned.pinned:
            await self._pinned.pin(self.base_url, self.name, self.timeout)

    def _timeout(self, timeout: float | None, long: bool = False) -> httpx.Timeout:
        if timeout is None:
            timeout = self.long_timeout if long else self.timeout
        # Connecting is quick on a LAN or never: a lost peer is found in `connect_timeout` at most.
        return httpx.Timeout(timeout, connect=min(timeout, self.timeout, self.connect_timeout))

    # ------------------------------------------------------------ errors
    def translate(self, exc: httpx.HTTPError, method: str) -> TarsError:
        """httpx exception → our tree. The message names the peer and what failed.
        ``details["phase"]`` says whether the call can have reached the peer:
        "connect" or "link" (it did not: safe to serve elsewhere) or "answer"."""
        if isinstance(exc, httpx.ConnectError):
            return self._unavailable("refused", method, str(exc))
        if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
            return self._unavailable("connect-timeout", method)
        code = _link_errno(exc)
        if isinstance(exc, (httpx.WriteError, httpx.WriteTimeout)) or code is not None:
            return self._unavailable("link", method,
                                     os.strerror(code) if code is not None else "the request could not be sent")
        if isinstance(exc, httpx.TimeoutException):
            return self._unavailable("timeout", method)
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.NetworkError)):
            return self._unavailable("broke", method)
        return PeerError(f"{self._who()} failed during {method}: {type(exc).__name__}", peer=self.name)

    def _unavailable(self, kind: str, method: str, why: str = "") -> PeerUnavailable:
        """The one wording of each way a call to this peer fails (httpx's errors and the direct
        stream's alike), with its phase."""
        who = self._who()
        text, phase = {
            "refused": (f"{who} is unreachable: {why or 'connection refused'}", "connect"),
            "connect-timeout": (f"{who} did not connect in time ({method})", "connect"),
            "link": (f"{who} cannot be reached: {why} during {method} (the link is down?)", "link"),
            "timeout": (f"{who} did not answer in time ({method})", "answer"),
            "broke": (f"connection to {who} broke during {method} (did it stop?)", "answer"),
        }[kind]
        return PeerUnavailable(text, peer=self.name, phase=phase)

    def _decode(self, resp: httpx.Response, rid: Any, method: str) -> Any:
        """One HTTP answer → the call's result, or raise the error it carries."""
        return self._decode_body(resp.status_code, resp.content, rid, method)

    def _decode_body(self, status: int, content: bytes, rid: Any, method: str) -> Any:
        if status == 401:
            return self._raise(Unauthorized(
                f"peer {self.name} rejected this node's cluster token; TARS_CLUSTER_TOKEN must be the same on both hosts"))
        try:
            body = p.loads(content)
        except ValueError:
            return self._raise(PeerError(
                f"peer {self.name} answered {method} with HTTP {status} that is not JSON-RPC", peer=self.name))
        if not isinstance(body, dict) or body.get("jsonrpc") != p.JSONRPC:
            return self._raise(PeerError(f"peer {self.name} answered {method} with a non-JSON-RPC body", peer=self.name))
        if "error" in body:
            raise p.error_from_rpc(body["error"], self.name)
        if body.get("id") != rid or "result" not in body:
            return self._raise(PeerError(f"peer {self.name} answered {method} with a mismatched response", peer=self.name))
        return body["result"]

    @staticmethod
    def _raise(exc: TarsError) -> Any:
        raise exc

    # ------------------------------------------------------------ calls
    async def call(self, method: str, params: Any = None, *, timeout: float | None = None,
                   retries: int | None = None) -> Any:
        """One request → its result. Retries (idempotent methods only) on transport errors."""
        idempotent = method in p.IDEMPOTENT_METHODS
        attempts = 1 + (self.retries if retries is None else retries) if idempotent else 1
        long = method.startswith(("inference.", "embed."))
        for attempt in range(attempts):
            rid = next(self._ids)
            body = p.dumps(p.request(method, params, rid))
            try:
                await self._pin()
                resp = await self._client.post("/rpc", content=body, timeout=self._timeout(timeout, long))
            except httpx.HTTPError as exc:
                err = self.translate(exc, method)
                if attempt + 1 < attempts and isinstance(err, PeerUnavailable):
                    await asyncio.sleep(min(self.max_backoff_s, self.backoff_s * 2 ** attempt))
                    continue
                raise err from None
            return self._decode(resp, rid, method)
        raise AssertionError("unreachable")  # pragma: no cover

    async def notify(self, method: str, params: Any = None, *, timeout: float | None = None) -> None:
        """A notification: the peer answers nothing (HTTP 204)."""
        try:
            await self._pin()
            resp = await self._client.post("/rpc", content=p.dumps(p.notification(method, params)),
                                           timeout=self._timeout(timeout))
        except httpx.HTTPError as exc:
            raise self.translate(exc, method) from None
        if resp.status_code == 401:
            self._decode(resp, None, method)
        if resp.status_code not in (200, 204):
            raise PeerError(f"peer {self.name} answered notification {method} with HTTP {resp.status_code}",
                            peer=self.name)

    async def batch(self, calls: list[tuple[str, Any]], *, timeout: float | None = None) -> list[Any]:
        """Several calls in one request; each slot holds its result or its TarsError."""
        ids = [next(self._ids) for _ in calls]
        body = p.dumps([p.request(m, prm, i) for (m, prm), i in zip(calls, ids)])
        try:
            await self._pin()
            resp = await self._client.post("/rpc", content=body, timeout=self._timeout(timeout))
        except httpx.HTTPError as exc:
            raise self.translate(exc, "batch") from None
        if resp.status_code == 401:
            self._decode(resp, None, "batch")
        try:
            answers = p.loads(resp.content)
        except ValueError:
            raise PeerError(f"peer {self.name} answered a batch with a body that is not JSON", peer=self.name) from None
        if isinstance(answers, dict):  # the whole batch was refused
            self._decode(resp, answers.get("id"), "batch")
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        out: list[Any] = []
        for i in ids:
            a = by_id.get(i)
            if a is None:
                out.append(PeerError(f"peer {self.name} left call {i} of a batch unanswered", peer=self.name))
            elif "error" in a:
                out.append(p.error_from_rpc(a["error"], self.name))
            else:
                out.append(a.get("result"))
        return out

    async def embed(self, inputs: list[str], model: str | None = None, normalize: bool = True,
                    *, groups: list[int] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """embed.encode with vectors as base64 float32: a numpy array comes back under
        ``"vectors"`` without a float ever being printed or parsed. ``groups`` marks a
        coalesced call (see rpc/remote.py); the answer then has ``group_tokens``."""
        params: dict[str, Any] = {"input": inputs, "model": model, "normalize": normalize, "encoding": "base64"}
        if groups is not None:
            params["groups"] = groups
        result = await self.call("embed.encode", params, timeout=timeout)
        try:
            result["vectors"] = p.vectors_from_b64(result.pop("vectors_b64"), result.pop("shape"))
        except (KeyError, ValueError, TypeError) as exc:
            raise PeerError(f"peer {self.name} sent unreadable vectors ({exc})", peer=self.name) from None
        return result

    async def stream(self, params: dict[str, Any], *,
                     timeout: float | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """``inference.stream``: yields each token notification's params
        (``{"id","text",["finish_reason"]}``), then ``{"result": completion}`` last.
        A peer that dies mid-stream ends it with PeerUnavailable, never a hang
        (the read timeout bounds a silent peer; the cluster can also cancel).

        On a real socket (no injected transport) the stream is read by ``http1.StreamedPost``
        on a connection of its own, not through httpx: a token costs one read and one
        ``orjson.loads``, not httpx's per-event Python (issue 18.4)."""
        rid = next(self._ids)
        body = p.dumps(p.request(p.STREAM_METHOD, params, rid))
        await self._pin()
        lines = self._direct_lines(body, rid, timeout) if self._direct else self._httpx_lines(body, rid, timeout)
        try:
            async for line in lines:
                if not line:
                    continue
                try:
                    msg = p.loads(line)
                except ValueError:
                    raise PeerError(f"peer {self.name} sent a broken stream line", peer=self.name) from None
                if msg.get("method") == p.TOKEN_METHOD:
                    yield msg.get("params") or {}
                elif "error" in msg:
                    raise p.error_from_rpc(msg["error"], self.name)
                elif "result" in msg:
                    yield {"result": msg["result"]}
                    return
            raise PeerUnavailable(f"peer {self.name} ended the stream without a final result (did it stop?)",
                                  peer=self.name)
        finally:
            await lines.aclose()

    async def _httpx_lines(self, body: bytes, rid: Any, timeout: float | None) -> AsyncGenerator[bytes, None]:
        """The answer's lines through httpx (an injected transport: in-process peers, tests);
        a JSON answer (an error before the first token) as one line."""
        method = p.STREAM_METHOD
        try:
            async with self._client.stream("POST", "/rpc", content=body,
                                           timeout=self._timeout(timeout, long=True)) as resp:
                if p.NDJSON not in resp.headers.get("content-type", ""):
                    await resp.aread()
                    yield p.dumps({"result": self._decode(resp, rid, method)})
                    return
                async for line in resp.aiter_lines():
                    yield line.encode()
        except httpx.HTTPError as exc:
            raise self.translate(exc, method) from None

    async def _direct_lines(self, body: bytes, rid: Any, timeout: float | None) -> AsyncGenerator[bytes, None]:
        """The answer's lines read straight from the socket (``http1.StreamedPost``)."""
        method = p.STREAM_METHOD
        assert self._direct is not None
        url = httpx.URL(self.base_url)
        tls = self._pinned.ssl if self._pinned is not None else (_default_tls() if url.scheme == "https" else None)
        post = StreamedPost(url.host, url.port or (443 if url.scheme == "https" else 80), "/rpc", body,
                            self._direct, ssl=tls, connect_timeout=min(self.timeout, self.connect_timeout),
                            read_timeout=self.long_timeout if timeout is None else timeout,
                            socket_options=_link_options(self.connect_timeout))
        try:
            try:
                await post.open()
            except (OSError, ConnectTimeout) as exc:
                if post.connected:
                    raise
                raise self._connect_failed(exc, method) from None
            if p.NDJSON not in post.headers.get("content-type", ""):
                yield p.dumps({"result": self._decode_body(post.status, await post.read_all(), rid, method)})
                return
            pending = b""
            async for data in post.body():
                pending += data
                cut = pending.rfind(b"\n")
                if cut >= 0:
                    for line in pending[:cut].split(b"\n"):
                        yield line
                    pending = pending[cut + 1:]
            if pending:
                yield pending
        except (OSError, ReadTimeout, asyncio.IncompleteReadError) as exc:
            raise self._broke(exc, method) from None
        finally:
            await post.aclose()

    def _who(self) -> str:
        return f"peer {self.name}" + ("" if self.name == self.base_url else f" ({self.base_url})")

    def _connect_failed(self, exc: Exception, method: str) -> PeerUnavailable:
        if isinstance(exc, ConnectTimeout):
            return self._unavailable("connect-timeout", method)
        return self._unavailable("refused", method, str(exc))

    def _broke(self, exc: Exception, method: str) -> PeerUnavailable:
        """A failure after the connection opened, worded as ``translate`` words httpx's."""
        code = exc.errno if isinstance(exc, OSError) and exc.errno in _LINK_ERRNOS else None
        if code is not None:
            return self._unavailable("link", method, os.strerror(code))
        return self._unavailable("timeout" if isinstance(exc, ReadTimeout) else "broke", method)


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The system's CA-verifying context for an https peer without pins (made once)."""
    return ssl.create_default_context()
