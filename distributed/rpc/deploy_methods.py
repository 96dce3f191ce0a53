"""``models.deploy`` / ``models.remove``: a runtime deploy or removal, recorded in the
replicated desired set by the host that gets it (``deploy/manager.py``; any host takes
it). Registered on the ``RpcServer`` by ``register_deploy``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from .registry import Registry

if TYPE_CHECKING:  # types only: the deployer is handed in by the composition root
    from ..deploy.manager import Deployer


class DeployParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    replicas: int | None = Field(None, ge=1, le=64)
    node: str | None = None
    chat_template: str | None = Field(None, min_length=1, max_length=64)


class RemoveParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)


def register_deploy(server: Registry, deployer: "Deployer | None", node_name: str) -> None:
    """Add ``models.deploy`` / ``models.remove``; without a deployer they say so (ConfigError)."""

    def the_deployer() -> "Deployer":
        if deployer is None:
            raise ConfigError(f"node {node_name} has no deployer")
        return deployer

    async def deploy(params: DeployParams) -> dict[str, Any]:
        return await the_deployer().deploy(params.model, params.replicas, params.node, params.chat_template)

    async def remove(params: RemoveParams) -> dict[str, Any]:
        return await the_deployer().remove(params.model)

    server.register("models.deploy", DeployParams, deploy)
    server.register("models.remove", RemoveParams, remove)
