"""The native REST API: /health /status /models /config /inference /embed /metrics.

Routes are adapters: read the body, parse it with the wire model from
``schemas``, call the node on ``request.app.state``, serialise with orjson.
Errors are raised as ``TarsError`` and mapped to HTTP in app.py.

``POST /inference`` with ``"stream": true`` answers ``text/event-stream``:

    event: token
    data: {"type":"token","text":"Hello"}

    event: done
    data: {"type":"done","model":..,"node":..,"via":..,"text":<all>,"finish_reason":..,"usage":..,"timings":..}

and, if something fails after the first token, ``event: error`` with
``{"type":"error","error":{...}}`` instead of ``done``.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from ..domain import Completion, TokenChunk
from ..errors import TarsError
from ..logs import get_logger
from . import schemas as s
from .streaming import ClientGone, EventStream, drain, first_item, until_disconnect

log = get_logger(__name__)
router = APIRouter()


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content, default=str)


def _node(request: Request) -> Any:
    return request.app.state.node


def label(request: Request, model: str | None) -> None:
    """Name the model for the request metrics (read by the edge middleware)."""
    request.scope["tars.model"] = model or "default"


@router.get("/health", summary="200 when every model assigned here is ready, else 503")
async def health(request: Request) -> Response:
    node = _node(request)
    ok, body = node.health()
    body["via"] = node.name
    return JSON(body, status_code=200 if ok else 503)


@router.get("/status", summary="Node, live GPU figures, models, peers, plan")
async def status(request: Request) -> Response:
    node = _node(request)
    body = node.status()
    cluster = getattr(request.app.state, "cluster", None)
    if cluster is not None:
        body["cluster"] = cluster.summary()  # the planner, the term, the plan in force (cluster.py)
    body["via"] = node.name
    return JSON(body)


@router.get("/models", summary="Every model in the cluster as this node sees it")
async def models(request: Request) -> Response:
    node = _node(request)
    return JSON({"node": node.name, "via": node.name, "models": node.models()})


@router.get("/config", summary="Effective settings, secrets redacted")
async def config(request: Request) -> Response:
    node = _node(request)
    return JSON({"node": node.name, "via": node.name, "settings": request.app.state.settings.redacted()})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    from ..metrics import CONTENT_TYPE

    return Response(_node(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/inference", response_model=s.InferenceResponse, summary="Generate text (SSE with stream=true)",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": s.InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
async def inference(request: Request) -> Response:
    node = _node(request)
    req = s.parse(s.InferenceRequest, await request.body()).to_domain()
    label(request, req.model)
    if req.stream:
        agen = node.stream(req)
        try:
            first = await first_item(request.receive, agen)
        except ClientGone:
            return Response(status_code=499)
        label(request, first.model if isinstance(first, Completion) else node.resolve(req.model, "chat").model)
        return EventStream(drain(first, agen, NativeSse(node.name)))
    try:
        c = await until_disconnect(request.receive, node.generate(req))
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    return JSON(s.inference_body(c))


class NativeSse:
    """``/inference`` with ``stream: true`` on the wire (``streams.drain`` runs the loop)."""

    _TOKEN_HEAD = b'event: token\ndata: {"type":"token","text":'

    def __init__(self, node: str) -> None:
        self.node = node
        self.pieces: list[str] = []

    def start(self) -> bytes | None:
        return None

    def token(self, chunk: TokenChunk) -> bytes:
        self.pieces.append(chunk.text)
        return self._TOKEN_HEAD + orjson.dumps(chunk.text) + b"}\n\n"

    def done(self, completion: Completion) -> bytes:
        completion.text = "".join(self.pieces)
        return b"event: done\ndata: " + orjson.dumps({"type": "done", **s.inference_body(completion)}) + b"\n\n"

    def error(self, exc: TarsError | None) -> bytes:
        err = exc if exc is not None else TarsError("internal error during generation; see the node's log")
        return b"event: error\ndata: " + orjson.dumps({"type": "error", **s.native_error(err, self.node)},
                                                       default=str) + b"\n\n"


@router.post("/embed", response_model=s.EmbedResponse, summary="Embed one or more texts",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": s.EmbedBody.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
async def embed(request: Request) -> Response:
    node = _node(request)
    req = s.parse(s.EmbedBody, await request.body()).to_domain(request.app.state.settings.embed_max_inputs)
    label(request, req.model)
    result = await node.embed(req)
    label(request, result.model)
    return JSON(s.embed_json(result))
