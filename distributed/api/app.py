"""``create_app(service)``: the FastAPI app of one node's service. Nothing at import time.

The parts (node, cluster, deployer, split service) are built by the composition root
(``service.build``); this module only serves them. Its lifespan starts and stops the
service (``Service.start``/``stop``).

Layers, outside in:

1. ``Edge`` — one pure-ASGI middleware doing the per-request chores in a single
   pass over the headers: API key, body-size limit (Content-Length and the bytes
   actually streamed), the ``x-tars-via`` header, request metrics by endpoint and
   model, and the last-resort 500 (generic message to the client, traceback to
   the log; never a traceback to a client).
2. Exception handlers — ``TarsError`` → its HTTP status, by type, in each dialect's
   shape (api/error_shapes.py: native, OpenAI's on ``/v1/*``, Anthropic's, Ollama's on
   ``/api/*``); FastAPI's validation errors → 400 naming the field; unknown routes →
   404 in the same shape.
3. Routers — native.py, openai.py, ollama.py, ``/rpc`` (rpc/server.py, its own token auth),
   and the dashboard: ``/`` and ``/dashboard`` serve ``dashboard/index.html``,
   ``/dashboard/static/<file>`` its assets.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import asynccontextmanager
from pathlib import Path
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import ModelLoading, PayloadTooLarge, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from ..logs import get_logger
from ..seams import ServiceNode
from . import anthropic, deploy, error_shapes, native, ollama, openai, rerank, responses
from .auth import ApiKey
from .guards import Guards, host_policy

if TYPE_CHECKING:  # types only: the service is built by the composition root
    from ..service import Service

log = get_logger(__name__)

DASHBOARD_DIR = Path(__file__).with_name("dashboard")


def _error_response(exc: TarsError, node: str, path: str) -> Response:
    headers: dict[str, str] = {}
    retry = exc.details.get("retry_after")
    if retry is None and isinstance(exc, (PeerUnavailable, ModelLoading)):
        retry = 1  # transient: the cluster fails over or the model finishes loading; a client may retry
    if retry is not None:
        headers["retry-after"] = str(max(1, math.ceil(float(retry))))
    if isinstance(exc, Unauthorized):
        headers["www-authenticate"] = "Bearer"
    return Response(error_shapes.error_json(exc, node, path), status_code=exc.http_status,
                    headers=headers, media_type="application/json")


class Edge:
    """Auth, body limit, metrics, via header and the last-resort 500, in one layer."""

    def __init__(self, app: ASGIApp, *, node: ServiceNode, api_key: ApiKey, max_body: int, endpoints: set[str],
                 fast: dict[tuple[str, str], Any] | None = None) -> None:
        self.app = app
        self.node = node
        self.api_key = api_key
        self.max_body = max_body
        self.endpoints = endpoints
        self.fast = fast or {}
        self._via = (b"x-tars-via", node.name.encode())

    def _endpoint(self, path: str) -> str:
        if path in self.endpoints:
            return path
        if path.startswith("/dashboard/static/"):
            return "/dashboard/static"
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path: str = scope["path"]
        auth = length = x_api_key = None
        for k, v in scope["headers"]:
            if k == b"authorization":
                auth = v
            elif k == b"content-length":
                length = v
            elif k == b"x-api-key":  # Anthropic's clients send the key this way
                x_api_key = v
        state = {"status": 500, "started": False}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                message["headers"] = [*message.get("headers", ()), self._via]
            await send(message)

        try:
            self.api_key.check(path, auth, x_api_key)
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    raise ValidationFailed("the Content-Length header is not a number", field="content-length") from None
                if n > self.max_body:
                    raise PayloadTooLarge(f"the request body is {n} bytes; this node accepts at most {self.max_body} "
                                          "bytes (TARS_MAX_BODY_BYTES)", limit=self.max_body, got=n)
            method = scope["method"]
            if method in ("POST", "PUT", "PATCH"):
                receive = self._limited(receive)
            handler = self.fast.get((method, path))
            if handler is None:
                await self.app(scope, receive, send_wrapper)
            else:  # hot routes: skip the router's matching and dependency machinery
                try:
                    response = await handler(Request(scope, receive))
                except TarsError as exc:
                    response = _error_response(exc, self.node.name, path)
                await response(scope, receive, send_wrapper)
        except TarsError as exc:  # raised here in the edge, before the app
            if not state["started"]:
                await _error_response(exc, self.node.name, path)(scope, receive, send_wrapper)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            state["status"] = 499
        except Exception:  # noqa: BLE001 - last resort: generic message out, traceback to the log
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not state["started"]:
                err = TarsError("internal server error; the node's log has the details")
                await _error_response(err, self.node.name, path)(scope, receive, send_wrapper)
        finally:
            model = scope.get("tars.model", "")
            self.node.metrics.observe_request(self._endpoint(path), model, state["status"], time.perf_counter() - t0)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the request body exceeds {limit} bytes, the most this node accepts "
                                          "(TARS_MAX_BODY_BYTES)", limit=limit)
            return message

        return wrapped


def _dashboard_page() -> Response:
    index = DASHBOARD_DIR / "index.html"
    if not index.is_file():
        return Response("dashboard assets are not installed (distributed/api/dashboard/index.html)",
                        status_code=404, media_type="text/plain")
    return FileResponse(index, media_type="text/html")


def _document_request_models(app: FastAPI) -> None:
    """Routes read their bodies themselves (one pydantic pass over the raw bytes), so FastAPI
    does not know the request models; their nested models go into the OpenAPI components here
    (the routes' ``openapi_extra`` refers to them)."""
    from . import anthropic_wire, chat_surface, responses_wire, schemas

    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = base()
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in (schemas.InferenceRequest, schemas.EmbedBody, chat_surface.ChatCompletionRequest,
                          chat_surface.CompletionRequest, schemas.EmbeddingsRequest, anthropic_wire.MessagesRequest,
                          anthropic_wire.CountTokensRequest, responses_wire.ResponsesRequest):
                comps.update(model.model_json_schema(ref_template="#/components/schemas/{model}").get("$defs", {}))
            for path in doc.get("paths", {}).values():
                for op in path.values():
                    body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
                    body.get("schema", {}).pop("$defs", None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_error_handlers(app: FastAPI, node_name: str) -> None:
    """``TarsError`` → its status by type; FastAPI's validation errors → 400 naming the
    field; unknown routes and methods → 404/405 — all in the native or OpenAI error shape."""

    async def tars_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TarsError)
        return _error_response(exc, node_name, request.url.path)

    async def validation_error(request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path", "header"))
        err = ValidationFailed(f"field '{field}': {first['msg']}" if field else str(first["msg"]), field=field or None)
        return _error_response(err, node_name, request.url.path)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        err = TarsError(f"{request.method} {request.url.path}: {exc.detail}; see /docs for the API")
        err.http_status = exc.status_code
        err.kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(err, node_name, request.url.path)

    app.add_exception_handler(TarsError, tars_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _add_dashboard(app: FastAPI) -> None:
    """``/`` and ``/dashboard`` serve the page, ``/dashboard/static/<file>`` its assets."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root(request: Request) -> Response:
        return ollama.root(request) or _dashboard_page()  # "Ollama is running" on TARS_OLLAMA_PORT

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> Response:
        return _dashboard_page()

    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD_DIR, check_dir=False), name="dashboard")


def create_app(service: "Service") -> FastAPI:
    """The app serving ``service`` (built by ``service.build``). The lifespan starts the
    service (the node, then its cluster) and stops it (the cluster says goodbye first)."""
    settings, node = service.settings, service.node

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    extra: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's built-in OpenTelemetry probe costs ~15 us per request; we export Prometheus metrics
        extra["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(title="TARS Distributed", version=__version__, lifespan=lifespan,
                  description="One local AI service across home PCs. Native API, OpenAI-compatible /v1, "
                              "JSON-RPC /rpc between nodes.", **extra)
    app.state.node = node
    app.state.settings = settings
    app.state.deployer = service.deployer  # POST/DELETE /models (api/deploy.py)
    app.state.cluster = service.cluster  # /status "cluster": the planner, the term, the plan in force
    _add_error_handlers(app, node.name)

    from ..rpc.server import build_rpc_router, rpc_server_of

    rpc = build_rpc_router(settings, node, service.cluster, deployer=service.deployer, split=service.split)
    routers = [native.router, openai.router, anthropic.router, responses.router, ollama.router, rerank.router,
               deploy.router, rpc]
    for router in routers:
        app.include_router(router)

    _add_dashboard(app)
    _document_request_models(app)
    paths = [getattr(r, "path", "") for router in routers for r in router.routes]
    endpoints = {p for p in paths if p and "{" not in p} | {"/", "/dashboard", "/docs", "/openapi.json"}
    # The request path of the hot endpoints, dispatched straight from the edge (the FastAPI
    # routes above stay for /docs and behave the same: they call the same functions).
    fast = {("POST", "/inference"): native.inference, ("POST", "/embed"): native.embed,
            ("POST", "/v1/chat/completions"): openai.chat_completions, ("POST", "/v1/completions"): openai.completions,
            ("POST", "/v1/embeddings"): openai.embeddings, ("GET", "/health"): native.health,
            ("POST", "/v1/messages"): anthropic.messages, ("POST", "/v1/responses"): responses.responses,
            ("POST", "/rpc"): rpc_server_of(rpc.routes).handle,  # a forwarded stream's every token
            **ollama.FAST}
    app.add_middleware(Edge, node=node, api_key=ApiKey(settings.api_key.get_secret_value()),
                       max_body=settings.max_body_bytes, endpoints=endpoints, fast=fast)
    app.add_middleware(Guards, node_name=node.name, hosts=host_policy(settings))  # outermost: api/guards.py
    return app
