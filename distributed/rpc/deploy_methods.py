"""``models.deploy`` / ``models.remove``: a worker forwards a runtime deploy to the planning
host (``deploy/manager.py``). Registered on the ``RpcServer`` with one line."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError


class DeployParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)
    replicas: int | None = Field(None, ge=1, le=64)
    node: str | None = None
    chat_template: str | None = Field(None, min_length=1, max_length=64)


class RemoveParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1)


def register_deploy(server: Any) -> None:
    node = server.node

    def deployer() -> Any:
        d = getattr(node, "deployer", None)
        if d is None:
            raise ConfigError(f"node {node.name} has no deployer attached")
        return d

    async def deploy(params: DeployParams) -> dict[str, Any]:
        return await deployer().deploy(params.model, params.replicas, params.node, params.chat_template)

    async def remove(params: RemoveParams) -> dict[str, Any]:
        return await deployer().remove(params.model)

    if hasattr(server, "register"):
        server.register("models.deploy", DeployParams, deploy)
        server.register("models.remove", RemoveParams, remove)
