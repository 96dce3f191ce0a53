"""Replicas (issue 12.2): one model on several hosts, each request to the least busy live one.

A plan may hold several assignments of one model (``deploy --replicas N``). Each host then
routes that model through a ``ReplicaSet``: its members are the copy here (the node's own
local target, when the plan puts one here) and a ``RemoteTarget`` per other host — each
with its own embedding coalescer, and no failover of its own (the other replicas are the
failover). A request goes to the live member with the least work in flight — for the copy
here its queue (which also holds what peers forwarded), for a peer the requests this host
has sent it — the copy here first on a tie. A member whose host is down (dead, or it refused
a connection since it last answered: ``RemoteTarget.peer_down``) is skipped at once; a call
that fails before any of its answer came back (connection refused or reset, the host gone
mid-call, the model no longer ready there; for a stream: before its first token) is retried
on the next member, so no request fails while one replica lives.

A call a peer forwarded here is computed by the copy here, never forwarded again
(``Deployer.mark_forwarded`` sets ``FORWARDED`` for the rest of that request's task).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from ..domain import Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, ModelKind, TokenChunk
from ..errors import InputTooLong, PayloadTooLarge, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from ..logs import fields, get_logger
from ..targets import RemoteTarget, Target, TargetState

log = get_logger(__name__)

FORWARDED: contextvars.ContextVar[bool] = contextvars.ContextVar("tars_forwarded", default=False)


# What a peer replica's failure says about the request itself: another replica would refuse
# it too. Anything else (down, gone mid-call, overloaded, the model not ready there, an
# internal error) happened before any of the answer reached the caller: another replica may
# compute it.
_THE_REQUEST = (ValidationFailed, InputTooLong, Unauthorized, PayloadTooLarge)


def _elsewhere(m: Target, exc: TarsError) -> bool:
    return isinstance(m, RemoteTarget) and not isinstance(exc, _THE_REQUEST)


class ReplicaSet(Target):
    local: ClassVar[bool] = False

    def __init__(self, model: str, kind: ModelKind, here: str, local: Callable[[], Target | None]) -> None:
        self.model = model
        self.kind = kind
        self.here = here
        self._local = local  # the node's current local target of the model (it may be swapped)
        self.remotes: dict[str, RemoteTarget] = {}
        self.sent: dict[str, int] = {}  # requests in flight from here, per member host
        self._turn = 0  # rotates among equally idle remote members
        self.requests = 0
        self.retried = 0

    @property
    def node(self) -> str:  # type: ignore[override]
        return ",".join(m.node for m in self.members())

    # ------------------------------------------------------------------ members
    def local_member(self) -> Target | None:
        t = self._local()
        return t if t is not None and t.local and t.model == self.model else None

    def members(self) -> list[Target]:
        local = self.local_member()
        return ([local] if local is not None else []) + list(self.remotes.values())

    @staticmethod
    def _live(m: Target) -> bool:
        if isinstance(m, RemoteTarget):
            return not m.peer_down and m.remote_state == TargetState.READY
        return m.state == TargetState.READY

    def _load(self, m: Target) -> int:
        own = self.sent.get(m.node, 0)
        return max(own, m.queue_depth) if m.local else own

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> Target | None:
        """The live member with the least work in flight: the copy here first on a tie, else
        the tied peers in turn."""
        live = [m for m in self.members() if m.node not in exclude and self._live(m)]
        if not live:
            return None
        least = min(self._load(m) for m in live)
        tied = sorted((m for m in live if self._load(m) == least), key=lambda m: (not m.local, m.node))
        if tied[0].local:
            return tied[0]
        self._turn += 1  # equally idle peers take turns, so a third replica is not always last
        return tied[self._turn % len(tied)]

    def _none_left(self, tried: set[str]) -> PeerUnavailable:
        states = ", ".join(f"{m.node}: {'down' if isinstance(m, RemoteTarget) and m.peer_down else m.state}"
                           for m in self.members()) or "none"
        return PeerUnavailable(f"no live replica of '{self.model}' ({states})", model=self.model,
                               peer=",".join(sorted(tried)) or None)

    @property
    def state(self) -> TargetState:
        members = self.members()
        if any(self._live(m) for m in members):
            return TargetState.READY
        if any(m.state == TargetState.LOADING for m in members):
            return TargetState.LOADING
        return TargetState.UNAVAILABLE

    def _begin(self, m: Target) -> None:
        self.sent[m.node] = self.sent.get(m.node, 0) + 1

    def _end(self, m: Target) -> None:
        self.sent[m.node] = max(0, self.sent.get(m.node, 0) - 1)

    # ------------------------------------------------------------------ requests
    async def _call(self, fn: Callable[[Target], Any]) -> Any:
        self.requests += 1
        tried: set[str] = set()
        while True:
            m = self.pick(tried)
            if m is None:
                raise self._none_left(tried)
            self._begin(m)
            try:
                return await fn(m)
            except TarsError as exc:
                if not _elsewhere(m, exc):
                    raise
                tried.add(m.node)
                self.retried += 1
                log.info("replica %s of %s unreachable (%s): trying another", m.node, self.model, exc.message,
                         extra=fields(model=self.model, peer=m.node))
            finally:
                self._end(m)

    async def call_replica(self, fn: Callable[[Target], Any]) -> Any:
        """``await fn(member)`` on the least busy live member, retried on the next as above
        (rerank.py scores a reranker through it)."""
        return await self._call(fn)

    async def generate(self, req: GenerateRequest) -> Completion:
        return await self._call(lambda m: m.generate(req))

    async def embed(self, req: EmbedRequest) -> Embeddings:
        return await self._call(lambda m: m.embed(req))

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        self.requests += 1
        tried: set[str] = set()
        while True:
            m = self.pick(tried)
            if m is None:
                raise self._none_left(tried)
            started = False
            self._begin(m)
            try:
                async for item in m.stream(req):
                    started = True
                    yield item
                return
            except TarsError as exc:
                if started or not _elsewhere(m, exc):
                    raise
                tried.add(m.node)
                self.retried += 1
                log.info("replica %s of %s failed before its first token (%s): trying another", m.node,
                         self.model, exc.message, extra=fields(model=self.model, peer=m.node))
            finally:
                self._end(m)

    # ------------------------------------------------------------------ reporting
    @property
    def queue_depth(self) -> int:
        return sum(m.queue_depth for m in self.members())

    def info(self) -> dict[str, Any]:
        members = self.members()
        return {"id": self.model, "kind": self.kind, "node": self.node, "state": self.state, "local": False,
                "requests": self.requests, "retried": self.retried, "queue_depth": self.queue_depth,
                "replicas": [{"node": m.node, "state": ("down" if isinstance(m, RemoteTarget) and m.peer_down
                                                        else m.state), "in_flight": self._load(m)}
                             for m in members]}

    async def close(self) -> None:
        for r in list(self.remotes.values()):
            await r.close()
        self.remotes.clear()


class Replicas:
    """This host's ReplicaSets, rebuilt from every plan it applies."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.sets: dict[str, ReplicaSet] = {}

    def applied(self, assignments: list[Assignment]) -> None:
        by_model: dict[str, list[Assignment]] = {}
        for a in assignments:
            by_model.setdefault(a.model, []).append(a)
        replicated = {m: al for m, al in by_model.items() if len({a.node for a in al}) > 1}
        for model in [m for m in self.sets if m not in replicated]:
            self._spawn(self.sets.pop(model).close())
        cluster = self.node.cluster
        for model, al in replicated.items():
            rs = self.sets.get(model)
            if rs is None:
                rs = ReplicaSet(model, al[0].kind, self.node.name,
                                lambda model=model: self.node.routes.targets.get(model))
                self.sets[model] = rs
            wanted = {a.node: a for a in al if a.node != self.node.name}
            for name in [n for n in rs.remotes if n not in wanted]:
                self._spawn(rs.remotes.pop(name).close())
            for name, a in wanted.items():
                peer = cluster.table.get(name) if cluster is not None and hasattr(cluster, "table") else None
                current = rs.remotes.get(name)
                if peer is None or (current is not None and current.peer is peer):
                    continue
                if current is not None:
                    self._spawn(current.close())
                rs.remotes[name] = RemoteTarget(model, a.kind, peer, failover=None, assignment=a.to_dict(),
                                                max_batch=4 * int(getattr(self.node.settings, "embed_max_batch", 64)))
            log.info("%s runs on %d hosts: %s", model, len(al), ", ".join(a.node for a in al),
                     extra=fields(model=model))

    def route(self, model: str, target: Target) -> Target:
        rs = self.sets.get(model)
        if rs is None:
            return target
        if FORWARDED.get():  # a peer sent it here to be computed here
            local = rs.local_member()
            return local if local is not None else target
        return rs

    def _spawn(self, coro: Any) -> None:
        from ..tasks import background

        background(coro)

    async def close(self) -> None:
        for rs in list(self.sets.values()):
            await rs.close()
        self.sets.clear()
