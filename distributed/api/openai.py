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

import asyncio
import dataclasses
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..domain import Completion, GenerateRequest
from ..errors import TarsError, ValidationFailed
from ..logs import fields, get_logger
from ..streams import drain_choices
from . import chat_surface as cs
from . import schemas as s
from . import tool_drop
from .dialect import body_doc, check_images
from .native import JSON, label
from .streaming import ClientGone, EventStream, first_item, until_disconnect

log = get_logger(__name__)
router = APIRouter(prefix="/v1")


def _node(request: Request) -> Any:
    return request.app.state.node


@router.get("/models", summary="Models (OpenAI list shape)")
async def list_models(request: Request) -> Response:
    node = _node(request)
    return JSON(s.models_list_body(node.models(), node.name))


@router.post("/chat/completions", summary="Chat completion (stream=true for SSE)",
             openapi_extra=body_doc(cs.ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    r = s.parse(cs.ChatCompletionRequest, await request.body())
    req = r.to_domain()
    check_images(request, req.model, req.messages)  # image_url parts: inline, and only to a model that sees
    return await _generate(request, "chat", req, r.stream_options, r)


@router.post("/completions", summary="Text completion (stream=true for SSE)",
             openapi_extra=body_doc(cs.CompletionRequest))
async def completions(request: Request) -> Response:
    r = s.parse(cs.CompletionRequest, await request.body())
    return await _generate(request, "completion", r.to_domain(), r.stream_options, r)


def _fan_out(req: GenerateRequest) -> list[GenerateRequest]:
    """n choices are n requests of one choice each (an engine's slots run them side by
    side); a seed gives choice i the seed + i, so the choices differ yet repeat. Choices
    after the first carry their index: a queue that admitted the first takes them too."""
    if req.n == 1:
        return [req]
    return [dataclasses.replace(req, n=1, choice=i, seed=None if req.seed is None else req.seed + i)
            for i in range(req.n)]


async def _generate(request: Request, kind: Literal["chat", "completion"], req: GenerateRequest,
                    stream_options: cs.StreamOptions | None, body: Any) -> Response:
    node = _node(request)
    label(request, req.model)
    who = {k: v for k in cs.LABELS if (v := getattr(body, k, None))}
    if who:  # labels a client puts on a request (abuse monitoring, its own bookkeeping): recorded, nothing else
        log.info("request labelled", extra=fields(model=req.model, **who))
    rid = s.new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = s.now()
    if req.stream:
        try:
            (reqs, agens, firsts), dropped = await tool_drop.attempt(req, lambda r: _start(request, r))
        except ClientGone:
            return Response(status_code=499)
        model = firsts[0].model if isinstance(firsts[0], Completion) else node.resolve(req.model, "chat").model
        label(request, model)
        include_usage = bool(stream_options and stream_options.include_usage)
        encs = [cs.ChunkEncoder(kind, model, rid, created, i) for i in range(len(reqs))]

        def end(completions: list[Completion]) -> bytes:  # after the last choice's finish chunk
            return (encs[0].usage(completions) if include_usage else b"") + b"data: [DONE]\n\n"

        fmts = [_OpenAISse(enc, node.name) for enc in encs]
        return EventStream(drain_choices(firsts, agens, fmts, end), tool_drop.headers(dropped))
    try:
        results, dropped = await tool_drop.attempt(req, lambda r: _complete(request, r))
    except ClientGone:
        return Response(status_code=499)
    label(request, results[0].model)
    for c in results:
        tool_drop.note(c, dropped)
    body_fn = cs.chat_completion_body if kind == "chat" else cs.completion_body
    return JSON(body_fn(results, rid, created), headers=tool_drop.headers(dropped))


async def _start(request: Request, req: GenerateRequest) -> tuple[list[GenerateRequest], list[Any], list[Any]]:
    """Open the streams of ``req``'s choices. The first item of the first choice decides
    between an HTTP error and a stream; the other choices start inside the stream (an
    engine with one slot runs them in turn)."""
    node = _node(request)
    reqs = _fan_out(req)
    agens = [node.stream(r) for r in reqs]
    firsts: list[Any] = [None] * len(reqs)
    try:
        firsts[0] = await first_item(request.receive, agens[0])
    except BaseException:
        for agen in agens[1:]:
            await agen.aclose()
        raise
    return reqs, agens, firsts


async def _complete(request: Request, req: GenerateRequest) -> list[Completion]:
    node = _node(request)
    reqs = _fan_out(req)
    if len(reqs) == 1:
        return [await until_disconnect(request.receive, node.generate(req))]
    return await until_disconnect(request.receive, _gather([node.generate(r) for r in reqs]))


async def _gather(works: list[Any]) -> list[Completion]:
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # one failed (or we were cancelled): the others stop too
        for t in tasks:
            t.cancel()


class _OpenAISse:
    """One choice's OpenAI SSE chunks (``streams.drain_choices`` runs the loop, as ``drain``
    does for /inference and /rpc; the usage chunk and ``[DONE]`` come after every choice)."""

    def __init__(self, enc: cs.ChunkEncoder, node: str) -> None:
        self.enc, self.node = enc, node

    def start(self) -> bytes | None:
        return self.enc.role() if self.enc.kind == "chat" else None

    def token(self, item: Any) -> bytes:
        return self.enc.piece(item)

    def done(self, c: Completion) -> bytes:
        return self.enc.finish(c)

    def error(self, exc: TarsError | None) -> bytes:
        return _error_event(exc or TarsError("internal error during generation; see the node's log"), self.node)


def _error_event(exc: TarsError, node: str) -> bytes:
    return b"data: " + s.error_json(exc, node, openai=True) + b"\n\ndata: [DONE]\n\n"


@router.post("/embeddings", summary="Embeddings (float or base64)", openapi_extra=body_doc(s.EmbeddingsRequest))
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
