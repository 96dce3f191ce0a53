"""``Deployer``: deploy and remove models at runtime, cluster-wide.

The planning host (the server; a standalone node plans for itself) owns the desired set
(``state.DesiredSet``). ``deploy``/``remove`` there check the request, persist the new
set, plan again over the live hosts and apply the plan (``Cluster.replan``): the host a
model is assigned to loads it — pulling it first when it is not on disk
(``deploy/pull.py``) — and every host routes to it; workers receive the new plan with
their next heartbeat. Nothing restarts. A worker asked to deploy forwards the call to the
server (``models.deploy`` / ``models.remove`` over ``/rpc``).

Answers: ``deploy`` → ``{"model", "status": "deploying" | "unchanged", "placement":
[assignment], "reason", "replicas", "node"}``; an id not in the catalog → ``ModelNotFound``
(404, listing the catalog); no host with room → ``NoRoom`` (409) saying what the model needs
and what each host has. ``remove`` → ``{"model", "status": "removing"}``: each host stops
routing the model and unloads it after its requests in flight (``targets/routes.py``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..domain import HostProfile, ModelSpec, Plan, Unplaced
from ..errors import ConfigError, ModelNotFound, NoRoom, ValidationFailed
from ..logs import fields, get_logger
from ..modelref import check_template, is_ref, plan_specs, resolve_async
from .replicas import FORWARDED, Replicas
from .state import DesiredSet

log = get_logger(__name__)


class Deployer:
    def __init__(self, node: Any, settings: Any) -> None:
        self.node = node
        self.settings = settings
        base = list(settings.models) or [s.id for s in node.catalog.defaults()]
        self.desired = DesiredSet(settings.models_dir, base)
        self._lock = asyncio.Lock()
        self.replicas = Replicas(node)
        node.deployer = self

    # ------------------------------------------------------------------ the desired set
    def specs(self) -> list[ModelSpec]:
        """The desired models as catalog specs (a runtime deploy whose id left the catalog is skipped)."""
        out = []
        for model in self.desired.models():
            if model in self.node.catalog:
                out.append(self.node.catalog.get(model))
            elif model in self.desired.base and self.settings.models:
                raise ConfigError(f"TARS_MODELS names unknown model '{model}'; known models: "
                                  f"{', '.join(self.node.catalog.ids())}", variable="TARS_MODELS")
            else:
                log.warning("deployed model %s is no longer in the catalog: skipped", model)
        return out

    def plan(self, hosts: dict[str, HostProfile]) -> Plan:
        """The planner over ``hosts`` for the desired set; a model pinned to a host (deploy
        with ``node``) is placed there beside what the plan already puts on it."""
        specs = self.specs()
        pinned = {m: d.node for m, d in self.desired.deployed.items() if d.node in hosts}
        free = [s for s in specs if s.id not in pinned]
        plan = self._plan(hosts, free)
        for spec in specs:
            host = pinned.get(spec.id)
            if host is None:
                continue
            beside = [self.node.catalog.get(a.model) for a in plan.for_node(host)]
            alone = self._plan({host: hosts[host]}, [*beside, spec])
            a = alone.where(spec.id)
            if a is not None:
                a.reason = f"deployed to {host} as asked; {a.reason}"
                plan.assignments.append(a)
            else:
                why = next((u.reason for u in alone.unplaced if u.model == spec.id), "no room")
                plan.unplaced.append(Unplaced(spec.id, f"asked for on {host}: {why}"))
        for spec in specs:
            wanted = self.desired.get(spec.id).replicas
            if wanted > 1:
                self._add_replicas(plan, hosts, spec, wanted)
        order = {s.id: i for i, s in enumerate(specs)}
        plan.assignments.sort(key=lambda a: order.get(a.model, len(order)))
        for a in plan.assignments:  # a deploy's own chat template travels with its placement
            a.chat_template = self.desired.get(a.model).chat_template
        plan.specs = plan_specs(specs)  # hub references: every host loads the files resolved here
        return plan

    def _add_replicas(self, plan: Plan, hosts: dict[str, HostProfile], spec: ModelSpec, wanted: int) -> None:
        """More copies of ``spec``, each on another host that has room beside its share of the
        plan (hosts with the least planned for them first)."""
        have = {a.node for a in plan.assignments if a.model == spec.id}
        if not have:
            return
        load = {h: sum(a.vram_mb for a in plan.for_node(h)) for h in hosts}
        for host in sorted((h for h in hosts if h not in have), key=lambda h: (load[h], h)):
            if len(have) >= wanted:
                break
            beside = [self.node.catalog.get(a.model) for a in plan.for_node(host)]
            a = self._plan({host: hosts[host]}, [*beside, spec]).where(spec.id)
            if a is None:
                continue
            a.reason = f"replica {len(have) + 1} of {wanted}; {a.reason}"
            plan.assignments.append(a)
            have.add(host)

    def _plan(self, hosts: dict[str, HostProfile], specs: list[ModelSpec]) -> Plan:
        from ..planning import plan_for

        return plan_for(self.settings, hosts, specs, paths=self.node.model_paths(specs))

    def _hosts(self) -> dict[str, HostProfile]:
        cluster = self.node.cluster
        if cluster is not None and hasattr(cluster, "hosts"):
            return cluster.hosts()
        return {self.node.name: self.node.profile}

    # ------------------------------------------------------------------ who decides
    def _server_client(self) -> Any:
        """The planning host's PeerClient, or None when this host plans."""
        cluster = self.node.cluster
        if cluster is None or getattr(cluster, "is_planner", True):
            return None
        peer = cluster.peers.get(cluster.server) if cluster.server else None
        if peer is None:
            raise ConfigError(f"{self.node.name} is a worker that has not joined its server yet; retry shortly")
        return peer.client

    async def _apply(self) -> None:
        cluster = self.node.cluster
        if cluster is not None and hasattr(cluster, "replan"):
            await cluster.replan()
        else:
            await self.node.apply_plan(self.plan(self._hosts()))

    # ------------------------------------------------------------------ deploy / remove
    async def deploy(self, model: str, replicas: int | None = None, node: str | None = None,
                     chat_template: str | None = None) -> dict[str, Any]:
        if chat_template is not None:
            check_template(chat_template)
        if not is_ref(model):
            self.node.catalog.get(model)  # ModelNotFound (404) lists the catalog
        client = self._server_client()
        if client is not None:
            params = {"model": model, "replicas": replicas, "node": node}
            if chat_template is not None:
                params["chat_template"] = chat_template
            return await client.call("models.deploy", params, timeout=self.settings.request_timeout_s)
        spec = await resolve_async(model, self.node.catalog)  # hf.co/ORG/REPO:QUANT: resolved once, here
        model = spec.id
        replicas = 1 if replicas is None else replicas
        hosts = self._hosts()
        if node is not None and node not in hosts:
            raise ValidationFailed(
                f"node '{node}' is not a live host of this cluster; live hosts: {', '.join(sorted(hosts))}",
                field="node", hosts=sorted(hosts))
        async with self._lock:
            before = self.desired.to_dict()
            changed = self.desired.deploy(model, replicas, node, chat_template)
            plan = self.plan(hosts)
            placed = [a for a in plan.assignments if a.model == model]
            if not placed:
                self._restore(before)
                raise self._no_room(spec, plan, hosts)
            # deployed so already, but failed here (a pull that failed, say): load it again
            retry = not changed and any(t.model == model and t.state == "failed" for t in self.node.routes.local())
            if changed:
                self.desired.save()
                log.info("deploying %s on %s", model, ", ".join(a.node for a in placed),
                         extra=fields(model=model, node=placed[0].node))
            if changed or retry:
                await self._apply()
        status = "deploying" if changed else "retrying" if retry else "unchanged"
        out = {"model": model, "status": status, "replicas": replicas,
               "node": node, "placement": [a.to_dict() for a in placed], "reason": placed[0].reason}
        if retry:
            out["message"] = f"'{model}' had failed on {self.node.name}: loading it again"
        elif not changed:
            out["message"] = f"'{model}' is already deployed with these settings"
        elif len(placed) < replicas:
            out["message"] = (f"{len(placed)} of {replicas} replicas placed: the other hosts have no room "
                              "(more are placed when hosts join)")
        return out

    async def remove(self, model: str) -> dict[str, Any]:
        client = self._server_client()
        if client is not None:
            return await client.call("models.remove", {"model": model}, timeout=self.settings.request_timeout_s)
        async with self._lock:
            if model not in self.desired:
                raise ModelNotFound(model, self.desired.models())
            self.desired.remove(model)
            self.desired.save()
            log.info("removing %s", model, extra=fields(model=model))
            await self._apply()
        return {"model": model, "status": "removing", "models": self.desired.models()}

    def _restore(self, before: dict[str, Any]) -> None:
        from .state import Deployment

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

    # ------------------------------------------------------------------ replicas (node hooks)
    def route(self, model: str, target: Any) -> Any:
        return self.replicas.route(model, target)

    @staticmethod
    def mark_forwarded() -> None:
        """The current request came from a peer: compute it here (see replicas.py)."""
        FORWARDED.set(True)

    def applied(self, plan: Plan) -> None:
        self.replicas.applied(plan.assignments)

    def annotate(self, infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """GET /models rows: a replicated model's row lists its replicas."""
        for row in infos:
            rs = self.replicas.sets.get(row.get("id", ""))
            if rs is not None:
                extra = rs.info()
                row["replicas"] = extra["replicas"]
                row["retried"] = extra["retried"]
        return infos

    async def close(self) -> None:
        await self.replicas.close()

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        return {"node": self.node.name, "desired": self.desired.to_dict(), "models": self.node.models()}
