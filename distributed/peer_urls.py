"""What the cluster channel accepts from a peer: names, URLs, a join's origin, VRAM claims.

The ``/rpc`` channel needs the cluster token, but a token holder is still not trusted
blindly (a misconfigured or compromised host must not redirect or poison the others):

* ``check_name``: node names are ``[A-Za-z0-9._-]{1,64}`` (what ``TARS_NODE_NAME`` accepts);
* ``check_url``: a peer URL is a base URL — ``http`` or ``https``, a host, an optional
  port, no user info, no path beyond ``/``, no query or fragment;
* ``check_join_origin``: the URL a host joins with must point back at the address the
  join came from (an IP literal equal to it, or a name resolving to it; loopback counts
  as one machine), so a host cannot make the server call a third party;
* ``vram_doubt``/``recheck_vram``: a host's join profile is checked against the live GPU
  figures it sends with the join and with every heartbeat; while it claims far more VRAM
  than they report (over 10% + 256 MB) it gets no model. A peer that sends no live figures
  (a version before them) is taken at its word;
* ``safe``: any peer-supplied text put into a log line has its control characters
  escaped (a newline in a name must not forge a log line).

``ORIGIN`` holds the client address of the HTTP request being served (set by
``api/guards.py``), so the cluster's RPC handlers can check a join against it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from .errors import ValidationFailed

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ORIGIN: ContextVar[str | None] = ContextVar("tars_request_origin", default=None)
RESOLVE_TIMEOUT_S = 3.0
VRAM_SLACK = 1.10  # a claim up to 10% (+256 MB) over the live total agrees
VRAM_SLACK_MB = 256

_CONTROL = {i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F, 0x85]} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def safe(value: Any, limit: int = 200) -> str:
    """``value`` as text fit for one log line: control characters escaped, length capped."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.translate(_CONTROL)


def check_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValidationFailed(f"'{field}' must be 1-64 letters, digits, '.', '_' or '-' (got {safe(name, 80)!r})",
                               field=field)
    return name


def check_url(url: Any, field: str = "url") -> str:
    """A peer's base URL, normalised (no trailing slash), or ValidationFailed naming ``field``."""
    if not isinstance(url, str) or not url or len(url) > 300:
        raise ValidationFailed(f"'{field}' must be a base URL such as http://192.168.1.10:8000", field=field)
    shown = safe(url, 120)
    bad = f"'{field}' ({shown!r}) is not a peer base URL (http[s]://HOST[:PORT], no path, query or user)"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise ValidationFailed(bad, field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationFailed(bad, field=field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None \
            or parts.password is not None or parts.path not in ("", "/") or parts.query or parts.fragment \
            or "?" in url or "#" in url:
        raise ValidationFailed(bad, field=field)
    if port is not None and not 1 <= port <= 65535:
        raise ValidationFailed(bad, field=field)
    host = parts.hostname
    if not _ip(host) and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*\.?", host):
        raise ValidationFailed(bad, field=field)
    return url.rstrip("/")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


def _same_host(a: Any, b: Any) -> bool:
    return a == b or (a.is_loopback and b.is_loopback)


async def check_join_origin(url: str, origin: str | None = None) -> None:
    """Refuse a join whose URL does not point back at the address it came from.

    ``origin`` defaults to ``ORIGIN`` (the client address of the request being served);
    with no known origin (an in-process call) there is nothing to compare with."""
    origin = origin if origin is not None else ORIGIN.get()
    src = _ip(origin or "")
    if src is None:
        return
    host = urlsplit(url).hostname or ""
    ip = _ip(host)
    if ip is not None:
        if _same_host(ip, src):
            return
        addrs: list[Any] = [ip]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError):
            raise ValidationFailed(f"the join URL's host '{safe(host, 80)}' does not resolve here; set "
                                   f"TARS_ADVERTISE_URL on the joining host to the address it has on the LAN "
                                   f"(this join came from {src})", field="url") from None
        addrs = [a for a in (_ip(str(i[4][0])) for i in infos) if a is not None]
        if any(_same_host(a, src) for a in addrs):
            return
    raise ValidationFailed(f"the join URL {safe(url, 120)} points at {', '.join(map(str, addrs[:4]))}, but the join "
                           f"came from {src}; set TARS_ADVERTISE_URL on the joining host to its own address",
                           field="url")


def _total_vram(gpus: Any) -> int | None:
    """Sum of ``vram_total_mb`` over a list of GPU dicts/objects (None if unreadable)."""
    total = 0
    for g in gpus or []:
        v = g.get("vram_total_mb") if isinstance(g, dict) else getattr(g, "vram_total_mb", None)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            return None
        total += int(v)
    return total


def vram_doubt(profile: Any, live_gpus: Any) -> str | None:
    """Why ``profile`` (from a join) is not believed given the live GPU figures, or None."""
    if profile is None or live_gpus is None:
        return None  # nothing to compare with (no heartbeat yet, or an older peer)
    claimed = _total_vram(getattr(profile, "gpus", None))
    live = _total_vram(live_gpus)
    if claimed is None or live is None:
        return "its GPU figures are unreadable"
    if claimed > live * VRAM_SLACK + VRAM_SLACK_MB:
        return f"its join profile claims {claimed} MB of VRAM but its heartbeats report {live} MB"
    return None


def recheck_vram(peer: Any, log: Any = None) -> bool:
    """Update ``peer.vram_doubt`` from its profile and live figures; True when it changed
    (the planner should re-plan: the peer gains or loses the right to hold models)."""
    doubt = vram_doubt(getattr(peer, "profile", None), getattr(peer, "gpus", None))
    old = getattr(peer, "vram_doubt", None)
    peer.vram_doubt = doubt
    if doubt == old:
        return False
    if log is not None:
        if doubt:
            log.warning("peer %s is given no models: %s", safe(peer.name), doubt)
        else:
            log.info("peer %s: its VRAM figures agree with its profile", safe(peer.name))
    return (doubt is None) != (old is None)


def trusted(peer: Any) -> bool:
    """May the planner give ``peer`` models?"""
    return not getattr(peer, "vram_doubt", None)
