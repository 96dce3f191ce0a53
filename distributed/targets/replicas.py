"""``ReplicaSet``: one model on several hosts, each request to the copy that has its prompt's
start cached, else to the least busy live copy.

A plan may hold several assignments of one model (``deploy --replicas N``). ``Routes``
then installs a ``ReplicaSet`` for that model (``Routes.replicate``): its members are the
copy here (the node's own local target, when the plan puts one here) and a
``RemoteTarget`` per other host — each with its own embedding coalescer, and no failover
of its own (the other replicas are the failover). A request goes to the live member with
the least work in flight — for the copy here its queue (which also holds what peers
forwarded), for a peer the requests this host has sent it — the copy here first on a
tie, equally idle peers in turn. A member whose host is down (dead, or it refused a
connection since it last answered: ``RemoteTarget.peer_down``) is skipped at once; a call
that fails before any of its answer came back (connection refused or reset, the host gone
mid-call, the model no longer ready there; for a stream: before its first token) is
retried on the next member, so no request fails while one replica lives. What a failure
says about the request itself (a 400, a 401, too long) is not retried: another replica
would refuse it too.

Cache-aware routing (``TARS_ROUTING=cache``, the default): a chat request whose prompt
starts as a recent request's did (the next turn of a conversation: ``prefix.Prefix``) goes
to the live member that request went to — its engine still holds that prefix's state, so the
prefill is skipped — unless that member's load exceeds the least loaded live member's by more
than ``TARS_CACHE_ROUTE_SLACK`` requests: then the least-loaded rule decides (a queue wait or a
crowded replica costs more than one prefill). Every request records where it went
(``prefix.PrefixIndex``, per set: the index lives on the host the client calls).
``least-loaded`` keeps the rule above alone. ``info()`` counts hits, misses and overrides.

A call a peer forwarded here is computed by the copy here, never forwarded again:
``Routes.resolve(model, here=True)`` returns ``local_member()``, not the set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, TypeVar

from ..domain import Completion, EmbedRequest, Embeddings, GenerateRequest, ModelKind, TokenChunk
from ..errors import InputTooLong, PayloadTooLarge, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from ..logs import fields, get_logger
from ..prefix import Prefix, PrefixIndex
from .base import Target, TargetState
from .remote import RemoteTarget

log = get_logger(__name__)

T = TypeVar("T")

# What a peer replica's failure says about the request itself: another replica would refuse
# it too. Anything else (down, gone mid-call, overloaded, the model not ready there, an
# internal error) happened before any of the answer reached the caller: another replica may
# compute it.
THE_REQUEST = (ValidationFailed, InputTooLong, Unauthorized, PayloadTooLarge)


def _elsewhere(m: Target, exc: TarsError) -> bool:
    return isinstance(m, RemoteTarget) and not isinstance(exc, THE_REQUEST)


class ReplicaSet(Target):
    local: ClassVar[bool] = False

    def __init__(self, model: str, kind: ModelKind, here: str, local: Callable[[], Target | None], *,
                 routing: str = "cache", slack: int = 2) -> None:
        """``local()``: the node's current target of ``model`` (it may be swapped; only a
        local one counts as the copy here). ``routing`` / ``slack``: ``TARS_ROUTING`` and
        ``TARS_CACHE_ROUTE_SLACK`` (the module doc)."""
        self.model = model
        self.kind = kind
        self.here = here
        self._local = local
        self.remotes: dict[str, RemoteTarget] = {}  # host -> its member (changed by Routes only)
        self.sent: dict[str, int] = {}  # requests in flight from here, per member host
        self._turn = 0  # rotates among equally idle remote members
        self.requests = 0
        self.retried = 0
        self.routing = routing
        self.slack = slack
        self.prefixes = PrefixIndex()
        self.cache = {"hits": 0, "misses": 0, "overridden": 0}  # cache-aware picks, by outcome

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
    def live(m: Target) -> bool:
        if isinstance(m, RemoteTarget):
            return not m.peer_down and m.remote_state == TargetState.READY
        return m.state == TargetState.READY

    def load(self, m: Target) -> int:
        """Work in flight on ``m`` as this host sees it."""
        own = self.sent.get(m.node, 0)
        return max(own, m.queue_depth) if m.local else own

    def pick(self, exclude: frozenset[str] | set[str] = frozenset(), prefix: Prefix | None = None) -> Target | None:
        """The live member holding ``prefix``'s longest recorded start, unless its load is
        over the least's + ``slack``; else the live member with the least work in flight:
        the copy here first on a tie, else the tied peers in turn."""
        live = [m for m in self.members() if m.node not in exclude and self.live(m)]
        if not live:
            return None
        least = min(self.load(m) for m in live)
        if prefix is not None and self.routing == "cache":
            by_node = {m.node: m for m in live}
            found = self.prefixes.longest(prefix, by_node.__contains__)
            if found is None:
                self.cache["misses"] += 1
            elif self.load(by_node[found[0]]) - least <= self.slack:
                self.cache["hits"] += 1
                return by_node[found[0]]
            else:
                self.cache["overridden"] += 1
                log.debug("%s: %s holds the prompt's start but is busy (%d in flight, least %d): least loaded instead",
                          self.model, found[0], self.load(by_node[found[0]]), least, extra=fields(model=self.model))
        tied = sorted((m for m in live if self.load(m) == least), key=lambda m: (not m.local, m.node))
        if tied[0].local:
            return tied[0]
        self._turn += 1  # equally idle peers take turns, so a third replica is not always last
        return tied[self._turn % len(tied)]

    def _none_left(self, tried: set[str]) -> PeerUnavailable:
        states = ", ".join(f"{m.node}: {self._member_state(m)}" for m in self.members()) or "none"
        return PeerUnavailable(f"no live replica of '{self.model}' ({states})", model=self.model,
                               peer=",".join(sorted(tried)) or None)

    @staticmethod
    def _member_state(m: Target) -> str:
        return "down" if isinstance(m, RemoteTarget) and m.peer_down else str(m.state)

    @property
    def state(self) -> TargetState:
        members = self.members()
        if any(self.live(m) for m in members):
            return TargetState.READY
        if any(m.state == TargetState.LOADING for m in members):
            return TargetState.LOADING
        return TargetState.UNAVAILABLE

    def _next(self, tried: set[str], prefix: Prefix | None = None) -> Target:
        """The member for the next try, counted in flight (``_done`` ends it); none left → 503."""
        m = self.pick(tried, prefix)
        if m is None:
            raise self._none_left(tried)
        self.sent[m.node] = self.sent.get(m.node, 0) + 1
        if prefix is not None and self.routing == "cache":
            self.prefixes.record(prefix, m.node)  # its engine computes (so caches) this prompt now
        return m

    def drop(self, host: str) -> RemoteTarget:
        """Take ``host``'s member out (Routes, when the plan no longer puts a copy there); the
        prompts it held are forgotten, so a copy placed there again starts with no claims."""
        self.prefixes.forget(host)
        return self.remotes.pop(host)

    def _done(self, m: Target) -> None:
        self.sent[m.node] = max(0, self.sent.get(m.node, 0) - 1)

    def _retry(self, m: Target, exc: TarsError, tried: set[str], when: str) -> None:
        """``m`` failed ``when``: try the next member (or raise, when that is pointless)."""
        if not _elsewhere(m, exc):
            raise exc
        tried.add(m.node)
        self.retried += 1
        log.info("replica %s of %s failed %s (%s): trying another", m.node, self.model, when, exc.message,
                 extra=fields(model=self.model, peer=m.node))

    # ------------------------------------------------------------------ requests
    def _prefix(self, req: GenerateRequest) -> Prefix | None:
        return Prefix.of(req) if self.routing == "cache" else None

    async def call_replica(self, fn: Callable[[Target], Awaitable[T]], prefix: Prefix | None = None) -> T:
        """``await fn(member)`` on the member ``pick`` gives, retried on the next one as the
        module doc says (generate and embed go through it; rerank.py scores a reranker so)."""
        self.requests += 1
        tried: set[str] = set()
        while True:
            m = self._next(tried, prefix)
            try:
                return await fn(m)
            except TarsError as exc:
                self._retry(m, exc, tried, "before its answer")
            finally:
                self._done(m)

    async def generate(self, req: GenerateRequest) -> Completion:
        return await self.call_replica(lambda m: m.generate(req), self._prefix(req))

    async def embed(self, req: EmbedRequest) -> Embeddings:
        return await self.call_replica(lambda m: m.embed(req))

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        self.requests += 1
        tried: set[str] = set()
        prefix = self._prefix(req)
        while True:
            m = self._next(tried, prefix)
            started = False
            items = m.stream(req)
            try:
                async for item in items:
                    started = True
                    yield item
                return
            except TarsError as exc:
                if started:
                    raise
                self._retry(m, exc, tried, "before its first token")
            finally:
                self._done(m)
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()  # our caller left: the member stops now, not at GC

    # ------------------------------------------------------------------ reporting
    @property
    def queue_depth(self) -> int:
        return sum(m.queue_depth for m in self.members())

    def info(self) -> dict[str, Any]:
        return {"id": self.model, "kind": self.kind, "node": self.node, "state": self.state, "local": False,
                "requests": self.requests, "retried": self.retried, "queue_depth": self.queue_depth,
                "routing": {"rule": self.routing, "slack": self.slack, **self.cache},
                "replicas": [{"node": m.node, "state": self._member_state(m), "in_flight": self.load(m)}
                             for m in self.members()]}

    async def close(self) -> None:
        """Close the peer members (the copy here belongs to the node's routes)."""
        remotes, self.remotes = list(self.remotes.values()), {}
        for r in remotes:
            await r.close()
