"""One bearer-token check, constant time: the API key (api/auth.py) and the cluster
token on ``/rpc`` (rpc/server.py) both use it."""

from __future__ import annotations

import hmac


def bearer_matches(header: bytes | str | None, secret: bytes) -> bool:
    """Does ``Authorization: <header>`` carry ``Bearer <secret>``? The scheme is case-
    insensitive; the compare runs even when the scheme is wrong or the header missing, so
    timing says nothing. An empty ``secret`` matches nothing."""
    if isinstance(header, str):
        header = header.encode("latin-1", "replace")
    scheme, _, got = (header or b"").partition(b" ")
    same = hmac.compare_digest(got.strip(), secret)
    return scheme.lower() == b"bearer" and same and bool(secret)
