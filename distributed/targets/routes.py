"""``Routes``: which target serves each model on this host, and every change to that.

This module is the one owner of target swaps. Nothing else adds, replaces or removes
a node's targets or a RemoteTarget's stand-in; the node (plans for this host), the
cluster (plans for peers, failover, heartbeats) and runtime deploys ask it to.

The changes it makes, all make before break:

* ``apply_local(mine, make)`` — this host's share of a plan: load what is assigned
  here, unload local models that are not. A model arriving from a peer that still
  serves it (its target is remote and ready) stays routed there while the copy here
  loads (``_incoming``); the copy takes over once loaded.
* ``route_to_peer(a, peer, make_remote)`` — a model the plan puts on a peer gets a
  RemoteTarget; the ready copy here (if any) becomes its *handoff* stand-in and
  keeps serving until the peer reports the model ready.
* ``adopt_standin(a)`` — a fallback copy already running what the plan now assigns
  here with the same placement is kept (no second load).
* ``fallback(remote, load)`` — the peer of ``remote`` is down: its one stand-in,
  loaded once (later requests wait for the same copy), held until ``settle``.
* ``settle(peer)`` — the peer is back: alive, has answered since its last failure,
  and reports the model ready. Only then are its models' stand-ins dropped (each
  unloads after its requests in flight). A stale "ready" from before a failure
  never drops a stand-in, so failover does not thrash.
* ``replicate(assignments, peer_of, make_remote)`` — a model the plan puts on several
  hosts is served by a ``ReplicaSet`` (targets/replicas.py): the copy here, if any, and a
  RemoteTarget per other host; a request goes to the replica that has its prompt's start
  cached, else to the least busy live one (``TARS_ROUTING``).
* ``set``/``remove`` — direct installs (tests, runtime deploys).

The one routing question, ``resolve(model, here=False)``: the target that serves
``model`` for a request arriving here — a model's ``ReplicaSet`` when it has one, else its
entry in ``targets``. ``here=True`` is for a call a peer forwarded: it must be computed on
this host (the copy here, or a stand-in while the model moves) and is never forwarded
again, else ``ModelLoading`` (two hosts whose tables are converging would otherwise
bounce it between them).

Readers: ``targets`` (model id → the copy here or the RemoteTarget of the host the plan
put it on), ``replicas`` (model id → ReplicaSet), ``get``, ``local()``, ``remote()``,
``standins()``, ``computes_here(target)``, ``describe()`` (``GET /models`` rows);
``fallback_loads`` counts fallback loads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from ..domain import Assignment
from ..errors import ModelLoading
from ..logs import fields, get_logger
from ..tasks import TaskSet
from .base import GONE, Target, TargetState
from .remote import PeerView, RemoteTarget
from .replicas import ReplicaSet

log = get_logger(__name__)

READY, LOADING = TargetState.READY, TargetState.LOADING


async def _drain_then_close(target: Target, limit_s: float = 300.0) -> None:
    """Close ``target`` once no request is queued or running on it (at most ``limit_s``)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while target.queue_depth > 0 and loop.time() < end:
        await asyncio.sleep(0.05)
    await target.close()


def same_placement(a: Assignment | None, b: Assignment | None) -> bool:
    if a is None or b is None:
        return False
    # a split on other hosts is another engine; so is one with another chat template or draft model
    return (a.device, a.n_gpu_layers, a.quant, a.backend, a.split, a.chat_template, _draft(a)) == \
        (b.device, b.n_gpu_layers, b.quant, b.backend, b.split, b.chat_template, _draft(b))


def _draft(a: Assignment) -> tuple[str, str] | None:
    d = getattr(a, "draft", None)
    return (d.get("model"), d.get("device")) if d else None


class Routes:
    """The routing table of one node and the one place that changes it."""

    def __init__(self, node: str, *, routing: str = "cache", slack: int = 2) -> None:
        self.node = node
        self.routing, self.slack = routing, slack  # how a ReplicaSet picks (TARS_ROUTING, TARS_CACHE_ROUTE_SLACK)
        self.targets: dict[str, Target] = {}
        self.replicas: dict[str, ReplicaSet] = {}  # models on several hosts (replicate)
        self._incoming: dict[str, Target] = {}  # copies loading here while a peer still serves the model
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks = TaskSet(f"routes-{node}")
        self.fallback_loads = 0

    # ----------------------------------------------------------------- reading
    def get(self, model: str) -> Target | None:
        return self.targets.get(model)

    def local(self) -> list[Target]:
        """Targets computed on this host."""
        return [t for t in self.targets.values() if t.local]

    def remote(self) -> list[RemoteTarget]:
        return [t for t in self.targets.values() if isinstance(t, RemoteTarget)]

    def standins(self) -> list[Target]:
        """Local copies held for peers' models (fallback or handoff)."""
        return [t.standin for t in self.remote() if t.standin is not None]

    @staticmethod
    def computes_here(target: Target) -> bool:
        """Would a request for ``target`` be computed on this host (locally or by a stand-in)?"""
        return target.local or (isinstance(target, RemoteTarget) and target.serves_here)

    def resolve(self, model: str, *, here: bool = False) -> Target | None:
        """The target serving ``model`` for a request that arrived here (None: not routed).
        ``here``: a call a peer forwarded — the target computing it on this host (a replicated
        model's copy here; a stand-in through its RemoteTarget), never one that forwards it
        again; ``ModelLoading`` when this host does not compute it (the cluster re-plans)."""
        target = self.targets.get(model)
        if target is None:
            return None
        replicas = self.replicas.get(model)
        if replicas is not None:
            if not here:
                return replicas
            target = replicas.local_member() or target
        if here and not self.computes_here(target):
            raise ModelLoading(f"model '{model}' is not served by {self.node} (its routing points to "
                               f"{target.node}); the cluster is re-planning, retry shortly", model=model,
                               node=self.node)
        return target

    def describe(self) -> list[dict[str, Any]]:
        """``Target.info()`` of every routed model; a replicated model's row lists its replicas."""
        rows = []
        for model, target in self.targets.items():
            row = target.info()
            replicas = self.replicas.get(model)
            if replicas is not None:
                extra = replicas.info()
                row["replicas"], row["retried"], row["routing"] = extra["replicas"], extra["retried"], extra["routing"]
            rows.append(row)
        return rows

    # ----------------------------------------------------------------- direct changes
    def set(self, target: Target, *, close_old: bool = True) -> Target | None:
        """Install (or replace) the target for ``target.model``; returns the one replaced.
        A replaced local target is closed unless ``close_old`` is False (the caller keeps it)."""
        old = self.targets.get(target.model)
        self.targets[target.model] = target
        if close_old and old is not None and old.local and old is not target:
            self._tasks.spawn(old.close())
        return old

    def remove(self, model: str, *, close: bool = True) -> Target | None:
        """Stop routing ``model``; returns the target removed (closed unless ``close`` is False;
        a remote one finishes its requests in flight first)."""
        old = self.targets.pop(model, None)
        if close and old is not None:
            self._tasks.spawn(old.close())
        return old

    # ----------------------------------------------------------------- this host's share
    async def apply_local(self, mine: dict[str, Assignment], make: Callable[[Assignment], Target]) -> None:
        """Load what ``mine`` assigns here, unload local targets it does not (see module doc).
        ``make(a)`` builds an unstarted local target placed as ``a``."""
        for model in [m for m in self._incoming if m not in mine]:
            await self._incoming.pop(model).close()
        for model, target in list(self.targets.items()):
            if target.local and model not in mine:
                log.info("unloading %s: no longer assigned here", model, extra=fields(model=model))
                del self.targets[model]
                if target.queue_depth > 0:  # requests in flight finish first (DELETE /models drains)
                    self._tasks.spawn(_drain_then_close(target))
                else:
                    await target.close()
        for model, a in mine.items():
            await self._load_here(model, a, make)

    async def _load_here(self, model: str, a: Assignment, make: Callable[[Assignment], Target]) -> None:
        current = self.targets.get(model)
        if current is not None and current.local and current.state != TargetState.FAILED and \
                same_placement(current.assignment, a):
            return
        incoming = self._incoming.get(model)
        if incoming is not None and incoming.state != TargetState.FAILED and same_placement(incoming.assignment, a):
            return
        target = make(a)
        if current is not None and not current.local and current.state == READY:
            if incoming is not None:
                await self._incoming.pop(model).close()
            self._incoming[model] = target
            log.info("loading %s on %s (%s); %s serves it until then", model, a.device, a.reason, current.node,
                     extra=fields(model=model, n_gpu_layers=a.n_gpu_layers))
            target.start()
            self._tasks.spawn(self._take_over(model, target))
            return
        self.targets[model] = target
        if current is not None and current.local:
            await current.close()  # unload before loading again (VRAM)
        elif current is not None:
            self._tasks.spawn(current.close())  # a remote target finishes its requests in flight
        log.info("loading %s on %s (%s)", model, a.device, a.reason,
                 extra=fields(model=model, backend=a.backend, n_gpu_layers=a.n_gpu_layers))
        target.start()

    async def _take_over(self, model: str, target: Target) -> None:
        """Route ``model`` to the copy loaded here once it has loaded (ready or failed: a
        failure is then reported like any local one); the remote target it replaces
        finishes its requests in flight before it closes."""
        state = await target.wait_loaded()
        if self._incoming.get(model) is not target:
            return  # a newer plan replaced or dropped it
        del self._incoming[model]
        old = self.targets.get(model)
        self.targets[model] = target
        log.info("%s is %s here: routing it here from now on", model, state, extra=fields(model=model))
        if old is not None and old is not target:
            await old.close()

    # ----------------------------------------------------------------- peers' share
    def adopt_standin(self, a: Assignment) -> None:
        """The plan assigns ``a.model`` here: a stand-in already running it as planned
        becomes the local target; one placed differently is dropped (apply_local loads it)."""
        current = self.targets.get(a.model)
        if not isinstance(current, RemoteTarget) or current.standin is None:
            return
        standin = current.standin
        if standin.local and standin.state in (READY, LOADING) and same_placement(standin.assignment, a):
            current.release_standin()
            self.set(standin)
            self._tasks.spawn(current.close())
            log.info("%s is assigned here: keeping the copy already loaded", a.model, extra=fields(model=a.model))
        else:
            current.drop_standin(f"the plan assigns it to {self.node} ({a.device})")

    def route_to_peer(self, a: Assignment, peer: PeerView, make_remote: Callable[[Target | None], RemoteTarget]) -> None:
        """Route ``a.model`` to ``peer``. ``make_remote(handoff)`` builds the RemoteTarget;
        ``handoff`` is the ready copy here that keeps serving until the peer is ready."""
        current = self.targets.get(a.model)
        if isinstance(current, RemoteTarget) and current.peer is peer:
            current.assignment = a.to_dict()
            return
        # Only a copy that serves already is kept: one still loading would just compete
        # with the peer's load for the same cores.
        handoff = current if current is not None and current.local and current.state == READY else None
        self.set(make_remote(handoff), close_old=handoff is None)
        if handoff is not None:
            log.info("%s moves to %s: serving it here until %s reports it ready", a.model, peer.name, peer.name,
                     extra=fields(model=a.model, peer=peer.name))
        if isinstance(current, RemoteTarget):
            self._tasks.spawn(current.close())

    def forget_unplanned(self, planned: Collection[str]) -> None:
        """Remote targets of models the plan no longer has."""
        for target in self.remote():
            if target.model not in planned:
                self.remove(target.model)

    def settle(self, peer: PeerView) -> None:
        """Drop the stand-ins of models ``peer`` serves again: it is alive, has answered
        since its last failure, and (in that fresh report) says the model is ready."""
        if peer.state != "alive" or not peer.reachable:
            return
        for target in self.remote():
            if target.peer is peer and target.standin is not None and target.remote_state == READY:
                target.drop_standin(f"{peer.name} reports it ready")

    def replicate(self, assignments: list[Assignment], peer_of: Callable[[str], PeerView | None],
                  make_remote: Callable[[Assignment, PeerView], RemoteTarget]) -> None:
        """Serve each model the plan puts on several hosts through its ``ReplicaSet``: the copy
        here (``targets``, loaded by ``apply_local``) and a RemoteTarget per other host, built
        by ``make_remote(a, peer)`` (no failover: the other replicas are). A host this node does
        not know yet (``peer_of(name)`` is None) joins the set when it joins (``PlanApplier.met``
        calls this again)."""
        by_model: dict[str, list[Assignment]] = {}
        for a in assignments:
            by_model.setdefault(a.model, []).append(a)
        replicated = {m: al for m, al in by_model.items() if len({a.node for a in al}) > 1}
        for model in [m for m in self.replicas if m not in replicated]:
            self._tasks.spawn(self.replicas.pop(model).close())
        for model, al in replicated.items():
            rs = self.replicas.get(model)
            changed = rs is None
            if rs is None:
                rs = ReplicaSet(model, al[0].kind, self.node, partial(self.targets.get, model), routing=self.routing,
                                slack=self.slack)
                self.replicas[model] = rs
            wanted = {a.node: a for a in al if a.node != self.node}
            for name in [n for n in rs.remotes if n not in wanted]:
                self._tasks.spawn(rs.drop(name).close())
                changed = True
            for name, a in wanted.items():
                peer = peer_of(name)
                current = rs.remotes.get(name)
                if peer is None or (current is not None and current.peer is peer):
                    continue
                if current is not None:
                    self._tasks.spawn(current.close())
                rs.remotes[name] = make_remote(a, peer)
                changed = True
            if changed:  # called again by every plan and every join: said when the set changes
                log.info("%s runs on %d hosts: %s (members known here: %s)", model, len(al),
                         ", ".join(a.node for a in al), ", ".join(m.node for m in rs.members()),
                         extra=fields(model=model))

    async def fallback(self, remote: RemoteTarget, load: Callable[[], Target]) -> Target:
        """The one stand-in of ``remote.model`` while its peer is down: the copy it already
        holds (loading or ready; a handoff copy becomes a fallback), else a new one from
        ``load()`` (unstarted; it raises when the model cannot run here), started here.
        Returns it at once; the caller waits for ``wait_loaded``."""
        lock = self._locks.setdefault(remote.model, asyncio.Lock())
        async with lock:
            standin = remote.standin
            if standin is None or standin.state in GONE:
                if standin is not None:
                    remote.release_standin()
                    self._tasks.spawn(standin.close())
                standin = load()
                standin.start()
                self.fallback_loads += 1
            remote.hold(standin, handoff=False)
        return standin

    # ----------------------------------------------------------------- lifecycle
    async def close(self) -> None:
        await asyncio.gather(*self._tasks.cancel(), return_exceptions=True)
        targets: list[Target] = [*self.replicas.values(), *self.targets.values(), *self._incoming.values()]
        self.replicas.clear()
        self.targets.clear()
        self._incoming.clear()
        await asyncio.gather(*(t.close() for t in targets), return_exceptions=True)
