"""What every dialect's route does the same way: document its request model for
``/openapi.json``, and run one generation (whole or streamed) through the node with the
tools fallback (``tool_drop``) and a client that may go away (``ClientGone`` → 499).

API::

    body_doc(model) -> dict                              # a route's openapi_extra
    await complete(request, req) -> (Completion, reason)
    await open_stream(request, req) -> (first, agen, reason)   # first item already read
    model_of(request, req, first) -> str                 # the model a stream answers with
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from ..domain import Completion, GenerateRequest
from . import tool_drop
from .streaming import first_item, until_disconnect


def body_doc(model: type) -> dict[str, Any]:
    """The ``requestBody`` of a route that reads its body itself (one pydantic pass)."""
    return {"requestBody": {"content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}  # type: ignore[attr-defined]


async def complete(request: Request, req: GenerateRequest) -> tuple[Completion, str | None]:
    node = request.app.state.node
    return await tool_drop.attempt(req, lambda q: until_disconnect(request.receive, node.generate(q)))


async def open_stream(request: Request, req: GenerateRequest) -> tuple[Any, Any, str | None]:
    node = request.app.state.node

    async def start(q: GenerateRequest) -> tuple[Any, Any]:
        agen = node.stream(q)
        return await first_item(request.receive, agen), agen

    (first, agen), dropped = await tool_drop.attempt(req, start)
    return first, agen, dropped


def model_of(request: Request, req: GenerateRequest, first: Any) -> str:
    return getattr(first, "model", None) or request.app.state.node.resolve(req.model, "chat").model
