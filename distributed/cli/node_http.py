"""How the ``tars`` commands talk to a running node over its HTTP API (``tars status``,
``tars bench``, ``tars deploy``/``rm``/``ps``): the options that say where the node is and
its API key, one call (``call_node``), and one clear ``TarsError`` for each way a call can
fail (never a traceback).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from ..errors import PeerError, PeerUnavailable, RequestTimeout, Unauthorized

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ARG = typer.Argument(DEFAULT_URL, help="Base URL of a node, e.g. http://192.168.1.10:8000.")
KEY_OPT = typer.Option("", "--api-key", envvar="TARS_API_KEY", show_default=False,
                       help="The node's TARS_API_KEY, when it has one (default: $TARS_API_KEY).")


def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def fail_for(resp: Any, url: str) -> None:
    """Raise the right TarsError for a non-2xx answer (never a traceback to the user)."""
    if resp.status_code < 400:
        return
    if resp.status_code == 401:
        raise Unauthorized(f"{url} wants an API key: pass --api-key KEY or set TARS_API_KEY")
    try:
        body = resp.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
    except ValueError:
        msg = resp.text[:300]
    raise PeerError(f"{resp.request.method} {resp.request.url} answered HTTP {resp.status_code}: {msg}")


def unreachable(url: str, exc: Exception) -> PeerUnavailable:
    return PeerUnavailable(
        f"cannot reach the node at {url} ({type(exc).__name__}: {exc or 'no answer'}); is it running? "
        "Start it with ./run_pc1.sh (or `tars serve`), and check the address and port", peer=url)


def call_node(method: str, url: str, path: str, api_key: str = "", body: Any = None, timeout: float = 30.0) -> Any:
    """``method path`` on the node at ``url`` (``body`` sent as JSON): its JSON answer, or the
    TarsError that says what went wrong and what to do."""
    import httpx

    url = url.rstrip("/")
    headers = auth_headers(api_key)
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        resp = httpx.request(method, f"{url}{path}", headers=headers, timeout=timeout,
                             content=None if body is None else json.dumps(body))
    except httpx.TimeoutException as exc:
        raise RequestTimeout(f"{url}{path} gave no answer within {timeout:g}s") from exc
    except httpx.TransportError as exc:
        raise unreachable(url, exc) from exc
    fail_for(resp, url)
    return resp.json()
