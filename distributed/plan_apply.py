"""Applying a plan on this host: its share loaded, every other model routed to its host.

``PlanApplier.apply(plan, pid)`` is what every host does with the plan in force, the
planner's own or one it accepted (``cluster.py``): the node loads this host's share, every
model assigned to another host is routed to it (``Routes.route_to_peer``), and a model on
several hosts is served by its replicas (``Routes.replicate``), so any host answers every
request. Every change of which target serves a model goes through the node's
``targets.Routes`` (the one owner of target swaps), make before break both ways:

* a model leaving this host for a peer: the copy here becomes the RemoteTarget's handoff
  stand-in and keeps serving until the peer reports the model ready;
* a model coming here from a peer that still serves it: the node keeps routing there until
  the copy here has loaded; a fallback copy that already runs it as planned is adopted
  instead of loaded again.

``settle(peer)``: a peer that answered with a fresh report gets its models back from their
stand-ins — once it has been steady (alive and reachable) for ``settle_s``, two heartbeats,
so a link that flaps keeps the stand-ins instead of loading and dropping one per flap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from .domain import Assignment, Plan
from .logs import get_logger
from .peers import Peer, PeerTable
from .seams import ClusterNode
from .settings import Settings
from .targets import PeerView, RemoteTarget, Target
from .targets.remote import Failover

log = get_logger(__name__)


class PlanApplier:
    def __init__(self, node: ClusterNode, table: PeerTable, settings: Settings, failover: Failover,
                 learn: Callable[[str], Peer | None] = lambda name: None) -> None:
        """``learn(name)``: a host the plan names that this node has not met yet (the cluster
        adds it from the replicated membership, and joins it)."""
        self.node = node
        self.learn = learn
        self.table = table
        self.settings = settings
        self.failover = failover
        self.name = node.name
        self.plan_id = ""  # of the plan applied here last
        self.plan: Plan | None = None  # that plan
        self.settle_s = 2 * float(settings.heartbeat_s)
        self.lock = asyncio.Lock()

    async def apply(self, plan: Plan, pid: str, *, force: bool = False) -> bool:
        """Apply ``plan`` here; False (nothing done) when it is the plan applied already
        (``force``: apply it again, e.g. to reload a model that failed here)."""
        routes = self.node.routes
        async with self.lock:
            if pid == self.plan_id and not force:
                return False
            self.plan_id = pid
            self.plan = plan
            for a in plan.for_node(self.name):
                routes.adopt_standin(a)
            self._route_to_peers(plan, warn=True)
            await self.node.apply_plan(plan)
            routes.replicate(plan.assignments, self._peer, self._replica)
            routes.forget_unplanned({a.model for a in plan.assignments})
            for peer in self.table:
                self.settle(peer)
        return True

    def met(self, peer: Peer) -> None:
        """``peer`` joined (or rejoined): the models the plan in force puts on it are routed
        to it now. A plan applied before this node knew the host skipped them (a replica
        member, a model only that host serves), and no later plan may come to add them."""
        plan = self.plan
        if plan is None or not any(a.node == peer.name for a in plan.assignments):
            return
        self._route_to_peers(plan, warn=False)
        self.node.routes.replicate(plan.assignments, self._peer, self._replica)

    def _peer(self, name: str) -> Peer | None:
        return self.table.get(name) or self.learn(name)

    def _route_to_peers(self, plan: Plan, *, warn: bool) -> None:
        """Route each model the plan puts only on other hosts to its host (replicas of a model
        also planned here are routed by their ReplicaSet; the table keeps one)."""
        hosts_of: dict[str, set[str]] = {}
        for a in plan.assignments:
            hosts_of.setdefault(a.model, set()).add(a.node)
        routed: set[str] = set()
        for a in plan.assignments:
            if a.node == self.name:
                continue
            if len(hosts_of[a.model]) > 1 and (self.name in hosts_of[a.model] or a.model in routed):
                continue
            routed.add(a.model)
            peer = self._peer(a.node)
            if peer is None:
                if warn:
                    log.warning("plan puts %s on %s, a host this node does not know yet: routed there once it "
                                "joins", a.model, a.node)
                continue
            self.node.routes.route_to_peer(a, peer, partial(self._remote, a, peer))

    def settle(self, peer: Peer) -> None:
        """``peer`` answered with a fresh report: once steady, its models leave their stand-ins."""
        if peer.steady(self.settle_s):
            self.node.routes.settle(peer)

    def _remote(self, a: Assignment, peer: PeerView, handoff: Target | None) -> RemoteTarget:
        """A model the plan puts on ``peer``, failing over here while it is down (``handoff``:
        the copy here that serves until the peer reports the model ready)."""
        return RemoteTarget(a.model, a.kind, peer, failover=self.failover, assignment=a.to_dict(),
                            max_batch=4 * self.settings.embed_max_batch, handoff=handoff)

    def _replica(self, a: Assignment, peer: PeerView) -> RemoteTarget:
        """A peer's member of a replicated model: no failover of its own (the other replicas are)."""
        return RemoteTarget(a.model, a.kind, peer, failover=None, assignment=a.to_dict(),
                            max_batch=4 * self.settings.embed_max_batch)
