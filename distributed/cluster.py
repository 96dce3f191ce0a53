"""Membership: join, heartbeats, liveness, the routing table, failover.

Two roles (``settings.effective_role``):

* the **server** (no ``TARS_PEERS``; PC1 in the reference setup) accepts joins,
  runs the planner over every live host's profile and hands the plan back;
* a **worker** (``TARS_PEERS=http://pc1:8000``) joins it, retrying with
  exponential backoff until it answers, then applies the plan it got.

Both apply the same plan: ``node.apply_plan`` loads this host's share and unloads
what moved away, and the cluster installs a ``RemoteTarget`` for every model
assigned to another host, so either host answers every request.

Heartbeats go both ways every ``TARS_HEARTBEAT_S``. Each carries the sender's
local models (id, state, queue, rates) — that is the shared routing table — and
the plan id; the server answers a worker whose plan id is stale with the
current plan. Liveness per peer, from the calls *we* make to it::

    alive --1 missed beat--> suspect --3 missed in a row--> dead
      ^------------------- any answered beat ----------------'

A dead peer stays in the table and keeps being probed, so it is noticed when it
returns. A restarted worker simply joins again; a restarted server answers the
worker's next heartbeat with ``known: false`` and the worker rejoins. Nothing
else restarts. ``cluster.leave`` (sent on shutdown) marks a peer "left".

Failover (``failover``): a request for a model whose host is down is served
here when ``TARS_FALLBACK`` is on and the planner says it fits beside what this
host already runs; the answer says ``fallback: true``. Otherwise it fails at
once with ``PeerUnavailable`` (503) naming the peer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import orjson

from . import __version__
from .domain import Assignment, GPUInfo, HostProfile, ModelSpec, Plan
from .errors import ConfigError, ModelFailed, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from .logs import fields, get_logger
from .rpc.client import PeerClient
from .rpc.remote import RemoteTarget
from .targets import LocalTarget, Target

log = get_logger(__name__)

ClientFactory = Callable[[str], PeerClient]

DEAD_AFTER = 3  # missed heartbeats in a row
LIVE = ("alive", "suspect")
VITALS = ("gpus", "totals", "ram")  # live figures a heartbeat carries (optional: older peers send none)


def _numbers(value: Any) -> dict[str, Any] | None:
    """A reported figures dict, keeping only numeric values (a peer's word is not trusted blindly)."""
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _gpu_dicts(value: Any) -> list[dict[str, Any]] | None:
    """Reported live GPU figures: entries that read as a GPUInfo, passed on as sent."""
    if not isinstance(value, list):
        return None
    out = []
    for g in value:
        try:
            GPUInfo.from_dict(g)
        except (TypeError, ValueError, AttributeError):
            continue
        out.append(g)
    return out


class Peer:
    """Another host as this node knows it (RemoteTargets hold a reference, so a
    peer that rejoins keeps the same object and its targets come back by themselves)."""

    def __init__(self, name: str, url: str, client: PeerClient, role: str = "worker") -> None:
        self.name = name
        self.url = url
        self.client = client
        self.role = role
        self.profile: HostProfile | None = None
        self.version = ""
        self.state = "alive"
        self.missed = 0
        self.last_seen: float | None = None
        self.rtt_ms: float | None = None
        self.gone = asyncio.Event()  # set while dead or left: in-flight calls end at once
        self._models: dict[str, dict[str, Any]] = {}
        # Live figures from its heartbeats; None until it reports them (an older peer never does).
        self.gpus: list[dict[str, Any]] | None = None
        self.totals: dict[str, Any] | None = None
        self.ram: dict[str, Any] | None = None
        self.takes_vitals = True  # False once it refused them (an older version): beats go without

    def set_vitals(self, gpus: Any = None, totals: Any = None, ram: Any = None) -> None:
        """Keep what the peer reported; a figure it did not send keeps its last value."""
        gpus, totals, ram = _gpu_dicts(gpus), _numbers(totals), _numbers(ram)
        if gpus is not None:
            self.gpus = gpus
        if totals is not None:
            self.totals = totals
        if ram is not None:
            self.ram = ram

    def model_info(self, model: str) -> dict[str, Any] | None:
        return self._models.get(model)

    def set_models(self, models: list[dict[str, Any]]) -> None:
        self._models = {m["id"]: m for m in models if isinstance(m, dict) and "id" in m}

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def status(self) -> dict[str, Any]:
        gpu = self.profile.best_gpu if self.profile is not None else None
        return {
            "name": self.name, "url": self.url, "role": self.role, "state": self.state,
            "last_heartbeat_s": None if self.last_seen is None else round(time.monotonic() - self.last_seen, 3),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "gpu": None if gpu is None else {"name": gpu.name, "vram_total_mb": gpu.vram_total_mb},
            "models": [{"id": m, "state": i.get("state"), "kind": i.get("kind")} for m, i in self._models.items()],
            "missed_heartbeats": self.missed, "version": self.version,
            "gpus": self.gpus, "totals": self.totals, "ram": self.ram,
        }


_BACKGROUND: set[asyncio.Task[Any]] = set()


def _background(coro: Any) -> None:
    """Fire and forget, keeping a reference so the task is not garbage-collected mid-way."""
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def _same_assignment(a: Assignment, b: Assignment) -> bool:
    return (a.device, a.n_gpu_layers, a.quant, a.backend) == (b.device, b.n_gpu_layers, b.quant, b.backend)


def plan_id(plan: Plan) -> str:
    return hashlib.sha1(orjson.dumps(plan.to_dict(), option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class Cluster:
    """The cluster layer of one node. ``client_factory(url) -> PeerClient`` is how it
    reaches a peer (tests pass one wired to in-process apps)."""

    def __init__(self, node: Any, settings: Any, client_factory: ClientFactory | None = None) -> None:
        self.node = node
        self.settings = settings
        self.name: str = node.name
        self.seeds: list[str] = list(settings.peers)
        self.role: str = settings.effective_role
        self.peers: dict[str, Peer] = {}
        self.server: str | None = None if self.seeds else self.name  # who plans
        self.plan_id = ""
        self.interval = float(settings.heartbeat_s)
        self._factory = client_factory or self._default_client
        self._tasks: list[asyncio.Task[Any]] = []
        self._joining: set[str] = set()
        self._plan_lock = asyncio.Lock()
        self._fallback_locks: dict[str, asyncio.Lock] = {}
        self._running = False
        self._vitals: dict[str, Any] = {}
        self._vitals_at = -1e9

    def _default_client(self, url: str) -> PeerClient:
        s = self.settings
        return PeerClient(url, s.cluster_token.get_secret_value(), timeout=s.rpc_timeout_s,
                          long_timeout=s.request_timeout_s)

    @property
    def is_planner(self) -> bool:
        return self.server == self.name

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        await self.node.start()  # idempotent: the app lifespan normally did it already
        loop = asyncio.get_running_loop()
        for url in self.seeds:
            self._spawn_join(url)
        self._tasks.append(loop.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.name}"))

    def _spawn_join(self, url: str) -> None:
        if url in self._joining or not self._running:
            return
        self._joining.add(url)
        task = asyncio.get_running_loop().create_task(self._join_loop(url), name=f"join-{url}")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._joining.discard(url))

    async def stop(self) -> None:
        """Say goodbye to live peers (best effort, bounded) and close the clients."""
        if not self._running:
            return
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        live = [p for p in self.peers.values() if p.state in LIVE]
        await asyncio.gather(*(self._leave(p) for p in live), return_exceptions=True)
        await asyncio.gather(*(p.client.aclose() for p in self.peers.values()), return_exceptions=True)

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
                "profile": profile.to_dict() if profile is not None else {}, "models": self._local_models()}

    async def _join_loop(self, url: str) -> None:
        """cluster.join until it answers; backoff 0.25 s doubling to 5 s; each attempt logged."""
        client = self._factory(url)
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
            server = str(answer["server"])
            plan = Plan.from_dict(answer["plan"])
        except (KeyError, TypeError, ValueError):
            raise ValidationFailed(f"peer at {url} sent a join answer without server/plan") from None
        client.name = server
        peer = self._upsert(server, url, role=str(answer.get("role", "server")), client=client,
                            profile=answer.get("profile"), models=answer.get("models", []),
                            version=str(answer.get("version", "")))
        self._alive(peer)
        self.server = server
        for other in answer.get("peers", []):
            self._learn(other)
        log.info("joined %s at %s: plan %s", server, url, answer.get("plan_id", ""),
                 extra=fields(peer=server, assignments=len(plan.assignments)))
        await self._apply(plan, str(answer.get("plan_id") or plan_id(plan)))

    def _learn(self, other: Any) -> None:
        """A peer we heard of through the server (clusters of 3+ hosts)."""
        if not isinstance(other, dict) or not other.get("name") or not other.get("url"):
            return
        if other["name"] != self.name and other["name"] not in self.peers:
            self._upsert(str(other["name"]), str(other["url"]), role=str(other.get("role", "worker")))

    # ----------------------------------------------------------------- RPC handlers
    async def handle_join(self, name: str, url: str, profile: dict[str, Any], role: str = "worker",
                          version: str = "", models: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A host joins (or rejoins after a restart): replan over every live host, apply, answer the plan."""
        if self.role == "standalone":
            raise ConfigError(f"node {self.name} runs standalone (TARS_ROLE=standalone) and accepts no peers")
        if not self.is_planner:
            raise ValidationFailed(f"node {self.name} is a worker; join the server {self.server or '(unknown)'} "
                                   "instead", field="TARS_PEERS")
        if name == self.name:
            raise ValidationFailed(f"node name '{name}' is already taken by the node you are joining; give each "
                                   "host its own TARS_NODE_NAME", field="name")
        try:
            host = HostProfile.from_dict(profile)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValidationFailed(f"cluster.join: 'profile' is not a host profile ({exc})", field="profile") from None
        known = name in self.peers
        peer = self._upsert(name, url, role=role, profile=host, models=models or [], version=version)
        self._alive(peer)
        log.info("peer %s %s from %s", name, "rejoined" if known else "joined", url,
                 extra=fields(peer=name, gpu=host.best_gpu.name if host.best_gpu else "cpu"))
        plan = self._replan()
        await self._apply(plan, plan_id(plan))
        return {"server": self.name, "role": self.role, "url": self.settings.base_url, "version": __version__,
                "plan": plan.to_dict(), "plan_id": self.plan_id,
                "profile": self.node.profile.to_dict() if self.node.profile is not None else None,
                "models": self._local_models(), "peers": self._peer_list(exclude=name)}

    async def handle_heartbeat(self, name: str, url: str = "", models: list[dict[str, Any]] | None = None,
                               plan_id: str = "", sent_at: float = 0.0, gpus: list[dict[str, Any]] | None = None,
                               totals: dict[str, Any] | None = None,
                               ram: dict[str, Any] | None = None) -> dict[str, Any]:
        peer = self.peers.get(name)
        if peer is None or peer.state == "left":
            if self.is_planner or not url:
                return {"known": False, "name": self.name}  # → the sender joins (again)
            peer = self._upsert(name, url)
        self._alive(peer)
        peer.set_models(models or [])
        peer.set_vitals(gpus, totals, ram)
        self._settle(peer)
        out: dict[str, Any] = {"known": True, "name": self.name, "models": self._local_models(),
                               "plan_id": self.plan_id, **self.vitals()}
        if self.is_planner:
            if plan_id != self.plan_id:
                out["plan"] = self.node.plan.to_dict()
            out["peers"] = self._peer_list(exclude=name)
        return out

    async def handle_leave(self, name: str) -> dict[str, Any]:
        peer = self.peers.get(name)
        if peer is None:
            return {"ok": True, "known": False}
        self._set_state(peer, "left", "it said goodbye")
        return {"ok": True, "known": True}

    # ----------------------------------------------------------------- heartbeats
    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time() - self.interval)  # never try to "catch up" a burst
            peers = [p for p in self.peers.values() if p.state != "left"]
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
            self._missed(peer, exc)
            return
        peer.rtt_ms = (time.perf_counter() - t0) * 1000
        self._alive(peer)
        peer.set_vitals(answer.get("gpus"), answer.get("totals"), answer.get("ram"))
        if not answer.get("known", True):
            if peer.name == self.server or peer.url in self.seeds:
                log.warning("%s does not know us (it restarted?): joining again", peer.name,
                            extra=fields(peer=peer.name))
                self._spawn_join(peer.url if peer.url in self.seeds else self.seeds[0] if self.seeds else peer.url)
            return
        peer.set_models(answer.get("models", []))
        self._settle(peer)
        for other in answer.get("peers", []):
            self._learn(other)
        new_plan = answer.get("plan")
        if new_plan is not None and peer.name == self.server and answer.get("plan_id") != self.plan_id:
            log.info("plan changed on %s: applying %s", peer.name, answer.get("plan_id"))
            await self._apply(Plan.from_dict(new_plan), str(answer.get("plan_id")))

    def _alive(self, peer: Peer) -> None:
        peer.missed = 0
        peer.last_seen = time.monotonic()
        if peer.state != "alive":
            self._set_state(peer, "alive", "it answers again" if peer.state in ("dead", "suspect") else "joined")

    def _missed(self, peer: Peer, exc: TarsError) -> None:
        peer.missed += 1
        new = "dead" if peer.missed >= DEAD_AFTER else "suspect"
        if new != peer.state and peer.state != "dead":
            self._set_state(peer, new, f"{peer.missed} missed heartbeat(s): {exc.message}")

    def _set_state(self, peer: Peer, state: str, why: str) -> None:
        old, peer.state = peer.state, state
        if state in ("dead", "left"):
            peer.gone.set()
        else:
            peer.gone.clear()
        level = log.warning if state in ("suspect", "dead") else log.info
        level("peer %s is %s (was %s): %s", peer.name, state, old, why, extra=fields(peer=peer.name))

    # ----------------------------------------------------------------- peers
    def _upsert(self, name: str, url: str, *, role: str = "worker", client: PeerClient | None = None,
                profile: Any = None, models: list[dict[str, Any]] | None = None, version: str = "") -> Peer:
        peer = self.peers.get(name)
        url = url.rstrip("/")
        if peer is None:
            peer = Peer(name, url, client or self._factory(url), role)
            peer.client.name = name
            self.peers[name] = peer
        elif peer.url != url or (client is not None and client is not peer.client):
            old = peer.client
            peer.url, peer.client = url, client or self._factory(url)
            peer.client.name = name
            _background(old.aclose())
        peer.role = role
        if profile is not None:
            peer.profile = profile if isinstance(profile, HostProfile) else HostProfile.from_dict(profile)
        if models is not None:
            peer.set_models(models)
        if version:
            peer.version = version
        return peer

    def _peer_list(self, exclude: str = "") -> list[dict[str, Any]]:
        return [{"name": p.name, "url": p.url, "role": p.role} for p in self.peers.values()
                if p.name != exclude and p.state != "left"]

    def _local_models(self) -> list[dict[str, Any]]:
        return [t.info() for t in self.node.local_targets()]

    # ----------------------------------------------------------------- planning
    def _paths(self, specs: list[ModelSpec]) -> dict[str, Any]:
        """Model files on this host, so the planner reads GGUF metadata when it can."""
        if self.settings.backend_override == "fake":
            return {}
        out = {}
        for spec in specs:
            try:
                path = self.node.store.path_for(spec)
            except TarsError:
                path = None
            if path is not None:
                out[spec.id] = path
        return out

    def _replan(self) -> Plan:
        from . import planner

        hosts: dict[str, HostProfile] = {self.name: self.node.profile}
        for peer in sorted(self.peers.values(), key=lambda p: p.name):
            if peer.state in LIVE and peer.profile is not None:
                hosts[peer.name] = peer.profile
        specs = self.node.model_specs()
        return planner.plan(hosts, specs, reserve_mb=self.settings.vram_reserve_mb, context=self.settings.context,
                            paths=self._paths(specs))

    async def _apply(self, plan: Plan, pid: str) -> None:
        """This host's share via the node; a RemoteTarget for every model on another host.

        Make before break, both ways. A model leaving this host for a peer: the copy here
        becomes the RemoteTarget's handoff stand-in and keeps serving until the peer reports
        the model ready (``_settle``), so its requests never see a "loading" gap. A model
        coming here from a peer that still serves it: the node keeps routing there until
        the copy here has loaded (``Node.apply_plan``); a local stand-in (fallback) that
        already runs it with the same assignment is adopted instead of loaded again."""
        async with self._plan_lock:
            self.plan_id = pid
            for a in plan.for_node(self.name):
                current = self.node.targets.get(a.model)
                if not isinstance(current, RemoteTarget) or current.standin is None:
                    continue
                standin = current.standin
                if isinstance(standin, LocalTarget) and standin.state in ("ready", "loading") and \
                        _same_assignment(standin.assignment, a):
                    current.release_standin()
                    self.node.set_target(standin)
                    _background(current.close())
                    log.info("%s is assigned here: keeping the copy already loaded", a.model,
                             extra=fields(model=a.model))
                else:  # loaded differently than planned: the node loads it as planned
                    current.drop_standin(f"the plan assigns it to {self.name} ({a.device})")
            for a in plan.assignments:
                if a.node == self.name:
                    continue
                peer = self.peers.get(a.node)
                if peer is None:
                    log.warning("plan puts %s on %s, a host this node does not know yet", a.model, a.node)
                    continue
                current = self.node.targets.get(a.model)
                if isinstance(current, RemoteTarget) and current.peer is peer:
                    current.assignment = a.to_dict()
                    continue
                # Only a copy that serves already is kept: one still loading would just compete
                # with the peer's load for the same cores.
                handoff = current if isinstance(current, LocalTarget) and current.state == "ready" else None
                remote = RemoteTarget(a.model, a.kind, peer, failover=self.failover, assignment=a.to_dict(),
                                      max_batch=4 * self.settings.embed_max_batch, handoff=handoff)
                self.node.set_target(remote, close_old=handoff is None)
                if handoff is not None:
                    log.info("%s moves to %s: serving it here until %s reports it ready", a.model, peer.name,
                             peer.name, extra=fields(model=a.model, peer=peer.name))
                if isinstance(current, RemoteTarget):
                    _background(current.close())
            await self.node.apply_plan(plan)
            for model, target in list(self.node.targets.items()):
                if isinstance(target, RemoteTarget) and plan.where(model) is None:
                    self.node.remove_target(model)
                    _background(target.close())
            for peer in self.peers.values():
                self._settle(peer)

    def _settle(self, peer: Peer) -> None:
        """Drop the local stand-ins of models that ``peer`` now reports ready: routing
        switches to it and the copies here unload (once their requests in flight end)."""
        for target in list(self.node.targets.values()):
            if isinstance(target, RemoteTarget) and target.peer is peer and target.standin is not None \
                    and peer.state in LIVE and target.remote_state == "ready":
                target.drop_standin(f"{peer.name} reports it ready")

    # ----------------------------------------------------------------- failover
    async def failover(self, remote: RemoteTarget, cause: PeerUnavailable) -> Target:
        """Serve ``remote.model`` here while its host is down, or raise PeerUnavailable naming it."""
        peer, model = remote.peer, remote.model
        down = f"model '{model}' runs on {peer.name}, which is {peer.state if peer.state != 'alive' else 'unreachable'}"
        if not self.settings.fallback:
            raise PeerUnavailable(f"{down}; fallback is off on {self.name} (TARS_FALLBACK=false)",
                                  peer=peer.name, model=model)
        lock = self._fallback_locks.setdefault(model, asyncio.Lock())
        async with lock:
            standin = remote.standin
            if standin is None or standin.state in ("failed", "unavailable"):
                spec = self.node.catalog.get(model)
                assignment, why = self._fits_here(spec)
                if assignment is None:
                    raise PeerUnavailable(f"{down}, and it cannot run on {self.name}: {why}", peer=peer.name,
                                          model=model)
                log.warning("fallback: loading %s on %s (%s) because %s", model, self.name, assignment.device,
                            cause.message, extra=fields(model=model, peer=peer.name))
                standin = self.node.local_target(spec, assignment)
                standin.start()
                remote.standin = standin
        state = await standin.wait_loaded(timeout=self.settings.request_timeout_s)
        if state != "ready":
            raise ModelFailed(f"{down}; loading it on {self.name} as a fallback failed: "
                              f"{getattr(standin, 'error', None) or state}", model=model, peer=peer.name)
        return standin

    def _fits_here(self, spec: ModelSpec) -> tuple[Assignment | None, str]:
        """Would the planner place ``spec`` on this host beside what it already runs?"""
        from . import planner

        ids = [a.model for a in self.node.plan.for_node(self.name)]
        ids += [t.model for t in self.node.targets.values() if isinstance(t, RemoteTarget) and t.standin is not None]
        ids.append(spec.id)
        specs = [self.node.catalog.get(m) for m in dict.fromkeys(ids)]
        plan = planner.plan({self.name: self.node.profile}, specs, reserve_mb=self.settings.vram_reserve_mb,
                            context=self.settings.context, paths=self._paths(specs))
        found = plan.where(spec.id)
        if found is not None:
            return found, ""
        unplaced = next((u for u in plan.unplaced if u.model == spec.id), None)
        return None, unplaced.reason if unplaced else "the planner found no room"

    # ----------------------------------------------------------------- reporting
    def peers_status(self) -> list[dict[str, Any]]:
        return [p.status() for p in sorted(self.peers.values(), key=lambda p: p.name)]

    def routing(self) -> dict[str, str]:
        """model id → host that computes it (this node's view)."""
        return {m: t.node for m, t in self.node.targets.items()}
