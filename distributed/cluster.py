"""The cluster's orchestration: join, heartbeat loops, applying plans, failover.

What is known about each peer (liveness alive → suspect → dead, the models it
reports, its live figures) lives in ``peers.py``; this module decides when things
happen and what the node does about them.

Two roles (``settings.effective_role``):

* the **server** (no ``TARS_PEERS``; PC1 in the reference setup) accepts joins,
  runs the planner over every live host's profile and hands the plan back;
* a **worker** (``TARS_PEERS=http://pc1:8000``) joins it, retrying with
  exponential backoff until it answers, then applies the plan it got.

Both apply the same plan (``_apply``): the node loads this host's share, every model
assigned to another host is routed to it (``Routes.route_to_peer``), and a model on
several hosts is served by its replicas (``Routes.replicate``), so any host answers every
request. The plan itself comes from the node (``ClusterNode.plan_for``: the desired set
placed over the live hosts, deploy/placement.py). Every change of which target serves a model goes through
the node's ``targets.Routes`` (the one owner of target swaps): re-plans are make
before break, a model moving away keeps being served by the copy here until its new
host reports it ready.

Heartbeats go both ways every ``TARS_HEARTBEAT_S``. Each carries the sender's
local models (id, state, queue, rates) — that is the shared routing table — its
live figures and the plan id; the server answers a worker whose plan id is stale
with the current plan. A missed beat makes a peer suspect, three in a row dead.
A dead peer stays in the table and keeps being probed, so it is noticed when it
returns. A restarted worker simply joins again; a restarted server answers the
worker's next heartbeat with ``known: false`` and the worker rejoins. Nothing
else restarts. ``cluster.leave`` (sent on shutdown) marks a peer "left".

Failover (``failover``): a request for a model whose host is down (dead, or it
refused a connection since it last answered) is served here when ``TARS_FALLBACK``
is on and the planner says it fits beside what this host already runs; the answer
says ``fallback: true``. One stand-in per model, loaded once and kept until the peer
is back and has answered (``Routes.fallback``/``Routes.settle``). Otherwise it fails
at once with ``PeerUnavailable`` (503) naming the peer.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from functools import partial
from typing import Any

import orjson

from . import __version__, peer_urls
from .domain import Assignment, HostProfile, Plan
from .errors import ConfigError, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from .failover import serve_here
from .logs import fields, get_logger
from .peers import VITALS, ClientFactory, Peer, PeerState, PeerTable
from .peers import client_factory as default_clients
from .rpc.client import PeerClient
from .seams import ClusterNode
from .settings import Settings
from .targets import PeerView, RemoteTarget, Target
from .tasks import TaskSet, background
from .tls import Pins

log = get_logger(__name__)

__all__ = ["Cluster", "Peer", "plan_id"]


def _llama_cpp() -> str:
    """The llama.cpp this install runs (the llama-cpp-python release that vendors it; "" unknown)."""
    from .engine.binary import llama_cpp_python_version

    return llama_cpp_python_version()


def plan_id(plan: Plan) -> str:
    return hashlib.sha1(orjson.dumps(plan.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class Cluster:
    """The cluster layer of one node. The composition root (``service.build``) hands it
    the node's ``peers`` table (shared with the node and the split service) and the TLS
    ``pins`` its clients trust; without them it makes its own (``client_factory(url) ->
    PeerClient``: how it reaches a peer; tests pass one wired to in-process apps)."""

    def __init__(self, node: ClusterNode, settings: Settings, peers: PeerTable | None = None, *,
                 pins: Pins | None = None, client_factory: ClientFactory | None = None) -> None:
        self.node = node
        self.settings = settings
        self.name: str = node.name
        self.seeds: list[str] = list(settings.peers)
        self.role: str = settings.effective_role
        self.pins = pins or Pins.from_settings(settings)  # TLS fingerprints trusted for https:// peers (tls.py)
        factory = client_factory or default_clients(settings, self.pins)
        self.table = peers if peers is not None else PeerTable(self.name, factory)
        self.server: str | None = None if self.seeds else self.name  # who plans
        self.plan_id = ""
        self.interval = float(settings.heartbeat_s)
        self._tasks = TaskSet(f"cluster-{self.name}")
        self._joining: set[str] = set()
        self._plan_lock = asyncio.Lock()
        self._running = False
        self._vitals: dict[str, Any] = {}
        self._vitals_at = -1e9

    @property
    def peers(self) -> dict[str, Peer]:
        """name -> Peer (the table's own dict)."""
        return self.table.peers

    @property
    def is_planner(self) -> bool:
        return self.server == self.name

    def planner_client(self) -> PeerClient | None:
        """The client of the host that plans, or None when this host plans (runtime deploys
        are forwarded there); ``ConfigError`` on a worker that has not joined yet."""
        if self.is_planner:
            return None
        peer = self.peers.get(self.server) if self.server else None
        if peer is None:
            raise ConfigError(f"{self.name} is a worker that has not joined its server yet; retry shortly")
        return peer.client

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        await self.node.start()  # idempotent: the app lifespan normally did it already
        for url in self.seeds:
            self._spawn_join(url)
        self._tasks.spawn(self._heartbeat_loop(), name=f"heartbeat-{self.name}")

    def _spawn_join(self, url: str) -> None:
        if url in self._joining or not self._running:
            return
        self._joining.add(url)
        task = self._tasks.spawn(self._join_loop(url), name=f"join-{url}")
        task.add_done_callback(lambda t: self._joining.discard(url))

    async def stop(self) -> None:
        """Say goodbye to live peers (best effort, bounded) and close the clients."""
        if not self._running:
            return
        self._running = False
        await asyncio.gather(*self._tasks.cancel(), return_exceptions=True)
        await asyncio.gather(*(self._leave(p) for p in self.table.live()), return_exceptions=True)
        await self.table.close()

    async def _leave(self, peer: Peer) -> None:
        try:
            await peer.client.call("cluster.leave", {"name": self.name}, timeout=1.0, retries=0)
            log.info("left peer %s", peer.name, extra=fields(peer=peer.name))
        except TarsError as exc:
            log.info("could not tell %s we are leaving: %s", peer.name, exc.message)

    # ----------------------------------------------------------------- joining (worker)
    def _join_params(self) -> dict[str, Any]:
        profile = self.node.profile
        return {"name": self.name, "url": self.settings.base_url, "role": self.role, "version": __version__,
                "llama_cpp": _llama_cpp(),
                "profile": profile.to_dict() if profile is not None else {}, "models": self._local_models(),
                "fingerprint": self.pins.own, **{k: v for k, v in self.vitals().items() if k == "gpus"}}

    async def _join_loop(self, url: str) -> None:
        """cluster.join until it answers; backoff 0.25 s doubling to 5 s; each attempt logged."""
        client = self.table.client(url)
        delay, attempt = 0.25, 0
        while True:
            attempt += 1
            try:
                answer = await client.call("cluster.join", self._join_params(), retries=0)
                break
            except (Unauthorized, ValidationFailed, ConfigError) as exc:
                log.error("joining %s refused (attempt %d): %s; retrying in %.1f s", url, attempt, exc.message,
                          delay, extra=fields(peer=url, attempt=attempt))
            except TarsError as exc:
                log.warning("joining %s failed (attempt %d): %s; retrying in %.1f s", url, attempt, exc.message,
                            delay, extra=fields(peer=url, attempt=attempt))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        try:
            await self._joined(url, client, answer)
        except TarsError as exc:
            log.error("the join answer from %s was unusable: %s", url, exc.message)
            await client.aclose()

    async def _joined(self, url: str, client: PeerClient, answer: dict[str, Any]) -> None:
        try:
            server = peer_urls.check_name(answer["server"], "server")
            plan = Plan.from_dict(answer["plan"])
        except (KeyError, TypeError, ValueError):
            raise ValidationFailed(f"peer at {url} sent a join answer without server/plan") from None
        client.name = server
        peer = self.table.upsert(server, url, role=str(answer.get("role", "server")), client=client,
                                 profile=answer.get("profile"), models=answer.get("models", []),
                                 version=str(answer.get("version", "")))
        peer.answered()
        self.server = server
        for other in answer.get("peers", []):
            self.table.learn(other)
        log.info("joined %s at %s: plan %s", server, url, answer.get("plan_id", ""),
                 extra=fields(peer=server, assignments=len(plan.assignments)))
        await self._apply(plan, str(answer.get("plan_id") or plan_id(plan)))

    # ----------------------------------------------------------------- RPC handlers
    async def handle_join(self, name: str, url: str, profile: dict[str, Any], role: str = "worker",
                          version: str = "", llama_cpp: str = "", models: list[dict[str, Any]] | None = None,
                          fingerprint: str = "", gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A host joins (or rejoins after a restart): replan over every live host, apply, answer the plan."""
        if self.role == "standalone":
            raise ConfigError(f"node {self.name} runs standalone (TARS_ROLE=standalone) and accepts no peers")
        if not self.is_planner:
            raise ValidationFailed(f"node {self.name} is a worker; join the server {self.server or '(unknown)'} "
                                   "instead", field="TARS_PEERS")
        name = peer_urls.check_name(name)
        mine = _llama_cpp()
        if llama_cpp and mine and llama_cpp != mine and self.settings.split != "off":
            raise ConfigError(f"{name} runs llama.cpp of llama-cpp-python {llama_cpp} and {self.name} runs {mine}: "
                              "a model split across hosts needs one llama.cpp version on both (install the same "
                              "llama-cpp-python and rebuild the engine with scripts/build_engine.sh, or set "
                              "TARS_SPLIT=off on the server)", peer=name, peer_version=llama_cpp, version=mine)
        if name == self.name:
            raise ValidationFailed(f"node name '{name}' is already taken by the node you are joining; give each "
                                   "host its own TARS_NODE_NAME", field="name")
        url = peer_urls.check_url(url)
        await peer_urls.check_join_origin(url)  # the URL must point back at the host that sent the join
        if fingerprint and url.startswith("https://"):  # its TLS certificate, told over the token-checked channel
            self.pins.add(fingerprint)
        try:
            host = HostProfile.from_dict(profile)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValidationFailed(f"cluster.join: 'profile' is not a host profile ({exc})", field="profile") from None
        known = name in self.peers
        peer = self.table.upsert(name, url, role=role, profile=host, models=models or [], version=version)
        peer.answered()
        peer.report(gpus=gpus)  # its live GPU figures, sent with the join: checked against the profile now
        peer_urls.recheck_vram(peer, log)  # no models while its live VRAM figures disagree
        log.info("peer %s %s from %s", name, "rejoined" if known else "joined", url,
                 extra=fields(peer=name, gpu=host.best_gpu.name if host.best_gpu else "cpu"))
        plan = self._replan()
        await self._apply(plan, plan_id(plan))
        return {"server": self.name, "role": self.role, "url": self.settings.base_url, "version": __version__,
                "plan": plan.to_dict(), "plan_id": self.plan_id,
                "profile": self.node.profile.to_dict() if self.node.profile is not None else None,
                "models": self._local_models(), "peers": self.table.listing(exclude=name)}

    async def handle_heartbeat(self, name: str, url: str = "", models: list[dict[str, Any]] | None = None,
                               plan_id: str = "", sent_at: float = 0.0, gpus: list[dict[str, Any]] | None = None,
                               totals: dict[str, Any] | None = None,
                               ram: dict[str, Any] | None = None) -> dict[str, Any]:
        peer = self.table.get(peer_urls.check_name(name))
        if peer is None or peer.state == PeerState.LEFT:
            if self.is_planner or not url:
                return {"known": False, "name": self.name}  # → the sender joins (again)
            peer = self.table.upsert(name, peer_urls.check_url(url))
        peer.answered()
        peer.report(models or [], gpus, totals, ram)
        if peer_urls.recheck_vram(peer, log) and self.is_planner:  # its live VRAM now (dis)agrees with its profile
            background(self._reapply())
        self._settle(peer)
        out: dict[str, Any] = {"known": True, "name": self.name, "models": self._local_models(),
                               "plan_id": self.plan_id, **self.vitals()}
        if self.is_planner:
            if plan_id != self.plan_id:
                out["plan"] = self.node.plan.to_dict()
            out["peers"] = self.table.listing(exclude=name)
        return out

    async def handle_leave(self, name: str) -> dict[str, Any]:
        peer = self.table.get(name)
        if peer is None:
            return {"ok": True, "known": False}
        peer.set_state(PeerState.LEFT, "it said goodbye")
        return {"ok": True, "known": True}

    # ----------------------------------------------------------------- heartbeats
    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time() - self.interval)  # never try to "catch up" a burst
            peers = [p for p in self.table if p.state != PeerState.LEFT]
            if peers:
                await asyncio.gather(*(self._beat(p) for p in peers), return_exceptions=True)

    def vitals(self) -> dict[str, Any]:
        """This host's live figures for heartbeats: ``gpus`` (live GPUInfo dicts), ``totals``
        (as in /status) and ``ram``. Cached for half a heartbeat interval, so answering
        several peers' beats costs one NVML read."""
        now = time.monotonic()
        if now - self._vitals_at < self.interval / 2:
            return self._vitals
        out: dict[str, Any] = {}
        try:
            out["gpus"] = [g.to_dict() for g in self.node.live_gpus()]
            out["totals"] = self.node.totals()
            out["ram"] = self.node.ram()
        except Exception as exc:  # noqa: BLE001 - figures are a nicety; the beat itself must go out
            log.debug("live figures unavailable: %s", exc)
        self._vitals, self._vitals_at = out, now
        return out

    async def _beat(self, peer: Peer) -> None:
        params = {"name": self.name, "url": self.settings.base_url, "models": self._local_models(),
                  "plan_id": self.plan_id, "sent_at": time.time()}
        if peer.takes_vitals:
            params.update(self.vitals())
        timeout = min(self.settings.rpc_timeout_s, self.interval)
        t0 = time.perf_counter()
        try:
            try:
                answer = await peer.client.call("cluster.heartbeat", params, timeout=timeout, retries=0)
            except ValidationFailed as exc:
                if exc.details.get("field") not in VITALS:
                    raise
                # An older peer refuses parameters it does not know: beat without the figures from now on.
                log.info("%s does not take live figures in heartbeats (an older version): sending none",
                         peer.name, extra=fields(peer=peer.name))
                peer.takes_vitals = False
                for key in VITALS:
                    params.pop(key, None)
                t0 = time.perf_counter()
                answer = await peer.client.call("cluster.heartbeat", params, timeout=timeout, retries=0)
        except TarsError as exc:
            peer.missed_beat(exc.message, refused=isinstance(exc, PeerUnavailable) and
                             exc.details.get("phase") == "connect")
            return
        peer.answered(rtt_ms=(time.perf_counter() - t0) * 1000)
        if not answer.get("known", True):
            if peer.name == self.server or peer.url in self.seeds:
                log.warning("%s does not know us (it restarted?): joining again", peer.name,
                            extra=fields(peer=peer.name))
                self._spawn_join(peer.url if peer.url in self.seeds else self.seeds[0] if self.seeds else peer.url)
            return
        peer.report(answer.get("models", []), answer.get("gpus"), answer.get("totals"), answer.get("ram"))
        self._settle(peer)
        for other in answer.get("peers", []):
            self.table.learn(other)
        new_plan = answer.get("plan")
        if new_plan is not None and peer.name == self.server and answer.get("plan_id") != self.plan_id:
            log.info("plan changed on %s: applying %s", peer.name, answer.get("plan_id"))
            await self._apply(Plan.from_dict(new_plan), str(answer.get("plan_id")))

    def _local_models(self) -> list[dict[str, Any]]:
        return [t.info() for t in self.node.local_targets()]

    # ----------------------------------------------------------------- planning
    def hosts(self) -> dict[str, HostProfile]:
        """The hosts a plan may use: this one and every live, trusted peer."""
        profile = self.node.profile
        if profile is None:  # node.start() profiles before the cluster starts
            raise ConfigError(f"{self.name} has not profiled its hardware yet; retry shortly")
        hosts: dict[str, HostProfile] = {self.name: profile}
        for peer in sorted(self.table.live(), key=lambda p: p.name):
            if peer.profile is not None and peer_urls.trusted(peer):  # no models until its figures agree
                hosts[peer.name] = peer.profile
        return hosts

    async def replan(self) -> None:
        """Plan again over the live hosts and apply it everywhere (runtime deploys; the
        workers get it with their next heartbeat)."""
        await self._reapply()

    def _replan(self) -> Plan:
        return self.node.plan_for(self.hosts())  # the desired set over the live hosts (deploy/placement.py)

    async def _reapply(self) -> None:
        plan = self._replan()
        await self._apply(plan, plan_id(plan))

    async def _apply(self, plan: Plan, pid: str) -> None:
        """This host's share via the node; every model on another host routed to it.

        Make before break, both ways (``targets/routes.py`` does each swap). A model
        leaving this host for a peer: the copy here becomes the RemoteTarget's handoff
        stand-in and keeps serving until the peer reports the model ready (``settle``). A
        model coming here from a peer that still serves it: the node keeps routing there
        until the copy here has loaded; a fallback copy that already runs it as planned is
        adopted instead of loaded again."""
        routes = self.node.routes
        async with self._plan_lock:
            self.plan_id = pid
            for a in plan.for_node(self.name):
                routes.adopt_standin(a)
            hosts_of: dict[str, set[str]] = {}
            for a in plan.assignments:
                hosts_of.setdefault(a.model, set()).add(a.node)
            routed: set[str] = set()
            for a in plan.assignments:
                if a.node == self.name:
                    continue
                if len(hosts_of[a.model]) > 1 and (self.name in hosts_of[a.model] or a.model in routed):
                    continue  # replicas: their ReplicaSet routes among them (below); the table keeps one
                routed.add(a.model)
                peer = self.table.get(a.node)
                if peer is None:
                    log.warning("plan puts %s on %s, a host this node does not know yet", a.model, a.node)
                    continue
                routes.route_to_peer(a, peer, partial(self._remote, a, peer))
            await self.node.apply_plan(plan)
            routes.replicate(plan.assignments, self.table.get, self._replica)
            routes.forget_unplanned({a.model for a in plan.assignments})
            for peer in self.table:
                routes.settle(peer)

    def _remote(self, a: Assignment, peer: PeerView, handoff: Target | None) -> RemoteTarget:
        """A model the plan puts on ``peer``, failing over here while it is down (``handoff``:
        the copy here that serves until the peer reports the model ready)."""
        return RemoteTarget(a.model, a.kind, peer, failover=self.failover, assignment=a.to_dict(),
                            max_batch=4 * self.settings.embed_max_batch, handoff=handoff)

    def _replica(self, a: Assignment, peer: PeerView) -> RemoteTarget:
        """A peer's member of a replicated model: no failover of its own (the other replicas are)."""
        return RemoteTarget(a.model, a.kind, peer, failover=None, assignment=a.to_dict(),
                            max_batch=4 * self.settings.embed_max_batch)

    def _settle(self, peer: Peer) -> None:
        """``peer`` answered with a fresh report: drop the stand-ins of the models it serves again."""
        self.node.routes.settle(peer)

    # ----------------------------------------------------------------- failover
    async def failover(self, remote: RemoteTarget, cause: PeerUnavailable) -> Target:
        """Serve ``remote.model`` here while its host is down, or raise PeerUnavailable naming it
        (``failover.serve_here``: one stand-in per model, loaded once, shared by every request)."""
        return await serve_here(self.node, self.settings, remote, cause)

    # ----------------------------------------------------------------- reporting
    def peers_status(self) -> list[dict[str, Any]]:
        return self.table.status()

    def routing(self) -> dict[str, str]:
        """model id → host that computes it (this node's view)."""
        return {m: t.node for m, t in self.node.routes.targets.items()}
