"""OpenAI's Responses API, stateless: ``POST /v1/responses``.

An adapter like the chat routes: the request becomes the one domain request
(``responses_wire``) and goes through the same ``Node`` → routes → target path, so a model
on another host answers through this one, on either engine (llama-server's own
``/v1/responses`` exists on the server engine only; docs/ARCHITECTURE.md, "Dialects").
Errors in OpenAI's shape (api/error_shapes.py); a stream that fails after it started ends
with an ``error`` and a ``response.failed`` event.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..logs import fields, get_logger
from . import responses_wire as rw
from . import schemas as s
from . import tool_drop
from .dialect import body_doc, complete, model_of, open_stream
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


@router.post("/responses", summary="OpenAI Responses, stateless (stream=true for its events)",
             openapi_extra=body_doc(rw.ResponsesRequest))
async def responses(request: Request) -> Response:
    r = s.parse(rw.ResponsesRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    who = {k: v for k in rw.LABELS if (v := getattr(r, k, None))}
    if who:  # labels for the client's own bookkeeping: recorded, nothing else
        log.info("request labelled", extra=fields(model=req.model, **who))
    rid, created = rw.new_id("resp"), s.now()
    try:
        if req.stream:
            first, agen, dropped = await open_stream(request, req)
            model = model_of(request, req, first)
            label(request, model)
            fmt = rw.ResponseStream(rid, created, model, rw.echo(r, req))
            return EventStream(drain(first, agen, fmt), tool_drop.headers(dropped))
        c, dropped = await complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    tool_drop.note(c, dropped)
    return JSON(rw.response_body(c, rid, created, rw.echo(r, req)), headers=tool_drop.headers(dropped))
