"""``Deployer``: deploy and remove models at runtime, cluster-wide, on any host.

The desired set is replicated (``state.DesiredSet`` over ``cluster_state.py``), so every host
accepts ``deploy``/``remove`` (``POST``/``DELETE /models``, ``tars run``/``tars stop``, and
``models.deploy``/``models.remove`` on ``/rpc``) — also while the planning host is down or
on the other side of a partition. The host that gets the call checks it (the catalog, the
host asked for, and the room: it plans the new desired set over the live hosts itself),
records the change as a stamped entry of the replicated state, and asks the cluster to act
on it (``Cluster.replan``): on the planner that plans and applies at once; elsewhere the
change is pushed to the live peers, the planner plans it and its plan comes back (waited
for a few heartbeats). The host a model is assigned to loads it — pulling it first when it
is not on disk (``deploy/pull.py``) — and every host routes to it. Nothing restarts.

``model`` is a catalog id or a hub reference (``hf.co/ORG/REPO[:QUANT]``): the name is
checked where the call arrives (``modelref.check_name``, no network), and a reference is
resolved there, once (``modelref.resolve_async``: the hub's file list and the GGUF header by
range reads), before the room check; the spec it resolved to is shared through the
replicated state (``Placement.share``: ``spec:<id>``), so the planner and every other host
learn it without the hub. ``chat_template`` names a shipped template the model runs with in
place of its own (kept in the deploy's entry; every plan carries it).

Answers: ``deploy`` → ``{"model", "status": "deploying" | "unchanged" | "retrying",
"placement": [assignment], "reason", "replicas", "node", "planner"}`` (the placement of the
plan in force once the planner has planned it, else this host's own prediction, said in
``"message"``); an id not in the catalog → ``ModelNotFound`` (404, listing the catalog); a
reference the hub does not have → ``RefNotFound`` (404); no host with room → ``NoRoom``
(409) saying what the model needs and what each host has, nothing recorded. ``remove`` →
``{"model", "status": "removing", "models"}``: each host stops routing the model and unloads
it after its requests in flight (``targets/routes.py``).
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
        spec = await resolve_async(model, self.placement.catalog)  # a hub reference: resolved once, here
        model = spec.id
        replicas = 1 if replicas is None else replicas
        hosts = self.cluster.hosts()
        if node is not None and node not in hosts:
            raise ValidationFailed(
                f"node '{node}' is not a live host of this cluster; live hosts: {', '.join(sorted(hosts))}",
                field="node", hosts=sorted(hosts))
        async with self._lock:
            wanted = Deployment(model, replicas, node, chat_template)
            with self.desired.trial(model, wanted):
                plan = self.placement.plan(hosts)  # the room check: nothing is recorded without room
            placed = [a for a in plan.assignments if a.model == model]
            if not placed:
                raise self._no_room(spec, plan, hosts)
            self.placement.share([spec])  # a resolved reference: every host learns its spec
            changed = self.desired.deploy(model, replicas, node, chat_template)
            # deployed so already, but failed here (a pull that failed, say): load it again
            retry = not changed and any(t.model == model and t.state == "failed" for t in self.routes.local())
            if changed:
                log.info("deploying %s (planned on %s): recorded by %s", model, ", ".join(a.node for a in placed),
                         self.name, extra=fields(model=model, node=placed[0].node))
            if changed or retry:
                await self.cluster.replan()
        in_force = [a for a in self.cluster.plan.assignments if a.model == model]
        status = "deploying" if changed else "retrying" if retry else "unchanged"
        shown = in_force or placed
        out = {"model": model, "status": status, "replicas": replicas, "node": node,
               "placement": [a.to_dict() for a in shown], "reason": shown[0].reason, "planner": self.cluster.planner}
        if retry:
            out["message"] = f"'{model}' had failed on {self.name}: loading it again"
        elif not changed:
            out["message"] = f"'{model}' is already deployed with these settings"
        elif not in_force:
            out["message"] = (f"recorded on {self.name}; the planner ({self.cluster.planner or 'none yet'}) has not "
                              "planned it yet: the placement shown is this host's own plan")
        elif len(in_force) < replicas:
            out["message"] = (f"{len(in_force)} of {replicas} replicas placed: the other hosts have no room "
                              "(more are placed when hosts join)")
        return out

    async def remove(self, model: str) -> dict[str, Any]:
        async with self._lock:
            if model not in self.desired:
                raise ModelNotFound(model, self.desired.models())
            self.desired.remove(model)
            log.info("removing %s: recorded by %s", model, self.name, extra=fields(model=model))
            await self.cluster.replan()
        return {"model": model, "status": "removing", "models": self.desired.models(),
                "planner": self.cluster.planner}

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
