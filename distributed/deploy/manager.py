"""``Deployer``: deploy and remove models at runtime, cluster-wide.

The planning host (the server; a standalone node plans for itself) owns the desired set
(``state.DesiredSet``, planned by ``placement.Placement``). ``deploy``/``remove`` there
check the request, persist the new set, plan again over the live hosts and apply the plan
(``Cluster.replan``): the host a model is assigned to loads it — pulling it first when it
is not on disk (``deploy/pull.py``) — and every host routes to it; workers receive the new
plan with their next heartbeat. Nothing restarts. A worker asked to deploy forwards the call to the
server (``models.deploy`` / ``models.remove`` over ``/rpc``).

``model`` is a catalog id or a hub reference (``hf.co/ORG/REPO[:QUANT]``): the name is
checked where the call arrives (``modelref.check_name``, no network) and a reference is
resolved once, by the planning host (``modelref.resolve_async``: the hub's file list and the
GGUF header by range reads), before the plan; the plan carries its spec to every host.
``chat_template`` names a shipped template the model runs with in place of its own.

Answers: ``deploy`` → ``{"model", "status": "deploying" | "unchanged", "placement":
[assignment], "reason", "replicas", "node"}``; an id not in the catalog → ``ModelNotFound``
(404, listing the catalog); a reference the hub does not have → ``RefNotFound`` (404); no host with room → ``NoRoom`` (409) saying what the model needs
and what each host has. ``remove`` → ``{"model", "status": "removing"}``: each host stops
routing the model and unloads it after its requests in flight (``targets/routes.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..domain import HostProfile, ModelSpec, Plan
from ..errors import ModelNotFound, NoRoom, ValidationFailed
from ..logs import fields, get_logger
from ..modelref import check_name, resolve_async
from ..seams import PlanningCluster
from ..settings import Settings
from ..targets import Routes
from .placement import Placement
from .state import Deployment

log = get_logger(__name__)


class Deployer:
    """Runtime deploys of one host. ``placement`` holds the desired set and plans it,
    ``routes`` is this host's routing table (a model that failed here is loaded again),
    ``cluster`` plans and applies across the live hosts (or names the host that plans)."""

    def __init__(self, settings: Settings, placement: Placement, routes: Routes, cluster: PlanningCluster) -> None:
        self.settings = settings
        self.name = settings.node_name
        self.placement = placement
        self.desired = placement.desired
        self.routes = routes
        self.cluster = cluster
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ deploy / remove
    async def deploy(self, model: str, replicas: int | None = None, node: str | None = None,
                     chat_template: str | None = None) -> dict[str, Any]:
        check_name(model, self.placement.catalog, chat_template)  # 404 listing the catalog / 400, no network
        client = self.cluster.planner_client()
        if client is not None:
            params = {"model": model, "replicas": replicas, "node": node}
            if chat_template is not None:  # only when set: a planning host of the previous version takes the call
                params["chat_template"] = chat_template
            out: dict[str, Any] = await client.call("models.deploy", params, timeout=self.settings.request_timeout_s)
            return out
        spec = await resolve_async(model, self.placement.catalog)  # a hub reference: resolved once, here
        model = spec.id
        replicas = 1 if replicas is None else replicas
        hosts = self.cluster.hosts()
        if node is not None and node not in hosts:
            raise ValidationFailed(
                f"node '{node}' is not a live host of this cluster; live hosts: {', '.join(sorted(hosts))}",
                field="node", hosts=sorted(hosts))
        async with self._lock:
            before = self.desired.to_dict()
            changed = self.desired.deploy(model, replicas, node, chat_template)
            plan = self.placement.plan(hosts)
            placed = [a for a in plan.assignments if a.model == model]
            if not placed:
                self._restore(before)
                raise self._no_room(spec, plan, hosts)
            # deployed so already, but failed here (a pull that failed, say): load it again
            retry = not changed and any(t.model == model and t.state == "failed" for t in self.routes.local())
            if changed:
                self.desired.save()
                log.info("deploying %s on %s", model, ", ".join(a.node for a in placed),
                         extra=fields(model=model, node=placed[0].node))
            if changed or retry:
                await self.cluster.replan()
        status = "deploying" if changed else "retrying" if retry else "unchanged"
        out = {"model": model, "status": status, "replicas": replicas,
               "node": node, "placement": [a.to_dict() for a in placed], "reason": placed[0].reason}
        if retry:
            out["message"] = f"'{model}' had failed on {self.name}: loading it again"
        elif not changed:
            out["message"] = f"'{model}' is already deployed with these settings"
        elif len(placed) < replicas:
            out["message"] = (f"{len(placed)} of {replicas} replicas placed: the other hosts have no room "
                              "(more are placed when hosts join)")
        return out

    async def remove(self, model: str) -> dict[str, Any]:
        client = self.cluster.planner_client()
        if client is not None:
            out: dict[str, Any] = await client.call("models.remove", {"model": model},
                                                    timeout=self.settings.request_timeout_s)
            return out
        async with self._lock:
            if model not in self.desired:
                raise ModelNotFound(model, self.desired.models())
            self.desired.remove(model)
            self.desired.save()
            log.info("removing %s", model, extra=fields(model=model))
            await self.cluster.replan()
        return {"model": model, "status": "removing", "models": self.desired.models()}

    def _restore(self, before: dict[str, Any]) -> None:
        self.desired.deployed = {m: Deployment(**d) for m, d in before["deployed"].items()}
        self.desired.removed = set(before["removed"])

    def _no_room(self, spec: ModelSpec, plan: Plan, hosts: dict[str, HostProfile]) -> NoRoom:
        from ..vram import estimate

        est = estimate(spec, self.settings.context)
        why = next((u.reason for u in plan.unplaced if u.model == spec.id), "no host has room")
        used: dict[str, int] = {}
        for a in plan.assignments:
            used[a.node] = used.get(a.node, 0) + int(a.vram_mb)
        have = []
        for name, prof in hosts.items():
            gpus = ", ".join(f"{g.name} {g.vram_total_mb} MB" for g in prof.gpus) or "no GPU"
            have.append(f"{name}: {gpus}, {used.get(name, 0)} MB of VRAM planned for other models, "
                        f"{prof.ram_free_mb} MB RAM free")
        return NoRoom(f"no room for '{spec.id}': it needs about {est.total_mb} MB ({why}); "
                      + "; ".join(have), model=spec.id, needs_mb=est.total_mb,
                      hosts={n: {"gpus": [g.to_dict() for g in p.gpus], "ram_free_mb": p.ram_free_mb,
                                 "planned_vram_mb": used.get(n, 0)} for n, p in hosts.items()})
