"""OpenAI's Responses API, stateless: ``POST /v1/responses``.

An adapter like the chat routes: the request becomes the one domain request
(``responses_wire``) and goes through the same ``Node`` → routes → target path, so a model
on another host answers through this one, on either engine (llama-server's own
``/v1/responses`` exists on the server engine only; docs/ARCHITECTURE.md, "Dialects").
Errors in OpenAI's shape (api/error_shapes.py); a stream that fails after it started ends
with an ``error`` and a ``response.failed`` event.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..logs import fields, get_logger
from . import responses_wire as rw
from . import schemas as s
from . import tool_drop
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain, first_item, until_disconnect

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


def _body_doc(model: type) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}  # type: ignore[attr-defined]


@router.post("/responses", summary="OpenAI Responses, stateless (stream=true for its events)",
             openapi_extra=_body_doc(rw.ResponsesRequest))
async def responses(request: Request) -> Response:
    node = request.app.state.node
    r = s.parse(rw.ResponsesRequest, await request.body())
    req = r.to_domain()
    label(request, req.model)
    who = {k: v for k in rw.LABELS if (v := getattr(r, k, None))}
    if who:  # labels for the client's own bookkeeping: recorded, nothing else
        log.info("request labelled", extra=fields(model=req.model, **who))
    rid, created = rw.new_id("resp"), s.now()
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
        fmt = rw.ResponseStream(rid, created, model, rw.echo(r, req))
        return EventStream(drain(first, agen, fmt), tool_drop.headers(dropped))
    try:
        c, dropped = await tool_drop.attempt(req, lambda q: until_disconnect(request.receive, node.generate(q)))
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    tool_drop.note(c, dropped)
    return JSON(rw.response_body(c, rid, created, rw.echo(r, req)), headers=tool_drop.headers(dropped))
