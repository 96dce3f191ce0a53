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
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..domain import Completion, GenerateRequest
from ..errors import TarsError, ValidationFailed
from ..logs import fields, get_logger
from . import chat_surface as cs
from . import schemas as s
from . import tool_drop
from .dialect import body_doc
from .native import JSON, label
from .streaming import ClientGone, EventStream, drain, first_item, until_disconnect

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
    return await _generate(request, "chat", r.to_domain(), r.stream_options, r)


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
        headers = tool_drop.headers(dropped)
        if len(reqs) == 1:
            return EventStream(_chunks(encs[0], firsts[0], agens[0], include_usage, node.name), headers)
        return EventStream(_merged(encs, firsts, agens, include_usage, node.name), headers)
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


async def _events(enc: cs.ChunkEncoder, first: Any, agen: AsyncIterator[Any]) -> AsyncIterator[tuple[bytes, Any]]:
    """One choice's SSE events; the Completion comes last, with b"" as its event."""
    if enc.kind == "chat":
        yield enc.role(), None
    item = first if first is not None else await agen.__anext__()
    while True:
        if isinstance(item, Completion):
            yield enc.finish(item), item
            return
        data = enc.piece(item)
        if data:
            yield data, None
        item = await agen.__anext__()


class _OpenAISse:
    """One choice's OpenAI SSE chunks (``streams.drain`` runs the loop, as for /inference and /rpc)."""

    def __init__(self, enc: cs.ChunkEncoder, include_usage: bool, node: str) -> None:
        self.enc, self.include_usage, self.node = enc, include_usage, node

    def start(self) -> bytes | None:
        return self.enc.role() if self.enc.kind == "chat" else None

    def token(self, item: Any) -> bytes:
        return self.enc.piece(item)

    def done(self, c: Completion) -> bytes:
        return self.enc.finish(c) + (self.enc.usage([c]) if self.include_usage else b"") + b"data: [DONE]\n\n"

    def error(self, exc: TarsError | None) -> bytes:
        return _error_event(exc or TarsError("internal error during generation; see the node's log"), self.node)


def _chunks(enc: cs.ChunkEncoder, first: Any, agen: AsyncIterator[Any], include_usage: bool,
            node: str) -> AsyncIterator[bytes]:
    return drain(first, agen, _OpenAISse(enc, include_usage, node))


async def _merged(encs: list[cs.ChunkEncoder], firsts: list[Any], agens: list[AsyncIterator[Any]],
                  include_usage: bool, node: str) -> AsyncIterator[bytes]:
    """n choices streamed at once: each choice's events in its order, choices interleaved
    as their tokens come."""
    queue: asyncio.Queue[tuple[int, bytes | None, Any]] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for event, done in _events(encs[i], firsts[i], agens[i]):
                await queue.put((i, event, done))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(encs))]
    done: dict[int, Completion] = {}
    try:
        while len(done) < len(encs):
            i, event, item = await queue.get()
            if event is None:
                raise item
            yield event
            if item is not None:
                done[i] = item
        yield (encs[0].usage([done[i] for i in sorted(done)]) if include_usage else b"") + b"data: [DONE]\n\n"
    except StopAsyncIteration:
        yield _error_event(TarsError("the stream ended without a final result"), node)
    except TarsError as exc:
        yield _error_event(exc, node)
    except Exception:  # noqa: BLE001
        log.exception("stream failed after its first token")
        yield _error_event(TarsError("internal error during generation; see the node's log"), node)
    finally:
        for t in tasks:
            t.cancel()
        for agen in agens:
            try:
                await agen.aclose()  # type: ignore[attr-defined]
            except RuntimeError:
                pass


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
