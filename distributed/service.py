"""The composition root: ``build(settings, ...) -> Service``, one node's parts, each handed
what it needs when it is made — nothing is attached to another object afterwards.

::

    ClusterState                          this node's copy of the replicated state (file, clock)
    catalog, store, state ──► Placement   the desired set and the plan that places it
    Pins ──► PeerTable                    the peers this node knows, how to reach them
    SplitService(settings, peers)         pooled VRAM: RPC workers, relay, tunnels
    Node(settings, ..., placement, peers, split)
    Cluster(node, settings, peers, pins, state)  joins, heartbeats, the planner role, failover
    Deployer(settings, placement, node.routes, cluster)

``Service.start()`` starts the node (profile; a node without seeds loads its own plan at
once), then the cluster (joins, heartbeats, planning); ``Service.stop()`` says goodbye to the peers, stops the split
workers and tunnels, then unloads the models. ``api.app.create_app(service)`` serves it;
``cli/serve.py`` and the tests build it here (two nodes live in one process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .catalog import Catalog
from .cluster import Cluster
from .cluster_state import ClusterState
from .deploy.manager import Deployer
from .deploy.placement import Placement
from .discovery import Advertiser
from .domain import HostProfile
from .logs import get_logger
from .metrics import Metrics
from .node import Node, user_catalog
from .peers import ClientFactory, PeerTable, client_factory
from .sdnotify import Lifecycle
from .settings import Settings
from .split.service import SplitService
from .store import ModelStore
from .tls import Pins

log = get_logger(__name__)


@dataclass
class Service:
    """One node's service: what ``create_app`` serves and the RPC methods call."""

    settings: Settings
    node: Node
    cluster: Cluster
    deployer: Deployer
    split: SplitService
    notify: Lifecycle  # systemd: STATUS while loading, WATCHDOG from the loop, READY at /health 200
    lan: Advertiser  # mDNS _tars._tcp while it runs (TARS_DISCOVERY)

    async def start(self) -> None:
        await self.notify.start()
        await self.node.start(load=not self.cluster.waits_for_peers)  # else the cluster's plan comes first
        self.notify.started(planned=lambda: self.node.planned)
        log.info("node %s started (role %s)", self.node.name, self.node.role)
        await self.cluster.start()
        if self.settings.discovery == "on":
            await self.lan.start()

    async def stop(self) -> None:
        try:
            await self.notify.stop()  # STOPPING=1 first: systemd stops watching while the node winds down
            await self.lan.close()
            await self.cluster.stop()  # cluster.leave to the peers first
            await self.split.close()  # its RPC workers, relay and tunnels
        finally:
            await self.node.stop()


def build(settings: Settings, *, profile: HostProfile | None = None, catalog: Catalog | None = None,
          store: ModelStore | None = None, metrics: Metrics | None = None,
          backend_extra: dict[str, Any] | None = None, clients: ClientFactory | None = None) -> Service:
    """The parts of one node. ``profile`` None: detected at start; ``catalog`` None: the
    host's (built-in + ``TARS_MODELS_DIR/catalog.toml``); ``clients(url) -> PeerClient``: how
    it reaches a peer (default: the cluster token and the pinned TLS fingerprints; tests wire
    in-process apps); ``backend_extra``: merged into every backend's options (the fake's knobs)."""
    catalog = catalog if catalog is not None else user_catalog(settings)
    store = store if store is not None else ModelStore(settings.models_dir, catalog)
    state = ClusterState.for_settings(settings)
    placement = Placement(settings, catalog, store, state)
    pins = Pins.from_settings(settings)
    peers = PeerTable(settings.node_name, clients or client_factory(settings, pins))
    split = SplitService(settings, peers)
    node = Node(settings, profile, catalog, store, metrics, backend_extra=backend_extra, placement=placement,
                peers=peers, split=split)
    cluster = Cluster(node, settings, peers, pins=pins, state=state)
    deployer = Deployer(settings, placement, node.routes, cluster)
    return Service(settings, node, cluster, deployer, split, Lifecycle.from_environ(node, settings),
                   Advertiser(settings, cluster))
