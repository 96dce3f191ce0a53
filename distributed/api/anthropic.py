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

from . import anthropic_wire as aw
from . import tool_drop
from .dialect import answer, body_doc, check_images, complete, log_labels, read
from .native import JSON, label
from .streaming import ClientGone

router = APIRouter(prefix="/v1")


@router.post("/messages", summary="Anthropic Messages (stream=true for its event stream)",
             openapi_extra=body_doc(aw.MessagesRequest))
async def messages(request: Request) -> Response:
    r, req = await read(request, aw.MessagesRequest)
    check_images(request, req.model, aw.raw_messages(r))  # image blocks: only to a model that sees
    who = {k: str(v)[:200] for k, v in (("user", (r.metadata or {}).get("user_id")), ("profile", r.user_profile_id),
                                         ("workspace", r.workspace_id), ("geo", r.inference_geo)) if v}
    log_labels(req.model, who)
    mid = aw.new_id()
    return await answer(request, req, lambda model: aw.MessageStream(mid, model),
                        lambda c, dropped: aw.message_body(c, mid))


@router.post("/messages/count_tokens", summary="Anthropic token count of a Messages request",
             openapi_extra=body_doc(aw.CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    """The engine's own count (chat template and tools applied): the prompt of a one-token
    greedy generation, through the same path as a message (llama-server keeps that prompt
    cached, so the message that follows is not slower for it)."""
    r, req = await read(request, aw.CountTokensRequest)
    check_images(request, req.model, aw.raw_messages(r))
    try:
        c, dropped = await complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON({"input_tokens": c.usage.prompt_tokens}, headers=tool_drop.headers(dropped))
