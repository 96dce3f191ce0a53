"""JSON-RPC 2.0 serving side: ``POST /rpc`` over a node (and its cluster layer).

``build_rpc_router(settings, node, cluster, deployer=, split=)`` returns a FastAPI router.
Each router owns its own jsonrpcserver methods dict (never the library's global registry),
so two nodes can live in one process — the in-process cluster tests rely on it. The
cluster, the deployer and the split service are handed in by the composition root
(``service.build`` → ``create_app``): this package never imports the cluster. The method
modules (``split_methods.py``, ``deploy_methods.py``, ``rerank_methods.py``) register
their methods on the server through ``registry.Registry``; they never import this module.

What this module adds around jsonrpcserver's dispatcher:

* the cluster-token check (HTTP 401 with a JSON-RPC error body, constant time,
  ``bearer.bearer_matches``);
* orjson parsing (-32700) and a cheap request validator (-32600);
* batches dispatched member by member, so one bad member gets its own -32600
  (the spec's behaviour) instead of failing the whole batch; an empty batch is
  a single -32600; an all-notification batch answers HTTP 204 with no body;
* parameters validated by the pydantic models of ``distributed/requests.py`` — the
  same rules as the REST schemas — refused with -32602 naming the parameter;
* errors mapped by type: ``TarsError`` → its own code, anything else → -32603
  with no traceback or exception text (those go to this node's log);
* a single ``inference.generate`` whose caller disconnects is cancelled (its
  generation stops and frees its slot), as on REST;
* ``inference.stream``: an ``application/x-ndjson`` answer, one JSON-RPC
  notification object per token, then the final response object (``streams.drain``),
  sent by ``streams.ByteStream``; a plain text token's line is the envelope encoded once
  per stream around the text (``protocol.token_line_parts``): the same bytes as encoding
  the whole notification.

Methods are thin: they validate params, then call the node or the cluster.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from jsonrpcserver import Error, Success, async_dispatch_to_serializable
from pydantic import BaseModel

from .. import __version__
from ..bearer import bearer_matches
from ..domain import Completion, EmbedRequest, TokenChunk
from ..errors import ConfigError, PayloadTooLarge, TarsError, Unauthorized, ValidationFailed
from ..logs import get_logger
from ..requests import (EmbedParams, GenerateParams, HeartbeatParams, JoinParams, LeaveParams, ModelsListParams,
                        NoParams, parse_params)
from ..seams import ClusterView, ServiceNode
from ..settings import Settings
from ..streams import ByteStream, ClientGone, drain, until_disconnect
from . import protocol as p
from .deploy_methods import register_deploy
from .registry import Handler
from .rerank_methods import register_rerank
from .split_methods import register_split

if TYPE_CHECKING:  # types only: handed in by the composition root
    from ..deploy.manager import Deployer
    from ..split.service import SplitService

log = get_logger(__name__)

JSON = "application/json"
Method = Callable[..., Awaitable[Any]]


class RpcServer:
    """The methods of one node, and the HTTP handling of ``/rpc``."""

    def __init__(self, settings: Settings, node: ServiceNode, cluster: ClusterView | None = None, *,
                 deployer: "Deployer | None" = None, split: "SplitService | None" = None) -> None:
        """``cluster``: the membership methods' handler (without one they say none is
        attached); ``deployer``: ``models.deploy/remove``; ``split``: the ``split.*`` methods
        (not registered without one)."""
        self.settings = settings
        self.node = node
        self.cluster = cluster
        self._token = settings.cluster_token.get_secret_value().encode()
        self._started = time.monotonic()
        self.methods: dict[str, Method] = {
            "node.health": self._wrap("node.health", NoParams, self.health),
            "node.info": self._wrap("node.info", NoParams, self.info),
            # Membership params models ignore unknown params (hosts of different versions must
            # still join and beat); everything else refuses them (-32602 naming the parameter).
            "cluster.join": self._wrap("cluster.join", JoinParams, self.join),
            "cluster.heartbeat": self._wrap("cluster.heartbeat", HeartbeatParams, self.heartbeat),
            "cluster.leave": self._wrap("cluster.leave", LeaveParams, self.leave),
            "models.list": self._wrap("models.list", ModelsListParams, self.models_list),
            "inference.generate": self._wrap("inference.generate", GenerateParams, self.generate),
            "embed.encode": self._wrap("embed.encode", EmbedParams, self.encode),
            p.STREAM_METHOD: self._stream_misuse,
        }
        if split is not None:
            register_split(self, split)  # split.* (the pooled-VRAM worker side)
        register_rerank(self, node)  # rerank.score
        register_deploy(self, deployer, node.name)  # models.deploy / models.remove

    def register(self, name: str, params: type[BaseModel], fn: Handler) -> None:
        """Add a method: ``fn(validated_params_model)`` returns the result (other modules,
        e.g. the split worker's, register theirs with one call)."""
        self.methods[name] = self._wrap(name, params, fn)

    # ------------------------------------------------------------ plumbing
    def _wrap(self, name: str, params_model: type[BaseModel], fn: Handler) -> Method:
        async def method(*args: Any, **params: Any) -> Any:
            try:
                checked = parse_params(params_model, name, list(args) if args else params)
                return Success(await fn(checked))
            except TarsError as exc:
                return Error(exc.rpc_code, exc.message, exc.to_dict())
            except Exception:  # noqa: BLE001 - the one place unexpected errors become -32603
                log.exception("rpc method %s failed", name)
                return Error(p.INTERNAL_ERROR, p.SPEC_MESSAGES[p.INTERNAL_ERROR],
                             {"type": "internal_error",
                              "message": f"{name} failed on {self.node.name}; see that node's log"})

        method.__name__ = name
        return method

    async def _stream_misuse(self, *args: Any, **params: Any) -> Any:
        return Error(p.INVALID_REQUEST, p.SPEC_MESSAGES[p.INVALID_REQUEST],
                     "inference.stream must be sent alone with an id (not in a batch, not as a notification)")

    def authorized(self, header: str | None) -> bool:
        """``Authorization: Bearer <token>``, constant time. An empty configured token
        disables the channel: nothing is accepted."""
        return bearer_matches(header, self._token)

    async def dispatch_one(self, obj: Any) -> dict[str, Any] | None:
        """The answer to one request object (None: a notification). ``handle`` splits batches."""
        answer = await async_dispatch_to_serializable(
            obj, methods=self.methods, deserializer=_identity, validator=p.validate_request)
        assert not isinstance(answer, list), "one request object at a time"
        return answer

    async def handle(self, request: Request) -> Response:
        if not self.authorized(request.headers.get("authorization")):
            why = ("this node has no TARS_CLUSTER_TOKEN, so its /rpc channel accepts no calls"
                   if not self._token else "missing or wrong cluster token (Authorization: Bearer <TARS_CLUSTER_TOKEN>)")
            return _json(p.failure(None, p.error_object(Unauthorized(why))), 401,
                         {"WWW-Authenticate": "Bearer"})
        body = await request.body()
        limit = self.settings.max_body_bytes
        if len(body) > limit:
            exc = PayloadTooLarge(f"/rpc body of {len(body)} bytes is over the limit of {limit} bytes", limit=limit)
            return _json(p.failure(None, p.error_object(exc)), 413)
        try:
            obj = p.loads(body)
        except ValueError as exc:
            return _json(p.failure(None, p.spec_error_object(p.PARSE_ERROR, str(exc))))
        if isinstance(obj, dict) and obj.get("method") == p.STREAM_METHOD and "id" in obj:
            return await self._stream(obj, request)
        if isinstance(obj, list):
            if not obj:
                return _json(p.failure(None, p.spec_error_object(p.INVALID_REQUEST, "empty batch")))
            answers = [a for a in await asyncio.gather(*map(self.dispatch_one, obj)) if a is not None]
            return _json(answers) if answers else Response(status_code=204)
        if isinstance(obj, dict) and obj.get("method") == "inference.generate":
            try:  # a caller that goes away stops its generation (the slot is freed), as on REST
                answer = await until_disconnect(request.receive, self.dispatch_one(obj))
            except ClientGone:
                log.info("rpc caller disconnected: inference.generate cancelled")
                return Response(status_code=499)
        else:
            answer = await self.dispatch_one(obj)
        return Response(status_code=204) if answer is None else _json(answer)

    # ------------------------------------------------------------ methods
    def _cluster(self) -> ClusterView:
        if self.cluster is None:
            raise ConfigError(f"node {self.node.name} has no cluster layer attached")
        return self.cluster

    async def health(self, _: NoParams) -> dict[str, Any]:
        ok, detail = self.node.health()
        return {"ok": ok, "node": self.node.name, **detail}

    async def info(self, _: NoParams) -> dict[str, Any]:
        profile = self.node.profile
        return {
            "name": self.node.name,
            "role": self.cluster.role if self.cluster is not None else self.settings.effective_role,
            "url": self.settings.base_url,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "profile": profile.to_dict() if profile is not None else None,
            "models": self.node.models(),
        }

    async def join(self, params: JoinParams) -> dict[str, Any]:
        return await self._cluster().handle_join(**params.model_dump())

    async def heartbeat(self, params: HeartbeatParams) -> dict[str, Any]:
        return await self._cluster().handle_heartbeat(**params.model_dump())

    async def leave(self, params: LeaveParams) -> dict[str, Any]:
        return await self._cluster().handle_leave(params.name)

    async def models_list(self, params: ModelsListParams) -> list[dict[str, Any]]:
        models = self.node.models()
        return [m for m in models if m.get("node") == self.node.name] if params.local else models

    async def generate(self, params: GenerateParams) -> dict[str, Any]:
        req = params.to_domain(stream=False)
        completion = await self.node.generate(req, here=True)  # computed here, never forwarded again
        return completion.to_dict()

    async def encode(self, params: EmbedParams) -> dict[str, Any]:
        """Vectors for ``input``. ``groups`` (sizes summing to len(input)) says the call
        carries several callers' requests, coalesced by the sender's RemoteTarget:
        each group is embedded as its own request (this node's micro-batcher merges
        them back into one encode), so each gets its exact token count back."""
        self._check_encode_size(params)
        model = self.node.resolve(params.model, "embed", here=True).model  # computed here, never forwarded again
        req = params.to_domain()
        req.model = model
        group_tokens = None
        if params.groups is None:
            emb = await self.node.embed(req, here=True)
            vectors, node, tokens, fallback = emb.vectors, emb.node, emb.prompt_tokens, emb.fallback
        else:
            vectors, node, fallback, group_tokens = await self._encode_groups(req, params.groups)
            tokens = sum(group_tokens)
        out: dict[str, Any] = {"model": model, "node": node, "prompt_tokens": tokens, "fallback": fallback}
        if group_tokens is not None:
            out["group_tokens"] = group_tokens
        if params.encoding == "base64":
            out["vectors_b64"], out["shape"] = p.vectors_to_b64(vectors)
        else:
            out["vectors"] = vectors  # numpy → JSON straight from the buffer (orjson)
        return out

    def _check_encode_size(self, params: EmbedParams) -> None:
        """The same bound as REST (TARS_EMBED_MAX_INPUTS) for each caller's request; a call
        that coalesces several may carry up to one embedding batch (TARS_EMBED_MAX_BATCH)
        beyond it, the most a sender's coalescer puts in one call."""
        limit = int(self.settings.embed_max_inputs)
        sizes = params.groups or [len(params.input)]
        biggest = max(sizes)
        total_limit = max(limit, int(self.settings.embed_max_batch))
        if biggest > limit or len(params.input) > total_limit:
            got, most = (biggest, limit) if biggest > limit else (len(params.input), total_limit)
            raise ValidationFailed(f"embed.encode: {got} texts in one request; {self.node.name} embeds at most "
                                   f"{most} (TARS_EMBED_MAX_INPUTS): split it", field="input", limit=most, got=got)

    async def _encode_groups(self, req: EmbedRequest, groups: list[int]) -> tuple[Any, str, bool, list[int]]:
        if sum(groups) != len(req.input):
            raise ValidationFailed(f"embed.encode: 'groups' must be positive sizes summing to "
                                   f"len(input) = {len(req.input)}", field="groups")
        import dataclasses

        import numpy as np

        bounds = [0]
        for g in groups:
            bounds.append(bounds[-1] + g)
        parts = await asyncio.gather(*(self.node.embed(dataclasses.replace(req, input=req.input[a:b]), here=True)
                                       for a, b in zip(bounds, bounds[1:])))
        vectors = np.concatenate([np.asarray(e.vectors, dtype=np.float32) for e in parts])
        return vectors, parts[0].node, parts[0].fallback, [e.prompt_tokens for e in parts]

    # ------------------------------------------------------------ streaming
    async def _stream(self, obj: dict[str, Any], request: Request | None = None) -> Response:
        """NDJSON stream: token notifications, then one final response object.

        The first item is fetched before the HTTP answer starts, so an error that
        happens before any token (bad params, unknown model, queue full) comes back
        as an ordinary JSON-RPC error response, not as a stream.
        """
        rid = obj.get("id")
        try:
            p.validate_request(obj)
        except ValueError as exc:
            return _json(p.failure(None, p.spec_error_object(p.INVALID_REQUEST, str(exc))))
        try:
            req = parse_params(GenerateParams, p.STREAM_METHOD, obj.get("params", {})).to_domain(stream=True)
            agen = self.node.stream(req, here=True).__aiter__()  # computed here, never forwarded again
            first = await agen.__anext__()
        except TarsError as exc:
            return _json(p.failure(rid, p.error_object(exc)))
        except StopAsyncIteration:
            return _json(p.failure(rid, p.spec_error_object(p.INTERNAL_ERROR, "stream ended without a result")))
        except Exception:  # noqa: BLE001
            log.exception("rpc inference.stream failed before the first token")
            return _json(p.failure(rid, p.spec_error_object(p.INTERNAL_ERROR)))
        return ByteStream(self._lines(rid, first, agen), media_type=p.NDJSON)

    def _lines(self, rid: Any, first: Any, agen: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        return drain(first, agen, NdjsonFormat(rid))


class NdjsonFormat:
    """``inference.stream`` on the wire: a notification per token, then the response object."""

    def __init__(self, rid: Any) -> None:
        self.rid = rid
        self._head, self._tail = p.token_line_parts(rid)

    def start(self) -> bytes | None:
        return None

    def token(self, chunk: TokenChunk) -> bytes:
        if not (chunk.finish_reason or chunk.logprobs or chunk.tool_calls or chunk.reasoning):
            # a plain piece of text, the common case: the envelope is encoded once per stream
            return self._head + p.dumps(chunk.text) + self._tail
        params: dict[str, Any] = {"id": self.rid, "text": chunk.text}
        if chunk.finish_reason:
            params["finish_reason"] = chunk.finish_reason
        if chunk.logprobs:
            params["logprobs"] = chunk.logprobs
        if chunk.tool_calls:
            params["tool_calls"] = chunk.tool_calls
        if chunk.reasoning:
            params["reasoning"] = chunk.reasoning
        return p.dumps_line({"jsonrpc": p.JSONRPC, "method": p.TOKEN_METHOD, "params": params})

    def done(self, completion: Completion) -> bytes:
        return p.dumps_line(p.success(self.rid, completion.to_dict()))

    def error(self, exc: TarsError | None) -> bytes:
        err = p.error_object(exc) if exc is not None else p.spec_error_object(p.INTERNAL_ERROR)
        return p.dumps_line(p.failure(self.rid, err))


def _identity(x: Any) -> Any:
    return x


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(p.dumps(obj), status_code=status, media_type=JSON, headers=headers)


def build_rpc_router(settings: Settings, node: ServiceNode, cluster: ClusterView | None = None, *,
                     deployer: "Deployer | None" = None, split: "SplitService | None" = None) -> APIRouter:
    """The ``POST /rpc`` route of one node (its own methods dict, no globals; see ``RpcServer``).
    Starting and stopping the cluster and the split service is the service's
    (``service.Service``), not this router's."""
    server = RpcServer(settings, node, cluster, deployer=deployer, split=split)
    router = APIRouter()
    router.add_api_route("/rpc", server.handle, methods=["POST"], include_in_schema=False)
    return router


def rpc_server_of(routes: Any) -> RpcServer:
    """The RpcServer behind the ``/rpc`` route among ``routes`` (a router's or an app's,
    looking into included routers)."""
    for r in routes:
        if getattr(r, "path", "") == "/rpc":
            return r.endpoint.__self__  # type: ignore[no-any-return]
        inner = getattr(r, "original_router", None)
        if inner is not None:
            try:
                return rpc_server_of(inner.routes)
            except LookupError:
                continue
    raise LookupError("no /rpc route")
