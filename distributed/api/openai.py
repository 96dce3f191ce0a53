"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Shapes follow what the official ``openai`` Python client parses; errors on
``/v1/*`` use OpenAI's ``{"error": {"message","type","param","code"}}`` (app.py).
Streams are ``data: <chunk>`` lines ending with ``data: [DONE]``; each token
costs one orjson call on the token text (``schemas.ChunkEncoder``). Answers carry
``node`` (computing host) and ``via`` (receiving host) as extra fields, which
the client ignores. ``/v1/embeddings`` honours ``encoding_format: "base64"``
(the client's default): little-endian float32 rows, straight from the array.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..domain import Completion
from ..errors import TarsError, ValidationFailed
from ..logs import get_logger
from . import schemas as s
from .native import JSON, label
from .streaming import ClientGone, EventStream, first_item, until_disconnect

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


def _node(request: Request) -> Any:
    return request.app.state.node


def _body_doc(model: type) -> dict[str, Any]:
    return {"requestBody": {"content": {"application/json": {
        "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}}}  # type: ignore[attr-defined]


@router.get("/models", summary="Models (OpenAI list shape)")
async def list_models(request: Request) -> Response:
    node = _node(request)
    return JSON(s.models_list_body(node.models(), node.name))


@router.post("/chat/completions", summary="Chat completion (stream=true for SSE)",
             openapi_extra=_body_doc(s.ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    r = s.parse(s.ChatCompletionRequest, await request.body())
    return await _generate(request, "chat", r.to_domain(), r.stream_options)


@router.post("/completions", summary="Text completion (stream=true for SSE)",
             openapi_extra=_body_doc(s.CompletionRequest))
async def completions(request: Request) -> Response:
    r = s.parse(s.CompletionRequest, await request.body())
    return await _generate(request, "completion", r.to_domain(), r.stream_options)


async def _generate(request: Request, kind: Literal["chat", "completion"], req: Any,
                    stream_options: s.StreamOptions | None) -> Response:
    node = _node(request)
    label(request, req.model)
    rid = s.new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = s.now()
    if req.stream:
        agen = node.stream(req)
        try:
            first = await first_item(request.receive, agen)
        except ClientGone:
            return Response(status_code=499)
        model = first.model if isinstance(first, Completion) else node.resolve(req.model, "chat").model
        label(request, model)
        enc = s.ChunkEncoder(kind, model, rid, created)
        include_usage = bool(stream_options and stream_options.include_usage)
        return EventStream(_chunks(enc, first, agen, include_usage, node.name))
    try:
        c = await until_disconnect(request.receive, node.generate(req))
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    body = s.chat_completion_body(c, rid, created) if kind == "chat" else s.completion_body(c, rid, created)
    return JSON(body)


async def _chunks(enc: s.ChunkEncoder, first: Any, agen: AsyncIterator[Any], include_usage: bool,
                  node: str) -> AsyncIterator[bytes]:
    item = first
    try:
        if enc.kind == "chat":
            yield enc.role()
        while True:
            if isinstance(item, Completion):
                yield enc.final(item, include_usage)
                return
            yield enc.token(item.text)
            item = await agen.__anext__()
    except StopAsyncIteration:
        yield _error_event(TarsError("the stream ended without a final result"), node)
    except TarsError as exc:
        yield _error_event(exc, node)
    except Exception:  # noqa: BLE001 - the client gets a generic message, the log the traceback
        log.exception("stream failed after its first token")
        yield _error_event(TarsError("internal error during generation; see the node's log"), node)
    finally:
        await agen.aclose()


def _error_event(exc: TarsError, node: str) -> bytes:
    return b"data: " + s.error_json(exc, node, openai=True) + b"\n\ndata: [DONE]\n\n"


@router.post("/embeddings", summary="Embeddings (float or base64)", openapi_extra=_body_doc(s.EmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    node = _node(request)
    r = s.parse(s.EmbeddingsRequest, await request.body())
    req = r.to_domain(request.app.state.settings.embed_max_inputs)
    label(request, req.model)
    result = await node.embed(req)
    label(request, result.model)
    if r.dimensions is not None and r.dimensions != result.dim:
        raise ValidationFailed(f"model '{result.model}' returns {result.dim}-dimensional vectors; "
                               f"'dimensions' must be {result.dim} or omitted", field="dimensions")
    return JSON(s.embeddings_json(result, r.encoding_format))
