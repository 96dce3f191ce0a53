"""JSON-RPC 2.0 serving side: ``POST /rpc`` over a ``Node`` (and its ``Cluster``).

``build_rpc_router(settings, node)`` returns a FastAPI router. Each router owns
its own jsonrpcserver methods dict (never the library's global registry), so
two nodes can live in one process — the in-process cluster tests rely on it.

What this module adds around jsonrpcserver's dispatcher:

* the cluster-token check (HTTP 401 with a JSON-RPC error body, constant time);
* orjson parsing (-32700) and a cheap request validator (-32600);
* batches dispatched member by member, so one bad member gets its own -32600
  (the spec's behaviour) instead of failing the whole batch; an empty batch is
  a single -32600; an all-notification batch answers HTTP 204 with no body;
* parameter checking that names the parameter (-32602);
* errors mapped by type: ``TarsError`` → its own code, anything else → -32603
  with no traceback or exception text (those go to this node's log);
* ``inference.stream``: an ``application/x-ndjson`` answer, one JSON-RPC
  notification object per token, then the final response object.

Methods are thin: they check params, then call the node or the cluster.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from jsonrpcserver import Error, Success, async_dispatch_to_serializable

from .. import __version__
from ..domain import EmbedRequest, GenerateRequest
from ..errors import ModelLoading, PayloadTooLarge, TarsError, Unauthorized, ValidationFailed
from ..logs import get_logger
from . import protocol as p

log = get_logger(__name__)

JSON = "application/json"


# --------------------------------------------------------------------------- params
@dataclass(frozen=True)
class Param:
    """One named parameter: accepted JSON types, required or its default."""

    types: tuple[type, ...]
    required: bool = False
    default: Any = None
    items: type | None = None  # element type for lists
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
                 list: "an array", dict: "an object", type(None): "null"}
        parts = [names.get(t, t.__name__) for t in self.types]
        if self.items is not None and list in self.types:
            item = names.get(self.items, self.items.__name__).split(" ", 1)[-1]
            parts[self.types.index(list)] += f" of {item}s"
        return " or ".join(parts)


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def check_params(method: str, schema: dict[str, Param], args: tuple[Any, ...],
                 params: dict[str, Any], *, ignore_unknown: bool = False) -> dict[str, Any]:
    """Validate named params against ``schema``; raise ValidationFailed naming the param.

    ``ignore_unknown`` drops parameters the schema does not know instead of refusing
    them: the membership methods use it, so a newer peer that sends more (say, a
    figure added to heartbeats in a later version) still joins and beats."""
    if args:
        raise ValidationFailed(f"{method}: params must be an object of named parameters "
                               f"({', '.join(schema) or 'none'}), not an array", field="params")
    unknown = sorted(set(params) - set(schema))
    if unknown and ignore_unknown:
        params = {k: v for k, v in params.items() if k in schema}
    elif unknown:
        raise ValidationFailed(f"{method}: unknown parameter '{unknown[0]}'; accepted: "
                               f"{', '.join(schema) or 'none'}", field=unknown[0])
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in params:
            if spec.required:
                raise ValidationFailed(f"{method}: missing required parameter '{name}'", field=name)
            out[name] = spec.default() if callable(spec.default) else spec.default
            continue
        value = params[name]
        if not _fits(value, spec.types):
            raise ValidationFailed(f"{method}: parameter '{name}' must be {spec.describe()}", field=name)
        if spec.items is not None and isinstance(value, list):
            for i, item in enumerate(value):
                if not _fits(item, (spec.items,)):
                    raise ValidationFailed(f"{method}: parameter '{name}[{i}]' must be {Param((spec.items,)).describe()}",
                                           field=f"{name}[{i}]")
        if spec.choices and value not in spec.choices:
            raise ValidationFailed(f"{method}: parameter '{name}' must be one of "
                                   f"{', '.join(map(str, spec.choices))}", field=name)
        out[name] = value
    return out


S, I, F, B, L, D, N = (str,), (int,), (float,), (bool,), (list,), (dict,), (type(None),)

GENERATE_PARAMS: dict[str, Param] = {
    "model": Param(S + N),
    "prompt": Param(S + N),
    "messages": Param(L + N, items=dict),
    "max_tokens": Param(I, default=256),
    "temperature": Param(F, default=0.8),
    "top_p": Param(F, default=0.95),
    "stop": Param(L, default=list, items=str),
    "seed": Param(I + N),
    # the OpenAI chat surface (domain.GenerateRequest; sent only when not at their defaults)
    "presence_penalty": Param(F, default=0.0),
    "frequency_penalty": Param(F, default=0.0),
    "response_format": Param(D + N),
    "tools": Param(L + N, items=dict),
    "tool_choice": Param(S + D + N),
    "logprobs": Param(B, default=False),
    "top_logprobs": Param(I, default=0),
    "n": Param(I, default=1),
}
EMBED_PARAMS: dict[str, Param] = {
    "input": Param(L, required=True, items=str),
    "model": Param(S + N),
    "normalize": Param(B, default=True),
    "encoding": Param(S, default="float", choices=("float", "base64")),
    "groups": Param(L + N, items=int),
}


# --------------------------------------------------------------------------- server
class RpcServer:
    """The methods of one node, and the HTTP handling of ``/rpc``."""

    def __init__(self, settings: Any, node: Any) -> None:
        self.settings = settings
        self.node = node
        self._token = settings.cluster_token.get_secret_value().encode()
        self._started = time.monotonic()
        self.methods: dict[str, Callable[..., Awaitable[Any]]] = {
            "node.health": self._wrap("node.health", {}, self.health),
            "node.info": self._wrap("node.info", {}, self.info),
            # Membership methods ignore unknown params (hosts of different versions must still
            # join and beat); everything else refuses them (-32602 naming the parameter).
            "cluster.join": self._wrap("cluster.join", {
                "name": Param(S, required=True), "url": Param(S, required=True),
                "profile": Param(D, required=True), "role": Param(S, default="worker"),
                "version": Param(S, default=""), "models": Param(L, default=list, items=dict),
                "fingerprint": Param(S, default=""),  # its TLS certificate's SHA-256 (tls.py), if it serves https
            }, self.join, ignore_unknown=True),
            "cluster.heartbeat": self._wrap("cluster.heartbeat", {
                "name": Param(S, required=True), "url": Param(S, default=""),
                "models": Param(L, default=list, items=dict), "plan_id": Param(S, default=""),
                "sent_at": Param(F, default=0.0),
                # the sender's live figures (optional: an older peer sends none)
                "gpus": Param(L + N, items=dict), "totals": Param(D + N), "ram": Param(D + N),
            }, self.heartbeat, ignore_unknown=True),
            "cluster.leave": self._wrap("cluster.leave", {"name": Param(S, required=True)}, self.leave,
                                        ignore_unknown=True),
            "models.list": self._wrap("models.list", {"local": Param(B, default=False)}, self.models_list),
            "inference.generate": self._wrap("inference.generate", GENERATE_PARAMS, self.generate),
            "embed.encode": self._wrap("embed.encode", EMBED_PARAMS, self.encode),
            p.STREAM_METHOD: self._stream_misuse,
        }

    # ------------------------------------------------------------ plumbing
    def _wrap(self, name: str, schema: dict[str, Param], fn: Callable[..., Awaitable[Any]], *,
              ignore_unknown: bool = False) -> Callable[..., Awaitable[Any]]:
        async def method(*args: Any, **params: Any) -> Any:
            try:
                return Success(await fn(**check_params(name, schema, args, params, ignore_unknown=ignore_unknown)))
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
        """Constant-time check of ``Authorization: Bearer <token>``. An empty
        configured token disables the channel: nothing is accepted."""
        scheme, _, got = (header or "").partition(" ")
        ok_scheme = scheme.lower() == "bearer"
        # compare_digest runs even when the scheme is wrong, so timing says nothing.
        same = hmac.compare_digest(got.strip().encode(), self._token)
        return ok_scheme and same and bool(self._token)

    async def dispatch_one(self, obj: Any) -> dict[str, Any] | None:
        return await async_dispatch_to_serializable(
            obj, methods=self.methods, deserializer=_identity, validator=p.validate_request)

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
            return await self._stream(obj)
        if isinstance(obj, list):
            if not obj:
                return _json(p.failure(None, p.spec_error_object(p.INVALID_REQUEST, "empty batch")))
            answers = [a for a in await asyncio.gather(*map(self.dispatch_one, obj)) if a is not None]
            return _json(answers) if answers else Response(status_code=204)
        answer = await self.dispatch_one(obj)
        return Response(status_code=204) if answer is None else _json(answer)

    # ------------------------------------------------------------ methods
    @property
    def cluster(self) -> Any:
        cluster = getattr(self.node, "cluster", None)
        if cluster is None:
            from ..errors import ConfigError

            raise ConfigError(f"node {self.node.name} has no cluster layer attached")
        return cluster

    async def health(self) -> dict[str, Any]:
        ok, detail = self.node.health()
        return {"ok": ok, "node": self.node.name, **detail}

    async def info(self) -> dict[str, Any]:
        cluster = getattr(self.node, "cluster", None)
        profile = getattr(self.node, "profile", None)
        return {
            "name": self.node.name,
            "role": cluster.role if cluster is not None else self.settings.effective_role,
            "url": self.settings.base_url,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "profile": profile.to_dict() if profile is not None else None,
            "models": self.node.models(),
        }

    async def join(self, **params: Any) -> dict[str, Any]:
        return await self.cluster.handle_join(**params)

    async def heartbeat(self, **params: Any) -> dict[str, Any]:
        return await self.cluster.handle_heartbeat(**params)

    async def leave(self, name: str) -> dict[str, Any]:
        return await self.cluster.handle_leave(name)

    async def models_list(self, local: bool) -> list[dict[str, Any]]:
        models = self.node.models()
        return [m for m in models if m.get("node") == self.node.name] if local else models

    def _local(self, model: str | None, kind: str) -> Any:
        """Resolve to a target computed *here*. A forwarded call must never be
        forwarded again: while routing tables converge two hosts could
        otherwise bounce a request between them."""
        target = self.node.resolve(model, kind)
        # ``serves_here``: the model moved to the caller, which still loads it and forwards
        # to the copy here until then (the handoff, rpc/remote.py); a stand-in computes it.
        if target.node != self.node.name and not getattr(target, "serves_here", False):
            raise ModelLoading(f"model '{target.model}' is not served by {self.node.name} "
                               f"(its routing points to {target.node}); the cluster is re-planning, retry shortly",
                               model=target.model, node=self.node.name)
        return target

    async def generate(self, **params: Any) -> dict[str, Any]:
        req = GenerateRequest(**params, stream=False)
        req.model = self._local(req.model, "chat").model
        completion = await self.node.generate(req)
        return completion.to_dict()

    async def encode(self, input: list[str], model: str | None, normalize: bool,
                     encoding: str, groups: list[int] | None) -> dict[str, Any]:
        """Vectors for ``input``. ``groups`` (sizes summing to len(input)) says the call
        carries several callers' requests, coalesced by the sender's RemoteTarget:
        each group is embedded as its own request (this node's micro-batcher merges
        them back into one encode), so each gets its exact token count back."""
        model = self._local(model, "embed").model
        if groups is None:
            emb = await self.node.embed(EmbedRequest(model=model, input=input, normalize=normalize))
            vectors, node, tokens, fallback = emb.vectors, emb.node, emb.prompt_tokens, emb.fallback
            group_tokens = None
        else:
            if sum(groups) != len(input) or any(g <= 0 for g in groups):
                raise ValidationFailed(f"embed.encode: 'groups' must be positive sizes summing to "
                                       f"len(input) = {len(input)}", field="groups")
            bounds = [0]
            for g in groups:
                bounds.append(bounds[-1] + g)
            parts = await asyncio.gather(*(
                self.node.embed(EmbedRequest(model=model, input=input[a:b], normalize=normalize))
                for a, b in zip(bounds, bounds[1:])))
            import numpy as np

            vectors = np.concatenate([np.asarray(e.vectors, dtype=np.float32) for e in parts])
            node, fallback = parts[0].node, parts[0].fallback
            group_tokens = [e.prompt_tokens for e in parts]
            tokens = sum(group_tokens)
        out: dict[str, Any] = {"model": model, "node": node, "prompt_tokens": tokens, "fallback": fallback}
        if group_tokens is not None:
            out["group_tokens"] = group_tokens
        if encoding == "base64":
            out["vectors_b64"], out["shape"] = p.vectors_to_b64(vectors)
        else:
            out["vectors"] = vectors  # numpy → JSON straight from the buffer (orjson)
        return out

    # ------------------------------------------------------------ streaming
    async def _stream(self, obj: dict[str, Any]) -> Response:
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
        params = obj.get("params", {})
        try:
            args: tuple[Any, ...] = tuple(params) if isinstance(params, list) else ()
            checked = check_params(p.STREAM_METHOD, GENERATE_PARAMS, args, params if isinstance(params, dict) else {})
            req = GenerateRequest(**checked, stream=True)
            req.model = self._local(req.model, "chat").model
            agen = self.node.stream(req).__aiter__()
            first = await agen.__anext__()
        except TarsError as exc:
            return _json(p.failure(rid, p.error_object(exc)))
        except StopAsyncIteration:
            return _json(p.failure(rid, p.spec_error_object(p.INTERNAL_ERROR, "stream ended without a result")))
        except Exception:  # noqa: BLE001
            log.exception("rpc inference.stream failed before the first token")
            return _json(p.failure(rid, p.spec_error_object(p.INTERNAL_ERROR)))
        return StreamingResponse(self._lines(rid, first, agen), media_type=p.NDJSON)

    async def _lines(self, rid: Any, first: Any, agen: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        item = first
        try:
            while True:
                if hasattr(item, "usage"):  # the Completion: final object, then done
                    yield p.dumps_line(p.success(rid, item.to_dict()))
                    return
                params: dict[str, Any] = {"id": rid, "text": item.text}
                if item.finish_reason:
                    params["finish_reason"] = item.finish_reason
                if item.logprobs:
                    params["logprobs"] = item.logprobs
                if item.tool_calls:
                    params["tool_calls"] = item.tool_calls
                yield p.dumps_line({"jsonrpc": p.JSONRPC, "method": p.TOKEN_METHOD, "params": params})
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    yield p.dumps_line(p.failure(rid, p.spec_error_object(
                        p.INTERNAL_ERROR, "stream ended without a final result")))
                    return
        except TarsError as exc:
            yield p.dumps_line(p.failure(rid, p.error_object(exc)))
        except Exception:  # noqa: BLE001
            log.exception("rpc inference.stream failed mid-stream")
            yield p.dumps_line(p.failure(rid, p.spec_error_object(p.INTERNAL_ERROR)))
        finally:
            # The caller went away (or we finished): stop the generation now.
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()


def _identity(x: Any) -> Any:
    return x


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(p.dumps(obj), status_code=status, media_type=JSON, headers=headers)


def build_rpc_router(settings: Any, node: Any) -> APIRouter:
    """The ``POST /rpc`` route of one node (its own methods dict, no globals).

    It also attaches the cluster layer: ``node.cluster`` is created here unless
    the caller set one (tests inject a Cluster with in-process clients), and the
    router's lifespan starts it after the app's own lifespan started the node and
    stops it (``cluster.leave`` to peers) before the node stops. FastAPI merges
    an included router's lifespan into the app's, so ``create_app`` needs no
    cluster-specific code.
    """
    if getattr(node, "cluster", None) is None:
        from ..cluster import Cluster

        node.cluster = Cluster(node, settings)
    server = RpcServer(settings, node)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        cluster = node.cluster
        await cluster.start()
        try:
            yield
        finally:
            await cluster.stop()

    router = APIRouter(lifespan=lifespan)
    router.add_api_route("/rpc", server.handle, methods=["POST"], include_in_schema=False)
    router.rpc_server = server  # type: ignore[attr-defined]  # for tests
    return router
