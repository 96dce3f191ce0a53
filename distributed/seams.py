"""The seams between layers, as Protocols (what each side may call, nothing more).

* ``ServiceNode`` — what the HTTP app (``create_app``), the RPC server (``RpcServer``) and
  rerank use of a node; ``node.Node`` implements it (tests pass stubs).
* ``ClusterView`` — what the RPC server (membership methods) uses of the cluster layer;
  ``cluster.Cluster`` implements it.
* ``ClusterNode`` — what ``Cluster(node, ...)`` and ``failover`` use of the node.
* ``PlanningCluster`` — what the ``Deployer`` (deploy/manager.py) uses of the cluster.
* ``PeerDirectory`` — the peers a node knows by name (``peers.PeerTable``): the split
  engine and service look their worker and engine hosts up in it.

The composition root (``service.build``) builds the pieces and hands each what it needs;
the layers only know these shapes, so ``rpc/`` never imports the cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .domain import (Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, GPUInfo, HostProfile,
                     ModelKind, ModelSpec, Plan, TokenChunk)

if TYPE_CHECKING:  # types only: no import cycle at run time
    from .catalog import Catalog
    from .metrics import Metrics
    from .peers import Peer
    from .settings import Settings
    from .targets import Routes, Target


class ClusterView(Protocol):
    @property
    def role(self) -> str: ...

    async def handle_join(self, name: str, url: str, profile: dict[str, Any], role: str = "worker",
                          version: str = "", llama_cpp: str = "", models: list[dict[str, Any]] | None = None,
                          fingerprint: str = "", gpus: list[dict[str, Any]] | None = None,
                          ctl: dict[str, Any] | None = None) -> dict[str, Any]: ...

    async def handle_heartbeat(self, name: str, url: str = "", models: list[dict[str, Any]] | None = None,
                               plan_id: str = "", sent_at: float = 0.0, gpus: list[dict[str, Any]] | None = None,
                               totals: dict[str, Any] | None = None, ram: dict[str, Any] | None = None,
                               ctl: dict[str, Any] | None = None) -> dict[str, Any]: ...

    async def handle_leave(self, name: str) -> dict[str, Any]: ...


class ServiceNode(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def settings(self) -> "Settings": ...

    @property
    def profile(self) -> HostProfile | None: ...

    @property
    def metrics(self) -> "Metrics": ...

    @property
    def routes(self) -> "Routes": ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def resolve(self, model: str | None, kind: ModelKind, *, here: bool = False) -> "Target": ...

    async def generate(self, req: GenerateRequest, *, here: bool = False) -> Completion: ...

    def stream(self, req: GenerateRequest, *, here: bool = False) -> AsyncIterator[TokenChunk | Completion]: ...

    async def embed(self, req: EmbedRequest, *, here: bool = False) -> Embeddings: ...


class ClusterNode(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def profile(self) -> HostProfile | None: ...

    @property
    def plan(self) -> Plan: ...

    @property
    def catalog(self) -> "Catalog": ...

    @property
    def routes(self) -> "Routes": ...

    async def start(self, load: bool | None = None) -> None: ...

    async def apply_plan(self, plan: Plan) -> None: ...

    def plan_for(self, hosts: dict[str, HostProfile]) -> Plan: ...

    def model_paths(self, specs: list[ModelSpec]) -> dict[str, Path]: ...

    def local_target(self, spec: ModelSpec, a: Assignment) -> "Target": ...

    def local_targets(self) -> list["Target"]: ...

    def live_gpus(self) -> list[GPUInfo]: ...

    def totals(self) -> dict[str, Any]: ...

    def ram(self) -> dict[str, int]: ...


class PlanningCluster(Protocol):
    @property
    def planner(self) -> str | None: ...

    @property
    def plan(self) -> Plan: ...

    def hosts(self) -> dict[str, HostProfile]: ...

    async def replan(self) -> None: ...


class PeerDirectory(Protocol):
    def get(self, name: str) -> "Peer | None": ...
