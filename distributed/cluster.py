"""The cluster layer of one node: membership, heartbeats, failover; the planner role through
``control.py``.

No host coordinates the others: every node holds the replicated state (``cluster_state.py``),
accepts joins and runtime deploys, and the one the rule of ``election.py`` picks plans
(``control.py``); applying a plan is ``plan_apply.py``'s, what is known of each peer
``peers.py``'s.

**Joining.** A node contacts its seeds — ``TARS_PEERS``, then the peers it remembers
(``known_peers.py``), and with ``TARS_DISCOVERY`` on the nodes of its cluster that answer
over mDNS (hints: each still proves the token) — with ``cluster.join``, and any member
answers. Both exchange profiles and their copies of the state; members learned of are
joined in turn, so every node heartbeats every other. A node with seeds (or mDNS) waits
``first_contact_s`` for the cluster before it plans alone. Each token-checked join and
heartbeat is remembered, so a restarted PC1 finds PC2 again without ``TARS_PEERS``.

**Heartbeats** go both ways every ``TARS_HEARTBEAT_S``: the sender's local models (the shared
routing table), its live figures, and its signed control envelope (``ControlPlane.envelope``:
term, state digest, the plan it holds; the state and the plan when the other side lacks
them). A forged, replayed or stale envelope is refused and logged; so is a join from a
second host whose name is alive elsewhere. A missed beat makes a peer suspect (unreachable
too when it failed on the link: its models go to their stand-ins at once), two dead.

**Failover** (``failover.py``): a request for a model whose host is down or unreachable is
served here when ``TARS_FALLBACK`` is on and it fits; otherwise 503 naming the host.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from . import __version__, peer_urls
from .cluster_state import ClusterState
from .control import ControlPlane, plan_id
from .discovery import advertised_addresses, browse
from .domain import HostProfile, Plan
from .engine.binary import llama_cpp_python_version
from .errors import ConfigError, PeerUnavailable, TarsError, Unauthorized, ValidationFailed
from .failover import serve_here
from .known_peers import KnownPeers
from .logs import fields, get_logger
from .peers import VITALS, ClientFactory, Peer, PeerState, PeerTable
from .peers import client_factory as default_clients
from .plan_apply import PlanApplier
from .rpc.client import PeerClient
from .seams import ClusterNode
from .settings import Settings
from .targets import RemoteTarget, Target
from .tasks import TaskSet
from .tls import Pins

log = get_logger(__name__)

__all__ = ["Cluster", "Peer", "plan_id"]
LINK = ("connect", "link")  # PeerUnavailable phases of a call that never reached the peer
DISCOVERY_S = 3.0  # how long the start-up mDNS question listens for answers
SEED_TRIES = 6  # joins to a remembered or learned peer (~13 s of backoff), then it is left to call us


class Cluster:
    """The cluster layer of one node. The composition root (``service.build``) hands it the
    node's ``peers`` table and ``state`` (shared with the node, the placement and the split
    service) and the TLS ``pins``; without them it makes its own (``client_factory(url) ->
    PeerClient``: how it reaches a peer; tests pass one wired to in-process apps)."""

    def __init__(self, node: ClusterNode, settings: Settings, peers: PeerTable | None = None, *,
                 pins: Pins | None = None, client_factory: ClientFactory | None = None,
                 state: ClusterState | None = None, known: KnownPeers | None = None) -> None:
        self.node = node
        self.settings = settings
        self.name: str = node.name
        self.role: str = settings.effective_role
        self.pins = pins or Pins.from_settings(settings)  # TLS fingerprints trusted for https:// peers (tls.py)
        self.table = peers if peers is not None else PeerTable(self.name, client_factory or
                                                               default_clients(settings, self.pins))
        self.state = state if state is not None else ClusterState.for_settings(settings)
        self.known = known if known is not None else KnownPeers.for_settings(settings)
        static = list(settings.peers)
        self.seeds = [] if self.role == "standalone" else list(dict.fromkeys(
            [*static, *self.known.seeds(exclude=set(static))]))
        self.interval = float(settings.heartbeat_s)
        self.discovers = (self.role != "standalone" and settings.discovery == "on"
                          and advertised_addresses(settings) != [])  # mDNS: on, and reachable beyond loopback
        self.first_contact_s = (max(2.0, 2 * self.interval) if self.seeds else 0.5) + \
            (DISCOVERY_S if self.discovers else 0.0)
        self.applier = PlanApplier(node, self.table, settings, self.failover, learn=self._member)
        self._tasks = TaskSet(f"cluster-{self.name}")
        self.control = ControlPlane(node, settings, self.state, self.table, self.applier, hosts=self.hosts,
                                    join=lambda url: self._spawn_join(url, attempts=SEED_TRIES), push=self._push,
                                    spawn=self._tasks.spawn)
        self._joining: set[str] = set()
        self._running = False
        self._vitals: dict[str, Any] = {}
        self._vitals_at = -1e9

    # ----------------------------------------------------------------- views
    @property
    def peers(self) -> dict[str, Peer]:  # name -> Peer (the table's own dict)
        return self.table.peers

    @property
    def planner(self) -> str | None:  # whom the rule picks, in this node's view
        return self.control.election.planner

    @property
    def is_planner(self) -> bool:
        return self.control.election.planning

    @property
    def plan(self) -> Plan:  # the plan in force here
        return self.node.plan

    @property
    def plan_id(self) -> str:
        return self.applier.plan_id

    def summary(self) -> dict[str, Any]:  # /status "cluster": the control plane as this node sees it
        return self.control.summary()

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        await self.node.start(load=not self.waits_for_peers)  # idempotent: the service started it already
        self.control.publish_member()
        for url in self.seeds:  # TARS_PEERS until they answer; a remembered peer for a while (it calls too)
            self._spawn_join(url, attempts=0 if url in self.settings.peers else SEED_TRIES)
        self._tasks.spawn(self._heartbeat_loop(), name=f"heartbeat-{self.name}")
        self._tasks.spawn(self.control.steward(), name=f"planner-{self.name}")
        if self.discovers:
            self._tasks.spawn(self._discover(), name=f"discover-{self.name}")
        self.control.want("this node started")
        if self.waits_for_peers:  # a moment for the cluster before it plans alone
            self._tasks.spawn(self._first_contact(), name=f"contact-{self.name}")
        else:
            self.control.ready = True
            await self.control.reconsider()

    async def _first_contact(self) -> None:
        deadline = time.monotonic() + self.first_contact_s
        while time.monotonic() < deadline and not any(p.last_seen is not None for p in self.table):
            await asyncio.sleep(0.05)
        self.control.ready = True
        self.control.poke()

    def _member(self, name: str) -> Peer | None:
        """A member of the replicated state not met yet: in the table now, joined soon."""
        member = self.state.members().get(name)
        try:
            url = peer_urls.check_url(str((member or {}).get("url", "")))
        except ValidationFailed:
            return None
        self._spawn_join(url, attempts=SEED_TRIES)
        return self.table.upsert(name, url)

    def _spawn_join(self, url: str, *, attempts: int = 0) -> None:
        """``cluster.join`` to ``url`` in the background (``attempts``: at most so many; 0: until it answers)."""
        if url in self._joining or not self._running or url == self.settings.base_url:
            return
        self._joining.add(url)
        task = self._tasks.spawn(self._join_loop(url, attempts=attempts), name=f"join-{url}")
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
        except TarsError as exc:
            log.info("could not tell %s we are leaving: %s", peer.name, exc.message)

    @property
    def waits_for_peers(self) -> bool:
        """Seeds to contact, or mDNS to ask: the node waits ``first_contact_s`` before it plans alone."""
        return bool(self.seeds) or self.discovers

    async def _discover(self) -> None:
        """mDNS answers of this cluster (hints): each node found is joined once, proving the token."""
        try:
            found = await asyncio.to_thread(browse, DISCOVERY_S, self.settings.cluster_name)
        except TarsError as exc:
            log.info("no mDNS discovery: %s", exc.message)
            return
        known = {p.url for p in self.table}
        for f in found:
            if f.node != self.name and f.url not in known:
                log.info("found %s at %s over mDNS: joining it (it must prove the cluster token)", f.node, f.url)
                self._spawn_join(f.url, attempts=1)

    # ----------------------------------------------------------------- joining
    def _join_params(self) -> dict[str, Any]:
        profile = self.node.profile
        return {"name": self.name, "url": self.settings.base_url, "role": self.role, "version": __version__,
                "llama_cpp": llama_cpp_python_version(), "profile": profile.to_dict() if profile is not None else {},
                "models": self._local_models(), "fingerprint": self.pins.own,
                **{k: v for k, v in self.vitals().items() if k == "gpus"}, "ctl": self.control.envelope(None, full=True)}

    async def _join_loop(self, url: str, *, attempts: int = 0) -> None:
        """cluster.join until it answers (or ``attempts`` tries); backoff 0.25 s doubling to 5 s."""
        client = self.table.client(url)
        delay, attempt = 0.25, 0
        while True:
            attempt += 1
            last = attempt == attempts
            then = "; giving up (it joins this node when it is back)" if last else f"; retrying in {delay:.1f} s"
            try:
                answer = await client.call("cluster.join", self._join_params(), retries=0)
                break
            except (Unauthorized, ValidationFailed, ConfigError) as exc:
                log.error("joining %s refused (attempt %d): %s%s", url, attempt, exc.message,
                          then if attempts != 1 else "", extra=fields(peer=url, attempt=attempt))
            except TarsError as exc:
                log.warning("joining %s failed (attempt %d): %s%s", url, attempt, exc.message,
                            then if attempts != 1 else "", extra=fields(peer=url, attempt=attempt))
            if last:
                await client.aclose()
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        try:
            await self._joined(url, client, answer)
        except TarsError as exc:
            log.error("the join answer from %s was unusable: %s", url, exc.message)
            await client.aclose()

    async def _joined(self, url: str, client: PeerClient, answer: dict[str, Any]) -> None:
        try:
            name = peer_urls.check_name(answer["name"], "name")
            profile = HostProfile.from_dict(answer["profile"])
        except (KeyError, TypeError, ValueError):
            raise ValidationFailed(f"peer at {url} sent a join answer without its name and profile") from None
        if name == self.name:
            raise ValidationFailed(f"the node at {url} is also named '{name}': give each host its own "
                                   "TARS_NODE_NAME", field="name")
        ctl = self.control.open(answer.get("ctl"), name)
        client.name = name
        peer = self.table.get(name) or self.table.upsert(name, url, client=client)
        new = peer.profile is None or peer.inc != ctl["inc"]
        peer = self.table.upsert(name, url, role=str(answer.get("role", "worker")), client=client, profile=profile,
                                 models=answer.get("models", []), version=str(answer.get("version", "")))
        peer.answered()
        self.known.remember(name, url)
        log.info("joined %s at %s", name, url, extra=fields(peer=name))
        if new:
            self.control.want(f"joined {name}")
        self.control.take(peer, ctl)
        self.applier.met(peer)
        self.applier.settle(peer)

    # ----------------------------------------------------------------- RPC handlers
    async def handle_join(self, name: str, url: str, profile: dict[str, Any], role: str = "worker",
                          version: str = "", llama_cpp: str = "", models: list[dict[str, Any]] | None = None,
                          fingerprint: str = "", gpus: list[dict[str, Any]] | None = None,
                          ctl: dict[str, Any] | None = None) -> dict[str, Any]:
        """A host joins (or rejoins after a restart): any member answers; the planner plans again at once."""
        if self.role == "standalone":
            raise ConfigError(f"node {self.name} runs standalone (TARS_ROLE=standalone) and accepts no peers")
        name = peer_urls.check_name(name)
        mine = llama_cpp_python_version()  # the llama.cpp this install runs ("" unknown)
        if llama_cpp and mine and llama_cpp != mine and self.settings.split != "off":
            raise ConfigError(f"{name} runs llama.cpp of llama-cpp-python {llama_cpp} and {self.name} runs {mine}: "
                              "a model split across hosts needs one llama.cpp version on both (install the same "
                              "llama-cpp-python and rebuild the engine with scripts/build_engine.sh, or set "
                              "TARS_SPLIT=off on both)", peer=name, peer_version=llama_cpp, version=mine)
        if name == self.name:
            raise ValidationFailed(f"node name '{name}' is already taken by the node you are joining; give each "
                                   "host its own TARS_NODE_NAME", field="name")
        url = peer_urls.check_url(url)
        await peer_urls.check_join_origin(url)  # the URL must point back at the host that sent the join
        opened = self.control.open(ctl, name)
        old = self.table.get(name)
        if old is not None and old.url != url and old.live and old.silent_s() < 2 * self.interval \
                and old.inc != opened["inc"]:
            log.error("refused the join of %s from %s: a node named %s is alive at %s (two hosts share the name; "
                      "give each its own TARS_NODE_NAME)", name, url, name, old.url, extra=fields(peer=name))
            raise ValidationFailed(f"a node named '{name}' is alive at {old.url}; give each host its own "
                                   "TARS_NODE_NAME", field="name")
        if fingerprint and url.startswith("https://"):  # its TLS certificate, told over the token-checked channel
            self.pins.add(fingerprint)
        try:
            host = HostProfile.from_dict(profile)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValidationFailed(f"cluster.join: 'profile' is not a host profile ({exc})", field="profile") from None
        known = old is not None and old.profile is not None and old.inc == opened["inc"] \
            and old.profile.to_dict() == host.to_dict()  # the same run of it, the same hardware
        peer = self.table.upsert(name, url, role=role, profile=host, models=models or [], version=version)
        peer.answered()
        peer.report(gpus=gpus)  # its live GPU figures, sent with the join: checked against the profile now
        peer_urls.recheck_vram(peer, log)  # no models while its live VRAM figures disagree
        self.known.remember(name, url)
        log.info("peer %s %s from %s", name, "rejoined" if old is not None else "joined", url,
                 extra=fields(peer=name, gpu=host.best_gpu.name if host.best_gpu else "cpu"))
        if not known:
            self.control.want(f"{name} joined")
        self.control.take(peer, opened)
        self.applier.met(peer)
        self.applier.settle(peer)
        await self.control.reconsider()  # the planner plans now, so the answer carries the plan
        return {"name": self.name, "role": self.role, "url": self.settings.base_url, "version": __version__,
                "plan_id": self.plan_id, "profile": self.node.profile.to_dict() if self.node.profile else None,
                "models": self._local_models(), "peers": self.table.listing(exclude=name),
                "ctl": self.control.envelope(peer, full=True)}

    async def handle_heartbeat(self, name: str, url: str = "", models: list[dict[str, Any]] | None = None,
                               plan_id: str = "", sent_at: float = 0.0, gpus: list[dict[str, Any]] | None = None,
                               totals: dict[str, Any] | None = None, ram: dict[str, Any] | None = None,
                               ctl: dict[str, Any] | None = None) -> dict[str, Any]:
        peer = self.table.get(peer_urls.check_name(name))
        if peer is None or peer.state == PeerState.LEFT or peer.profile is None:
            if url and url in self._joining:  # this node is joining it right now: the answer tells all
                return {"known": True, "joining": True, "name": self.name}
            return {"known": False, "name": self.name}  # → the sender joins (again)
        opened = self.control.open(ctl, peer.name)
        if opened["inc"] != peer.inc:
            return {"known": False, "name": self.name}  # restarted since it joined: it joins again
        peer.answered()
        peer.report(models or [], gpus, totals, ram)
        if peer_urls.recheck_vram(peer, log):  # its live VRAM now (dis)agrees with its profile
            self.control.want(f"{peer.name}'s VRAM figures changed what may be planned on it")
        self.control.take(peer, opened)
        self.applier.settle(peer)
        self.known.remember(peer.name, peer.url)
        return {"known": True, "name": self.name, "models": self._local_models(), "plan_id": self.plan_id,
                **self.vitals(), "ctl": self.control.envelope(peer)}

    async def handle_leave(self, name: str) -> dict[str, Any]:
        peer = self.table.get(name)
        if peer is None:
            return {"ok": True, "known": False}
        peer.set_state(PeerState.LEFT, "it said goodbye")
        self.control.poke()
        return {"ok": True, "known": True}

    # ----------------------------------------------------------------- heartbeats
    async def _heartbeat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at, loop.time() - self.interval)  # never try to "catch up" a burst
            peers = [p for p in self.table if p.state != PeerState.LEFT and p.profile is not None]
            if peers:
                await asyncio.gather(*(self._beat(p) for p in peers), return_exceptions=True)

    def vitals(self) -> dict[str, Any]:
        """This host's live figures for heartbeats: ``gpus``, ``totals`` and ``ram``, cached half a beat."""
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

    async def _beat(self, peer: Peer, *, push: bool = False) -> None:
        """One heartbeat (``push``: sent at once to spread a change; a failure is not a missed beat)."""
        params = {"name": self.name, "url": self.settings.base_url, "models": self._local_models(),
                  "plan_id": self.plan_id, "sent_at": time.time(), "ctl": self.control.envelope(peer)}
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
                log.info("%s does not take live figures in heartbeats (an older version): sending none",
                         peer.name, extra=fields(peer=peer.name))
                peer.takes_vitals = False
                for key in VITALS:
                    params.pop(key, None)
                params["ctl"] = self.control.envelope(peer)
                t0 = time.perf_counter()
                answer = await peer.client.call("cluster.heartbeat", params, timeout=timeout, retries=0)
        except TarsError as exc:
            if not push:
                peer.missed_beat(exc.message, refused=isinstance(exc, PeerUnavailable) and
                                 exc.details.get("phase") in LINK)
                self.control.poke()
            return
        peer.answered(rtt_ms=(time.perf_counter() - t0) * 1000)
        if answer.get("joining"):
            return
        if not answer.get("known", True):
            log.info("%s does not know this node (it restarted?): joining it again", peer.name,
                     extra=fields(peer=peer.name))
            self._spawn_join(peer.url)
            return
        try:
            opened = self.control.open(answer.get("ctl"), peer.name)
        except TarsError:
            return
        peer.report(answer.get("models", []), answer.get("gpus"), answer.get("totals"), answer.get("ram"))
        self.control.take(peer, opened)
        self.applier.settle(peer)
        self.known.remember(peer.name, peer.url)

    def _push(self) -> None:
        """A heartbeat to every live peer now (a change here spreads at once)."""
        for p in self.table.live():
            if p.profile is not None:
                self._tasks.spawn(self._beat(p, push=True))

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
        """The desired set changed here (a deploy or removal): see ``ControlPlane.replan``."""
        await self.control.replan()

    # ----------------------------------------------------------------- failover
    async def failover(self, remote: RemoteTarget, cause: PeerUnavailable) -> Target:
        """Serve ``remote.model`` here while its host is down, or raise PeerUnavailable naming it
        (``failover.serve_here``: one stand-in per model, loaded once, shared by every request)."""
        return await serve_here(self.node, self.settings, remote, cause)

    def routing(self) -> dict[str, str]:  # model id → host that computes it (this node's view)
        return {m: t.node for m, t in self.node.routes.targets.items()}
