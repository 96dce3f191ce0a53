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

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..logs import fields, get_logger
from . import anthropic_wire as aw
from . import schemas as s
from . import tool_drop
from .dialect import body_doc, complete, model_of, open_stream
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


@router.post("/messages", summary="Anthropic Messages (stream=true for its event stream)",
             openapi_extra=body_doc(aw.MessagesRequest))
async def messages(request: Request) -> Response:
    r = s.parse(aw.MessagesRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    who = {k: str(v)[:200] for k, v in (("user", (r.metadata or {}).get("user_id")), ("profile", r.user_profile_id),
                                         ("workspace", r.workspace_id), ("geo", r.inference_geo)) if v}
    if who:  # labels for the client's own bookkeeping: recorded, nothing else
        log.info("request labelled", extra=fields(model=req.model, **who))
    mid = aw.new_id()
    try:
        if req.stream:
            first, agen, dropped = await open_stream(request, req)
            model = model_of(request, req, first)
            label(request, model)
            return EventStream(drain(first, agen, aw.MessageStream(mid, model)), tool_drop.headers(dropped))
        c, dropped = await complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON(aw.message_body(c, mid), headers=tool_drop.headers(dropped))


@router.post("/messages/count_tokens", summary="Anthropic token count of a Messages request",
             openapi_extra=body_doc(aw.CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    """The engine's own count (chat template and tools applied): the prompt of a one-token
    greedy generation, through the same path as a message (llama-server keeps that prompt
    cached, so the message that follows is not slower for it)."""
    r = s.parse(aw.CountTokensRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    try:
        c, dropped = await complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON({"input_tokens": c.usage.prompt_tokens}, headers=tool_drop.headers(dropped))
