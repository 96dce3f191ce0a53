"""The API key: with ``TARS_API_KEY`` set, every endpoint but the public ones needs
``Authorization: Bearer <key>`` or, as Anthropic's clients send it, ``x-api-key: <key>``.

Public: ``/health`` (load balancers and ``tars status`` probe it), the dashboard
page and its static assets (a browser cannot attach a bearer header to a
``<script>`` tag; the page itself asks for the key and sends it with its API
calls), and ``/rpc``, which has its own cluster-token check (rpc/server.py).
The comparison is constant-time (``bearer.bearer_matches``, shared with ``/rpc``).
"""

from __future__ import annotations

import hmac

from ..bearer import bearer_matches
from ..errors import Unauthorized

PUBLIC_PATHS = frozenset({"/health", "/", "/dashboard", "/dashboard/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/dashboard/static/", "/rpc")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class ApiKey:
    """Checks the bearer token of a request against the configured key (bytes, once)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")

    @property
    def enabled(self) -> bool:
        return bool(self._key)

    def check(self, path: str, authorization: bytes | None, x_api_key: bytes | None = None) -> None:
        """Raise Unauthorized unless ``path`` is public or a header carries the key
        (``Authorization: Bearer``, else ``x-api-key``)."""
        if not self._key or is_public(path):
            return
        if authorization:
            if not bearer_matches(authorization, self._key):  # constant time; the /rpc token check uses it too
                raise Unauthorized("the API key is wrong: send 'Authorization: Bearer <TARS_API_KEY>'")
            return
        if x_api_key:
            if not hmac.compare_digest(x_api_key.strip(), self._key):  # constant time
                raise Unauthorized("the API key is wrong: send 'x-api-key: <TARS_API_KEY>'")
            return
        raise Unauthorized("this node requires an API key: send 'Authorization: Bearer <TARS_API_KEY>' "
                           "(or 'x-api-key: <TARS_API_KEY>')")
