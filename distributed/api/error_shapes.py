"""Each dialect's own error shape, chosen by the request path, in one place.

The HTTP status comes from the error's class (``TarsError.http_status``, by type); this
module only writes the body a dialect's clients parse:

- native (``/inference``, ``/embed``, ``/status``, ...): ``{"error": {"type", "message", "details"}, "node", "via"}``
- OpenAI (``/v1/*``): ``{"error": {"message", "type", "param", "code"}}``
- Anthropic (``/v1/messages*``): ``{"type": "error", "error": {"type", "message"}}`` — the
  ``anthropic`` SDK maps its error ``type`` (invalid_request_error, authentication_error,
  not_found_error, request_too_large, rate_limit_error, api_error, overloaded_error)
- Ollama (``/api/*``): ``{"error": "<message>"}`` (api/ollama_answers.py)

A dialect added later (Ollama's ``/api/*``) registers its prefix and renderer in ``SHAPES``.

API::

    error_json(exc, node, path) -> bytes
    shape_of(path) -> str
    anthropic_error(exc) -> dict
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from ..errors import TarsError
from .ollama_answers import ollama_error
from .schemas import native_error, openai_error

_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 409: "invalid_request_error", 413: "request_too_large",
                    415: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error(exc: TarsError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(exc.http_status, "api_error"),
                                       "message": exc.message}}


def _anthropic(exc: TarsError, node: str) -> dict[str, Any]:
    return {**anthropic_error(exc), "node": node, "via": node}


# (path prefix, shape name, renderer): the first prefix that matches wins, so longer ones first.
SHAPES: list[tuple[str, str, Callable[[TarsError, str], dict[str, Any]]]] = [
    ("/v1/messages", "anthropic", _anthropic),
    ("/v1/", "openai", openai_error),
    ("/api/", "ollama", ollama_error),
]


def shape_of(path: str) -> str:
    return next((name for prefix, name, _ in SHAPES if path.startswith(prefix)), "native")


def error_json(exc: TarsError, node: str, path: str) -> bytes:
    render = next((fn for prefix, _, fn in SHAPES if path.startswith(prefix)), native_error)
    return orjson.dumps(render(exc, node), default=str)
