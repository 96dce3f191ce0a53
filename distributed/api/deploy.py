"""Runtime deploys: ``POST /models`` and ``DELETE /models/{id}`` (``GET /models`` is native.py's).

``POST /models`` ``{"model": ID, "replicas"?: N, "node"?: NAME, "chat_template"?: SHIPPED}`` on any
host (ID: a catalog id or a hub reference ``hf.co/ORG/REPO[:QUANT]``, resolved once) → 202 with the
placement and its reason (200 with ``"status": "unchanged"`` when it is deployed so already);
``DELETE /models/{id}`` → 202. The work is ``deploy/manager.py``'s; a worker forwards it to
the planning host. Progress (``pulling`` with percent, ``loading``, ``ready``, ``failed``)
shows in ``GET /models``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ..errors import ConfigError
from . import schemas as s
from .native import JSON, label

if TYPE_CHECKING:  # types only: built by the composition root (service.build)
    from ..deploy.manager import Deployer

router = APIRouter()


class DeployRequest(BaseModel):
    """POST /models."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    replicas: int | None = Field(None, ge=1, le=64)
    node: str | None = Field(None, min_length=1)
    chat_template: str | None = Field(None, min_length=1, max_length=64)  # a shipped template's name


def deployer_of(request: Request) -> "Deployer":
    """The node's deployer (``app.state.deployer``), or a ConfigError when runtime deploys are off."""
    deployer: Deployer | None = getattr(request.app.state, "deployer", None)  # create_app sets it
    if deployer is None:
        raise ConfigError("this node has no deployer (runtime deploys are off)")
    return deployer


@router.post("/models", summary="Deploy a catalog model at runtime (pulls it on the host that serves it)",
             openapi_extra={"requestBody": {"content": {"application/json": {
                 "schema": DeployRequest.model_json_schema()}}}})
async def deploy(request: Request) -> Response:
    r = s.parse(DeployRequest, await request.body())
    label(request, r.model)
    out = await deployer_of(request).deploy(r.model, r.replicas, r.node, r.chat_template)
    out["via"] = request.app.state.node.name
    return JSON(out, status_code=200 if out.get("status") == "unchanged" else 202)


@router.delete("/models/{model_id:path}", summary="Remove a model everywhere (after its requests in flight)")
async def remove(request: Request, model_id: str) -> Response:
    label(request, model_id)
    out = await deployer_of(request).remove(model_id)
    out["via"] = request.app.state.node.name
    return JSON(out, status_code=202)
