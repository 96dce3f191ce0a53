"""``/rpc`` methods of pooled VRAM (docs/RPC.md, *Pooled VRAM*): the engine host asks a
worker host to lend its GPU. Registered on a node's ``RpcServer`` by ``register_split``; the
cluster token is checked by the server before any method runs, as for every method.

| method | params | result |
|---|---|---|
| ``split.worker_start`` | ``model``, ``device?``, ``caller?``, ``version?`` | ``{"node", "model", "target", "relay_port", "version", "worker": {...}}`` once the worker is ready |
| ``split.worker_stop`` | ``model``, ``caller?`` | ``{"node", "model", "stopped": bool}`` |
| ``split.info`` | — | ``{"version", "relay", "workers", "tunnels"}`` |
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..split.service import SplitService
from .registry import Registry

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class WorkerStartParams(_Strict):
    model: str = Field(pattern=_NAME)
    device: str = Field("", max_length=32)  # the plan's device on this host ("cuda:0"); "" = the worker's default
    caller: str = Field("", max_length=64)  # the engine host's node name (logs, /status)
    version: str = Field("", max_length=200)  # the engine host's llama.cpp version; refused when it differs


class WorkerStopParams(_Strict):
    model: str = Field(pattern=_NAME)
    caller: str = Field("", max_length=64)


class InfoParams(_Strict):
    pass


def register_split(server: Registry, svc: SplitService) -> None:
    """Add the ``split.*`` methods of the node's split service ``svc`` to ``server``."""

    async def worker_start(p: WorkerStartParams) -> dict[str, Any]:
        return await svc.worker_start(p.model, p.device, p.caller, p.version)

    async def worker_stop(p: WorkerStopParams) -> dict[str, Any]:
        return await svc.worker_stop(p.model)

    async def info(_: InfoParams) -> dict[str, Any]:
        return svc.info()

    server.register("split.worker_start", WorkerStartParams, worker_start)
    server.register("split.worker_stop", WorkerStopParams, worker_stop)
    server.register("split.info", InfoParams, info)
