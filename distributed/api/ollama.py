"""Ollama's API on every node's port (docs/OLLAMA.md): ``GET /api/tags /api/version /api/ps``,
``POST /api/show /api/chat /api/generate /api/embed /api/embeddings /api/pull`` and
``DELETE /api/delete``.

Routes are adapters, like the other dialects': parse with ``ollama_wire`` (requests;
``ollama_options`` the fields that are not messages), call the node
(``node.generate`` / ``node.stream`` / ``node.embed`` — the same routes and targets as
``/v1``, so a model on another host answers through this one), write Ollama's shapes
(``ollama_answers``; model rows: ``ollama_models``).
``/api/pull`` is a runtime deploy (the app's deployer, as ``POST /models``; a name is a catalog
id or a hub reference ``hf.co/ORG/REPO[:QUANT]``, resolved by ``modelref``) followed by
status lines as the model's row changes; ``/api/delete`` a runtime remove. Errors are
``{"error": "..."}`` (app.py maps them by type, as for every path).

``/`` answers "Ollama is running" on the Ollama port (``TARS_OLLAMA_PORT``), where apps
that expect Ollama probe it; on the node's own port it stays the dashboard.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, Response

from .. import modelref
from ..domain import EmbedRequest, ModelSpec
from ..errors import ModelFailed, ModelLoading, ModelNotFound, RequestTimeout, TarsError, ValidationFailed
from . import dialect, tool_drop
from . import ollama_answers as a
from . import ollama_options as o
from . import ollama_wire as w
from . import schemas as s
from .deploy import deployer_of
from .dialect import check_images
from .native import JSON, label
from .ollama_models import ModelFacts, PullProgress, ps_row, served_context, show_body
from .streaming import ClientGone, EventStream, drain, until_disconnect

router = APIRouter(tags=["Ollama"])
POLL_S = 0.25


class Ndjson(EventStream):
    """One JSON object a line (Ollama's streams), with EventStream's disconnect handling."""

    media_type = "application/x-ndjson"


def _node(request: Request) -> Any:
    return request.app.state.node


def _settings(request: Request) -> Any:
    return request.app.state.settings


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its ``$defs`` inlined (the OpenAPI document gets no components)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[1]]))
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def _body(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline(model.model_json_schema())}}}}  # type: ignore[attr-defined]


# =========================================================================== models
def _spec(node: Any, info: dict[str, Any]) -> ModelSpec:
    """The catalog's spec of a served model; a model only a peer's catalog has (a user
    catalog entry there) gets one from what its host reports."""
    model = info["id"]
    if model in node.catalog:
        return node.catalog.get(model)
    return ModelSpec(id=model, kind=info.get("kind", "chat"), backend=info.get("backend") or "", params_b=0.0,
                     quant=info.get("quant") or "", context=int(info.get("context") or 0))


def _facts(node: Any, infos: list[dict[str, Any]]) -> dict[str, ModelFacts]:
    specs = [_spec(node, i) for i in infos]
    paths = node.model_paths(specs)
    return {sp.id: ModelFacts(sp, paths.get(sp.id)) for sp in specs}


async def _rows(node: Any, ready_only: bool) -> list[tuple[ModelFacts, dict[str, Any]]]:
    infos = [i for i in node.models() if i.get("state") not in ("pulling",)
             and (not ready_only or i.get("state") == "ready")]
    facts = await asyncio.to_thread(_facts, node, infos)
    return [(facts[i["id"]], i) for i in infos]


@router.get("/api/tags", summary="Models this cluster serves (Ollama's list)")
@router.head("/api/tags", include_in_schema=False)
async def tags(request: Request) -> Response:
    return JSON({"models": [f.row() for f, _ in await _rows(_node(request), ready_only=False)]})


@router.get("/api/ps", summary="Models loaded and ready, with the host that computes each (Ollama's ps)")
async def ps(request: Request) -> Response:
    ctx = _settings(request).context
    rows = await _rows(_node(request), ready_only=True)
    return JSON({"models": [ps_row(f, i, served_context(f.spec, i, ctx)) for f, i in rows]})


@router.get("/api/version", summary="The version of Ollama's API served here")
@router.head("/api/version", include_in_schema=False)
async def version(request: Request) -> Response:
    from .. import __version__

    return JSON({"version": w.OLLAMA_VERSION, "tars_version": __version__})


def _served(node: Any, model: str) -> Any:
    target = node.targets.get(model)
    if target is None:
        raise ModelNotFound(model, list(node.targets))
    return target


@router.post("/api/show", summary="One model's details, context and capabilities", openapi_extra=_body(w.ShowBody))
async def show(request: Request) -> Response:
    node = _node(request)
    model = s.parse(w.ShowBody, await request.body()).id()
    label(request, model)
    info = _served(node, model).info()
    facts = (await asyncio.to_thread(_facts, node, [info]))[model]
    return JSON(show_body(facts, info, served_context(facts.spec, info, _settings(request).context)))


@router.post("/api/pull", summary="Deploy a catalog model at runtime, with status lines (NDJSON)",
             openapi_extra=_body(w.PullBody))
async def pull(request: Request) -> Response:
    node = _node(request)
    r = s.parse(w.PullBody, await request.body())
    label(request, r.id())
    # a catalog id (404 listing the catalog) or a hub reference (the hub's file list and the
    # header by range; 404 naming the quants there are): resolved once, remembered by the catalog
    spec = await modelref.resolve_async(r.id(), node.catalog)
    model = (await deployer_of(request).deploy(spec.id)).get("model") or spec.id
    facts = (await asyncio.to_thread(_facts, node, [{"id": model}]))[model]
    lines = _pull_lines(node, PullProgress(facts), model, _settings(request).request_timeout_s)
    if r.stream:
        return Ndjson(_ndjson(lines))
    try:
        await until_disconnect(request.receive, _drain(lines))
    except ClientGone:
        return Response(status_code=499)
    return JSON({"status": "success"})


async def _pull_lines(node: Any, progress: PullProgress, model: str, stall_s: float) -> AsyncIterator[dict[str, Any]]:
    yield progress.first()
    last = time.monotonic()
    while True:
        row = next((i for i in node.models() if i.get("id") == model), None)
        lines, finished = progress.update(row)
        for line in lines:
            yield line
        if finished:
            return
        if lines:
            last = time.monotonic()
        elif time.monotonic() - last > stall_s:
            raise RequestTimeout(f"'{model}' made no progress for {stall_s:g} s (its state: "
                                 f"{row.get('state') if row else 'not routed here yet'}); GET /models shows it")
        await asyncio.sleep(POLL_S)


async def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for line in lines:
            yield orjson.dumps(line) + b"\n"
    except TarsError as exc:
        yield a.error_json(exc) + b"\n"


async def _drain(lines: AsyncIterator[dict[str, Any]]) -> None:
    async for _ in lines:
        pass


@router.delete("/api/delete", summary="Remove a model everywhere (a runtime remove; its files stay)",
               openapi_extra=_body(w.ModelBody))
async def delete(request: Request) -> Response:
    model = s.parse(w.ModelBody, await request.body()).id()
    label(request, model)
    out = await deployer_of(request).remove(model)
    return JSON({"status": "success", "model": model, "models": out.get("models")})


# =========================================================================== generation
@router.post("/api/chat", summary="Chat (NDJSON stream unless stream=false)", openapi_extra=_body(w.ChatRequest))
async def chat(request: Request) -> Response:
    t0 = time.perf_counter_ns()
    return await _generate(request, s.parse(w.ChatRequest, await request.body()), True, t0)


@router.post("/api/generate", summary="Generate from a prompt (NDJSON stream unless stream=false)",
             openapi_extra=_body(w.GenerateBody))
async def generate(request: Request) -> Response:
    t0 = time.perf_counter_ns()
    return await _generate(request, s.parse(w.GenerateBody, await request.body()), False, t0)


async def _generate(request: Request, r: Any, chat: bool, t0: int) -> Response:
    node = _node(request)
    req, opts = r.to_domain(_settings(request).context)
    label(request, req.model)
    check_images(request, req.model, *r.image_sources())  # inline base64, and only to a model that sees
    if opts.num_ctx or r.empty():
        await _check_target(request, node, r, req.model, opts.num_ctx)
        if r.empty():
            return JSON(a.loaded_body(r.model, chat))
    # Tools the model cannot take are dropped when the choice is the model's (Ollama has no
    # tool_choice: always), saying so in a header, the notes and the log (api/tool_drop.py).
    if req.stream:
        try:
            first, agen, dropped = await dialect.open_stream(request, req)
        except ClientGone:
            return Response(status_code=499)
        label(request, dialect.model_of(request, req, first))
        fmt = a.Chunks(r.model, chat, t0, time.perf_counter_ns, on_done=lambda c: tool_drop.note(c, dropped))
        return Ndjson(drain(first, agen, fmt), tool_drop.headers(dropped))
    try:
        c, dropped = await dialect.complete(request, req)
    except ClientGone:
        return Response(status_code=499)
    label(request, c.model)
    tool_drop.note(c, dropped)
    body = a.chat_body if chat else a.generate_body
    return JSON(body(r.model, c, time.perf_counter_ns() - t0), headers=tool_drop.headers(dropped))


async def _check_target(request: Request, node: Any, r: Any, model: str | None, num_ctx: int | None) -> None:
    """What needs the model: it exists (404 first), has the context asked for; an empty
    request loads it (waits until it is ready, as Ollama does)."""
    target = node.resolve(model, "chat")
    if num_ctx:
        _check_context(node, target, num_ctx, _settings(request).context)
    if r.empty():
        state = await target.wait_loaded(_settings(request).request_timeout_s)
        if state == "failed":
            raise ModelFailed(f"model '{target.model}' failed on {target.node}: {target.error}", model=target.model)
        if state != "ready":
            raise ModelLoading(f"model '{target.model}' is {state} on {target.node}; retry shortly",
                               model=target.model, retry_after=2)


def _check_context(node: Any, target: Any, num_ctx: int, settings_context: int) -> None:
    info = target.info()
    context = served_context(_spec(node, {**info, "id": target.model}), info, settings_context)
    if num_ctx > context:
        raise ValidationFailed(f"'options.num_ctx' is {num_ctx} but model '{target.model}' is served with a context "
                               f"of {context} tokens (TARS_CONTEXT); send at most {context}", field="options.num_ctx",
                               limit=context, got=num_ctx, model=target.model)


# =========================================================================== embeddings
@router.post("/api/embed", summary="Embed one or more texts (L2-normalised)", openapi_extra=_body(w.EmbedBody))
async def embed(request: Request) -> Response:
    t0 = time.perf_counter_ns()
    node = _node(request)
    r = s.parse(w.EmbedBody, await request.body())
    req, opts = r.to_domain(_settings(request).embed_max_inputs)
    label(request, req.model)
    if opts.num_ctx:
        _check_context(node, node.resolve(req.model, "embed"), opts.num_ctx, _settings(request).context)
    result = await node.embed(req)
    label(request, result.model)
    vectors = np.asarray(result.vectors, dtype=np.float32)
    if r.dimensions is not None and r.dimensions != vectors.shape[1]:
        raise ValidationFailed(f"model '{result.model}' returns {vectors.shape[1]}-dimensional vectors; "
                               f"'dimensions' must be {vectors.shape[1]} or omitted", field="dimensions")
    return JSON(orjson.dumps({"model": r.model, "embeddings": vectors, "total_duration": time.perf_counter_ns() - t0,
                              "load_duration": 0, "prompt_eval_count": result.prompt_tokens, "node": result.node,
                              "via": result.via},
                             option=orjson.OPT_SERIALIZE_NUMPY))


@router.post("/api/embeddings", summary="Embed one prompt (the older endpoint; not normalised)",
             openapi_extra=_body(w.EmbeddingsBody))
async def embeddings(request: Request) -> Response:
    node = _node(request)
    r = s.parse(w.EmbeddingsBody, await request.body())
    o.keep_alive_s(r.keep_alive)
    opts = o.Options(r.options, embed=True)
    model = o.model_id(r.model)
    label(request, model)
    target = node.resolve(model, "embed")
    if opts.num_ctx:
        _check_context(node, target, opts.num_ctx, _settings(request).context)
    if not r.prompt:
        return JSON({"embedding": []})  # as Ollama: nothing to embed, an empty vector
    result = await node.embed(EmbedRequest(model=model, input=[r.prompt], normalize=False))
    vectors = np.asarray(result.vectors, dtype=np.float32)
    return JSON(orjson.dumps({"embedding": vectors[0]}, option=orjson.OPT_SERIALIZE_NUMPY))


# =========================================================================== the Ollama port
def root(request: Request) -> Response | None:
    """``GET``/``HEAD /`` on the Ollama port: what apps that expect Ollama probe. None elsewhere."""
    port = _settings(request).ollama_port
    server = request.scope.get("server") or (None, None)
    if port and server[1] == port:
        return PlainTextResponse("Ollama is running")
    return None


# Dispatched straight from the edge (app.py), as the /v1 hot routes are.
FAST = {("POST", "/api/chat"): chat, ("POST", "/api/generate"): generate, ("POST", "/api/embed"): embed}
