"""Membership bookkeeping: the peers a node knows, their liveness, what they report.

``cluster.py`` decides *when* things happen (join, heartbeats, plans, failover);
this module keeps *what is known* about each other host:

* ``Peer``: one host — URL, client, role, profile, version; its liveness state; the
  routing-table entries it reports (its local models: id, state, queue, rates) and its
  live figures (GPUs, totals, RAM). ``RemoteTarget``s hold a reference to their Peer,
  so a peer that rejoins keeps the same object and its targets follow it.
* ``PeerTable``: the peers by name — added or updated from joins and heartbeats,
  learned second-hand from the server's peer list (clusters of 3+ hosts), listed for
  ``/status`` and for other peers. The composition root (``service.build``) makes one per
  node and hands it to the node (``/status``), the cluster and the split service;
  ``client_factory(settings, pins)`` is how it reaches a new peer.

Liveness per peer, from the calls *we* make to it::

    alive --1 missed beat--> suspect --DEAD_AFTER (2) missed in a row--> dead
      ^------------------------- any answered beat -------------------------'

``left`` (it said goodbye) holds until it beats or joins again. ``Peer.gone`` is set
while a peer is dead or has left, so calls in flight to it end at once.
``Peer.reachable`` turns False when a call to it fails on the link — a refused
connection, a connection that did not open in time, data the peer's kernel never
acknowledged (``rpc/client.py``: phase "connect" or "link"), a heartbeat included — and
True when it answers again: until then requests for its models go to their stand-in
(targets/routes.py), and a stand-in is never dropped on the word of a report from
before the failure. ``Peer.steady(settle_s)``: alive and reachable for ``settle_s`` in a
row — only then does the cluster drop its models' stand-ins, so a flapping link keeps
them (one load per outage, not one per flap).

What the control plane heard from it (``cluster.py``): its incarnation (``inc``), the digest
of its copy of the replicated state, the highest term it has seen and the version of the
plan it holds (``held``, ``held_by``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from .compat import StrEnum
from typing import Any

from . import peer_urls
from .domain import GPUInfo, HostProfile
from .errors import ValidationFailed
from .logs import fields, get_logger
from .rpc.client import PeerClient
from .settings import Settings
from .tasks import background
from .tls import Pins

log = get_logger(__name__)

ClientFactory = Callable[[str], PeerClient]


def client_factory(settings: Settings, pins: Pins) -> ClientFactory:
    """How a node reaches a peer: a ``PeerClient`` with the cluster token, its timeouts (a
    connection opens within ``TARS_CONNECT_TIMEOUT_S`` or the peer counts as unreachable), and
    TLS trusting only the pinned fingerprints (``tls.py``) for https:// peers."""
    token = settings.cluster_token.get_secret_value()

    def connect(url: str) -> PeerClient:
        return PeerClient(url, token, timeout=settings.rpc_timeout_s, long_timeout=settings.request_timeout_s,
                          pins=pins, connect_timeout=settings.connect_timeout_s)

    return connect


class PeerState(StrEnum):
    """Liveness of a peer (the strings go on the wire in /status)."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


DEAD_AFTER = 2  # missed heartbeats in a row
LIVE = (PeerState.ALIVE, PeerState.SUSPECT)
DOWN = (PeerState.DEAD, PeerState.LEFT)
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
    """Another host as this node knows it."""

    def __init__(self, name: str, url: str, client: PeerClient, role: str = "worker", *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` (monotonic seconds) is injectable so tests move time instead of sleeping."""
        self.name = name
        self.url = url
        self.client = client
        self.role = role
        self.profile: HostProfile | None = None
        self.version = ""
        self.state = PeerState.ALIVE
        self.reachable = True  # False from a refused call until it answers again
        self._clock = clock
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
        self.up_since = -1e18  # since when it is alive and reachable again after an outage (steady)
        # What the control plane heard from it (cluster.py)
        self.inc = 0
        self.digest = ""
        self.term = 0
        self.held: Any = None  # election.Version of the plan it holds
        self.held_by = ""

    # ------------------------------------------------------------ what it reports
    def report(self, models: Any = None, gpus: Any = None, totals: Any = None, ram: Any = None) -> None:
        """Merge one heartbeat (call or answer): its routing-table entries (``models``, the
        whole list each time) and its live figures (a figure it did not send keeps its
        last value)."""
        if models is not None:
            self.set_models(models)
        gpus, totals, ram = _gpu_dicts(gpus), _numbers(totals), _numbers(ram)
        if gpus is not None:
            self.gpus = gpus
        if totals is not None:
            self.totals = totals
        if ram is not None:
            self.ram = ram

    def set_models(self, models: Any) -> None:
        self._models = {m["id"]: m for m in models or [] if isinstance(m, dict) and "id" in m}

    def model_info(self, model: str) -> dict[str, Any] | None:
        return self._models.get(model)

    @property
    def models(self) -> list[str]:
        return list(self._models)

    # ------------------------------------------------------------ liveness
    def answered(self, rtt_ms: float | None = None) -> None:
        """It answered a call (or called us): alive, missed count reset."""
        self.missed = 0
        self.last_seen = self._clock()
        if not self.reachable or self.state != PeerState.ALIVE:
            self.up_since = self.last_seen
        self.reachable = True
        if rtt_ms is not None:
            self.rtt_ms = rtt_ms
        if self.state != PeerState.ALIVE:
            self.set_state(PeerState.ALIVE, "it answers again" if self.state in (PeerState.DEAD, PeerState.SUSPECT)
                           else "joined")

    def failed(self, why: str) -> None:
        """A call to it failed on the link (refused, not connected in time, never
        acknowledged): unreachable (its models go to their stand-ins) until it answers
        again. Liveness itself still follows the heartbeats."""
        if self.reachable:
            self.reachable = False
            log.warning("peer %s cannot be reached: %s; serving its models elsewhere until it answers", self.name,
                        why, extra=fields(peer=self.name))

    def missed_beat(self, why: str, *, refused: bool = False) -> None:
        """A heartbeat went unanswered (``refused``: it failed on the link, see ``failed``)."""
        self.missed += 1
        if refused:
            self.failed(why)
        new = PeerState.DEAD if self.missed >= DEAD_AFTER else PeerState.SUSPECT
        if new != self.state and self.state != PeerState.DEAD:
            self.set_state(new, f"{self.missed} missed heartbeat(s): {why}")

    def set_state(self, state: str, why: str) -> None:
        old, self.state = self.state, PeerState(state)
        if self.state in DOWN:
            self.gone.set()
        else:
            self.gone.clear()
        level = log.warning if self.state in (PeerState.SUSPECT, PeerState.DEAD) else log.info
        level("peer %s is %s (was %s): %s", self.name, state, old, why, extra=fields(peer=self.name))

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def steady(self, settle_s: float) -> bool:
        """Alive and reachable for ``settle_s`` seconds in a row (its stand-ins may go)."""
        return self.state == PeerState.ALIVE and self.reachable and self._clock() - self.up_since >= settle_s

    def silent_s(self) -> float:
        """Seconds since it last answered (or called us); infinite if it never did."""
        return float("inf") if self.last_seen is None else self._clock() - self.last_seen

    # ------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        gpu = self.profile.best_gpu if self.profile is not None else None
        return {
            "name": self.name, "url": self.url, "role": self.role, "state": self.state,
            "last_heartbeat_s": None if self.last_seen is None else round(self._clock() - self.last_seen, 3),
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "gpu": None if gpu is None else {"name": gpu.name, "vram_total_mb": gpu.vram_total_mb},
            "simulated": bool(self.profile is not None and self.profile.simulated),
            "models": [{"id": m, "state": i.get("state"), "kind": i.get("kind")} for m, i in self._models.items()],
            "missed_heartbeats": self.missed, "version": self.version,
            "gpus": self.gpus, "totals": self.totals, "ram": self.ram,
        }


class PeerTable:
    """The peers of one node, by name. ``factory(url)`` makes a client for a new peer."""

    def __init__(self, me: str, factory: ClientFactory, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.me = me
        self.peers: dict[str, Peer] = {}
        self._factory = factory
        self._clock = clock

    def get(self, name: str) -> Peer | None:
        return self.peers.get(name)

    def client(self, url: str) -> PeerClient:
        """A new client for ``url`` (the cluster's join calls; peers added here get one too)."""
        return self._factory(url)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.peers.values()))

    def upsert(self, name: str, url: str, *, role: str = "worker", client: PeerClient | None = None,
               profile: HostProfile | dict[str, Any] | None = None, models: list[dict[str, Any]] | None = None, version: str = "") -> Peer:
        """Add a peer or update what is known of it. A new URL or client replaces the old
        client (closed in the background); the Peer object itself is kept."""
        peer = self.peers.get(name)
        url = url.rstrip("/")
        if peer is None:
            peer = Peer(name, url, client or self._factory(url), role, clock=self._clock)
            peer.client.name = name
            self.peers[name] = peer
        elif peer.url != url or (client is not None and client is not peer.client):
            old = peer.client
            peer.url, peer.client = url, client or self._factory(url)
            peer.client.name = name
            background(old.aclose())
        peer.role = role
        if profile is not None:
            peer.profile = profile if isinstance(profile, HostProfile) else HostProfile.from_dict(profile)
        if models is not None:
            peer.set_models(models)
        if version:
            peer.version = version
        return peer

    def learn(self, other: Any) -> None:
        """A peer we heard of through the server (clusters of 3+ hosts)."""
        if not isinstance(other, dict) or not other.get("name") or not other.get("url"):
            return
        try:  # a peer list is taken only with valid names and base URLs
            name, url = peer_urls.check_name(other["name"]), peer_urls.check_url(other["url"])
        except ValidationFailed as exc:
            log.warning("ignoring a listed peer: %s", exc.message)
            return
        if name != self.me and name not in self.peers:
            self.upsert(name, url, role=str(other.get("role", "worker")))

    def listing(self, exclude: str = "") -> list[dict[str, Any]]:
        """name, url and role of every peer that has not left (what the server tells others)."""
        return [{"name": p.name, "url": p.url, "role": p.role} for p in self.peers.values()
                if p.name != exclude and p.state != PeerState.LEFT]

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.live]

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in sorted(self.peers.values(), key=lambda p: p.name)]

    async def close(self) -> None:
        await asyncio.gather(*(p.client.aclose() for p in self.peers.values()), return_exceptions=True)
