"""Request guards for a node on a LAN that browsers also reach (pure ASGI, the outermost layer).

Checked before anything else reads the request, in one pass over the headers:

* **one** ``Authorization`` header: two are refused (400) rather than read one way by
  the API-key check and another by ``/rpc``;
* the ``Host`` header names this node (DNS rebinding: a page from ``evil.example`` whose
  name was re-pointed at this LAN address sends ``Host: evil.example``). Accepted: IP
  literals that are loopback or the address the connection arrived on (or the bind /
  advertised address), single-label names (``localhost``, ``pc1``: a rebinding page needs a
  public domain it controls, which has a dot), this node's name and the machine's host name
  with any domain after them (``pc1.lan``), the advertised host, and ``TARS_ALLOWED_HOSTS``
  (a name, ``.suffix`` for a domain and its subdomains, or ``*`` for anything).
  ``/rpc`` is exempt: it needs the cluster token, which no browser page holds, and peers
  address each other by whatever name their ``TARS_PEERS`` says;
* state-changing requests need ``Content-Type: application/json`` (415 otherwise): every
  POST, and a PUT, PATCH or DELETE that carries a body, so a cross-site ``<form>`` or
  ``text/plain`` fetch cannot run a generation (a bodiless ``DELETE /models/x`` needs no
  type: browsers preflight DELETE, and this node answers no CORS preflight). ``/rpc`` is
  exempt for the same reason as above.

``HEAD /health`` is answered like ``GET /health`` without the body (load balancers).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import TarsError, UnsupportedMediaType, ValidationFailed
from ..peer_urls import ORIGIN
from .schemas import error_json

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
EXEMPT = ("/rpc",)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def split_host(header: str) -> str:
    """``Host`` header value → the host part, lower case, without port or IPv6 brackets."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


class HostPolicy:
    """Which ``Host`` values this node answers to."""

    def __init__(self, node_name: str, bind_host: str = "", advertise_url: str = "",
                 allowed: Iterable[str] = ()) -> None:
        hostname = socket.gethostname().lower()
        short = hostname.split(".")[0]
        self.any = False
        self.names: set[str] = {"localhost", node_name.lower(), hostname, short}
        self.prefixes = tuple({f"{short}."} | {f"{node_name.lower()}."})  # pc1.lan, pc1.fritz.box
        self.suffixes: tuple[str, ...] = (".localhost",)
        self.ips: set[str] = set()
        for h in (bind_host, urlsplit(advertise_url).hostname or ""):
            if h:
                self._add(h.lower())
        for entry in allowed:
            entry = entry.strip().lower()
            if entry == "*":
                self.any = True
            elif entry.startswith("."):
                self.suffixes += (entry,)
                self.names.add(entry[1:])
            elif entry:
                self._add(split_host(entry))

    def _add(self, host: str) -> None:
        ip = _ip(host)
        if ip is None:
            self.names.add(host)
        elif not ip.is_unspecified:
            self.ips.add(str(ip))

    def allows(self, host: str, local_addr: str | None = None) -> bool:
        if self.any or not host:
            return True
        ip = _ip(host)
        if ip is not None:
            if ip.is_loopback or str(ip) in self.ips:
                return True
            local = _ip(local_addr or "")
            return local is not None and (local == ip or (ip.version == 6 and local == getattr(ip, "ipv4_mapped", None)))
        if host == (local_addr or "").lower():  # in-process transports put the URL's host in scope["server"]
            return True
        if "." not in host:  # a single label cannot be a public domain an attacker re-points at us
            return True
        return host in self.names or host.startswith(self.prefixes) or host.endswith(self.suffixes)


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class Guards:
    """Duplicate Authorization, Host check, JSON-only state changes, HEAD /health."""

    def __init__(self, app: ASGIApp, *, node_name: str, hosts: HostPolicy) -> None:
        self.app = app
        self.node_name = node_name
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        try:
            self.check(scope)
        except TarsError as exc:
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
            await send({"type": "http.response.body", "body": error_json(exc, self.node_name, path.startswith("/v1/"))})
            return
        if scope["method"] == "HEAD" and path == "/health":
            await self.app(dict(scope, method="GET"), receive, _bodiless(send))
            return
        if path.startswith(EXEMPT):  # /rpc: its handlers check a join against the caller's address
            client = scope.get("client")
            token = ORIGIN.set(client[0] if client else None)
            try:
                await self.app(scope, receive, send)
            finally:
                ORIGIN.reset(token)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> None:
        path: str = scope["path"]
        auth = 0
        host = ""
        ctype: bytes | None = None
        body = scope["method"] == "POST"
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth += 1
            elif k == b"host":
                host = v.decode("latin-1")
            elif k == b"content-type":
                ctype = v
            elif (k == b"content-length" and v.strip() not in (b"", b"0")) or k == b"transfer-encoding":
                body = True
        if auth > 1:
            raise ValidationFailed("the request has more than one Authorization header; send exactly one",
                                   field="authorization")
        if path.startswith(EXEMPT):
            return
        server = scope.get("server") or (None, None)
        h = split_host(host)
        if not self.hosts.allows(h, server[0]):
            raise ValidationFailed(f"this node does not answer to the host name '{h[:100]}' (Host header); "
                                   "add it to TARS_ALLOWED_HOSTS if it is really this node's name", field="host")
        if body and scope["method"] in STATE_CHANGING and (ctype is None or _media_type(ctype) != "application/json"):
            got = "none" if ctype is None else repr(_media_type(ctype)[:100])
            raise UnsupportedMediaType(f"{scope['method']} {path} needs 'Content-Type: application/json' "
                                       f"(got {got})", field="content-type")


def _bodiless(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return wrapped


def host_policy(settings: Any) -> HostPolicy:
    return HostPolicy(settings.node_name, settings.host, settings.base_url, getattr(settings, "allowed_hosts", ()))
