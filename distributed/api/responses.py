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

from ..domain import Completion
from . import responses_wire as rw
from . import schemas as s
from . import tool_drop
from .dialect import answer, body_doc, check_images, log_labels, read

router = APIRouter(prefix="/v1")


@router.post("/responses", summary="OpenAI Responses, stateless (stream=true for its events)",
             openapi_extra=body_doc(rw.ResponsesRequest))
async def responses(request: Request) -> Response:
    r, req = await read(request, rw.ResponsesRequest)
    log_labels(req.model, {k: v for k in rw.LABELS if (v := getattr(r, k, None))})
    check_images(request, req.model, r.input if isinstance(r.input, list) else None, where="input")  # input_image
    rid, created = rw.new_id("resp"), s.now()

    def whole(c: Completion, dropped: str | None) -> dict[str, Any]:
        tool_drop.note(c, dropped)
        return rw.response_body(c, rid, created, rw.echo(r, req))

    return await answer(request, req, lambda model: rw.ResponseStream(rid, created, model, rw.echo(r, req)), whole)
