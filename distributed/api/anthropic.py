"""Anthropic's Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

An adapter like the OpenAI routes: the request becomes the one domain request
(``anthropic_wire.translate``) and goes through the same ``Node`` → routes → target path, so
a model on another host answers through this one, on either engine. Why not forward to
llama-server's own ``/v1/messages``: only the server engine has it (not the in-process
engine, not a peer reached over /rpc), and its answers would bypass our queue, errors and
metrics (docs/ARCHITECTURE.md, "Dialects"). Auth: ``x-api-key`` as well as Bearer (the edge,
api/auth.py). Errors in Anthropic's shape (api/error_shapes.py), streamed ones as an
``error`` event.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..logs import fields, get_logger
from . import anthropic_wire as aw
from . import schemas as s
from . import tool_drop
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain, first_item, until_disconnect

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


def _body_doc(model: type) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}  # type: ignore[attr-defined]


@router.post("/messages", summary="Anthropic Messages (stream=true for its event stream)",
             openapi_extra=_body_doc(aw.MessagesRequest))
async def messages(request: Request) -> Response:
    node = request.app.state.node
    r = s.parse(aw.MessagesRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    who = {k: str(v)[:200] for k, v in (("user", (r.metadata or {}).get("user_id")), ("profile", r.user_profile_id),
                                         ("workspace", r.workspace_id), ("geo", r.inference_geo)) if v}
    if who:  # labels for the client's own bookkeeping: recorded, nothing else
        log.info("request labelled", extra=fields(model=req.model, **who))
    mid = aw.new_id()
    if req.stream:
        async def start(q: Any) -> tuple[Any, Any]:
            agen = node.stream(q)
            return await first_item(request.receive, agen), agen

        try:
            (first, agen), dropped = await tool_drop.attempt(req, start)
        except ClientGone:
            return Response(status_code=499)
        model = getattr(first, "model", None) or node.resolve(req.model, "chat").model
        label(request, model)
        return EventStream(drain(first, agen, aw.MessageStream(mid, model)), tool_drop.headers(dropped))
    try:
        c, dropped = await tool_drop.attempt(req, lambda q: until_disconnect(request.receive, node.generate(q)))
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON(aw.message_body(c, mid), headers=tool_drop.headers(dropped))


@router.post("/messages/count_tokens", summary="Anthropic token count of a Messages request",
             openapi_extra=_body_doc(aw.CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    """The engine's own count (chat template and tools applied): the prompt of a one-token
    greedy generation, through the same path as a message (llama-server keeps that prompt
    cached, so the message that follows is not slower for it)."""
    node = request.app.state.node
    r = s.parse(aw.CountTokensRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    try:
        c, dropped = await tool_drop.attempt(req, lambda q: until_disconnect(request.receive, node.generate(q)))
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON({"input_tokens": c.usage.prompt_tokens}, headers=tool_drop.headers(dropped))
