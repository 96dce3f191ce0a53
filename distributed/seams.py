"""The seams between layers, as Protocols (what each side may call, nothing more).

* ``ClusterView`` — what the node (``/status``) and the RPC server (membership
  methods) use of the cluster layer; ``cluster.Cluster`` implements it.
* ``ServiceNode`` — what the HTTP app (``create_app``) and the RPC server
  (``RpcServer``) use of a node; ``node.Node`` implements it (tests pass stubs).
* ``ClusterNode`` — what ``Cluster(node, ...)`` uses of its node.

The composition root (``api.app.create_app`` / ``cli.serve``) builds the pieces and wires
them together; the layers only know these shapes, so ``rpc/`` never imports the cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from .domain import (Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, GPUInfo, HostProfile,
                     ModelKind, ModelSpec, Plan, TokenChunk)

if TYPE_CHECKING:  # types only: no import cycle at run time
    from .metrics import Metrics
    from .targets import Routes, Target


class ClusterView(Protocol):
    role: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def peers_status(self) -> list[dict[str, Any]]: ...

    async def handle_join(self, name: str, url: str, profile: dict[str, Any], role: str = "worker",
                          version: str = "", models: list[dict[str, Any]] | None = None) -> dict[str, Any]: ...

    async def handle_heartbeat(self, name: str, url: str = "", models: list[dict[str, Any]] | None = None,
                               plan_id: str = "", sent_at: float = 0.0, gpus: list[dict[str, Any]] | None = None,
                               totals: dict[str, Any] | None = None,
                               ram: dict[str, Any] | None = None) -> dict[str, Any]: ...

    async def handle_leave(self, name: str) -> dict[str, Any]: ...


class ServiceNode(Protocol):
    name: str
    role: str
    profile: HostProfile | None
    cluster: ClusterView | None
    metrics: "Metrics"

    async def start(self, load: bool | None = None) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...

    def models(self) -> list[dict[str, Any]]: ...

    def resolve(self, model: str | None, kind: ModelKind) -> "Target": ...

    def resolve_here(self, model: str | None, kind: ModelKind) -> "Target": ...

    async def generate(self, req: GenerateRequest) -> Completion: ...

    def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]: ...

    async def embed(self, req: EmbedRequest) -> Embeddings: ...


class ClusterNode(Protocol):
    name: str
    profile: HostProfile | None
    plan: Plan
    catalog: Any
    routes: "Routes"

    async def start(self, load: bool | None = None) -> None: ...

    async def apply_plan(self, plan: Plan) -> None: ...

    def model_specs(self) -> list[ModelSpec]: ...

    def model_paths(self, specs: list[ModelSpec]) -> dict[str, Any]: ...

    def local_target(self, spec: ModelSpec, a: Assignment) -> "Target": ...

    def local_targets(self) -> list["Target"]: ...

    def live_gpus(self) -> list[GPUInfo]: ...

    def totals(self) -> dict[str, Any]: ...

    def ram(self) -> dict[str, int]: ...
