"""``Placement``: which models the cluster serves, and the plan that places them.

The one place that turns the desired set (``state.DesiredSet``: ``TARS_MODELS``, else the
catalog's defaults, plus runtime deploys, less removals — a view of the cluster's
replicated state, ``cluster_state.py``) into a plan over some hosts:
the planner, then the models pinned to a host (``deploy --node``), then the extra copies
of a replicated model (``deploy --replicas N``). The node plans for itself with it
(``Node.plan_alone``), the cluster over every live host (``Cluster._replan``), and the
``Deployer`` changes the desired set and asks the cluster to apply a new plan. Every plan
carries what other hosts need to run it as planned here (``modelref.carry``): each deploy's
chat template on its assignments, and the specs of the hub references it places.
"""

from __future__ import annotations

from pathlib import Path

from ..catalog import Catalog
from ..cluster_state import ClusterState
from ..domain import HostProfile, ModelSpec, Plan, Unplaced
from ..errors import ConfigError
from ..logs import fields, get_logger
from ..modelref import carry, plan_specs
from ..settings import Settings
from ..store import ModelStore
from .state import DesiredSet

log = get_logger(__name__)


class Placement:
    """``state``: the node's copy of the cluster's replicated state (``service.build`` shares
    it with the cluster); a bare node opens its own."""

    def __init__(self, settings: Settings, catalog: Catalog, store: ModelStore,
                 state: ClusterState | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self.state = state if state is not None else ClusterState.for_settings(settings)
        base = list(settings.models) or [s.id for s in catalog.defaults()]
        self.desired = DesiredSet(self.state, base, explicit=bool(settings.models), legacy_dir=settings.models_dir)
        self._skipped: set[str] = set()

    # ------------------------------------------------------------------ the desired set
    def specs(self) -> list[ModelSpec]:
        """The desired models as catalog specs (a runtime deploy whose id left the catalog is
        skipped); the hub references another host resolved are learned from the cluster first."""
        self.catalog.learn(self.desired.specs())
        out = []
        for model in self.desired.models():
            if model in self.catalog:
                out.append(self.catalog.get(model))
            elif model in self.settings.models:  # this host's own TARS_MODELS: a typo to fix
                raise ConfigError(f"TARS_MODELS names unknown model '{model}'; known models: "
                                  f"{', '.join(self.catalog.ids())}", variable="TARS_MODELS")
            elif model not in self._skipped:
                self._skipped.add(model)
                log.warning("desired model %s is not in this host's catalog: skipped", model)
        return out

    def share(self, specs: list[ModelSpec]) -> None:
        """Put the hub references resolved here among ``specs`` into the cluster's state
        (``DesiredSet.note_spec``), so the planner and every other host learn them."""
        for model, data in plan_specs(specs).items():
            if self.desired.note_spec(model, data):
                log.info("resolved reference %s shared with the cluster", model, extra=fields(model=model))

    def model_paths(self, specs: list[ModelSpec]) -> dict[str, Path]:
        """Where each model's file is on this host (those on disk), so the planner reads
        GGUF metadata when it can. The one "where is this model's file" helper."""
        if self.settings.backend_override == "fake":
            return {}
        return self.store.paths(specs)

    # ------------------------------------------------------------------ the plan
    def plan(self, hosts: dict[str, HostProfile]) -> Plan:
        """The planner over ``hosts`` for the desired set; a model pinned to a host (deploy
        with ``node``) is placed there beside what the plan already puts on it."""
        specs = self.specs()
        pinned = {m: d.node for m, d in self.desired.deployed.items() if d.node is not None and d.node in hosts}
        free = [s for s in specs if s.id not in pinned]
        plan = self._plan(hosts, free)
        for spec in specs:
            host = pinned.get(spec.id)
            if host is None:
                continue
            beside = [self.catalog.get(a.model) for a in plan.for_node(host)]
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
        return carry(plan, specs, self.desired.chat_templates())  # deploys' templates, resolved references

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
            beside = [self.catalog.get(a.model) for a in plan.for_node(host)]
            a = self._plan({host: hosts[host]}, [*beside, spec]).where(spec.id)
            if a is None:
                continue
            a.reason = f"replica {len(have) + 1} of {wanted}; {a.reason}"
            plan.assignments.append(a)
            have.add(host)

    def _plan(self, hosts: dict[str, HostProfile], specs: list[ModelSpec]) -> Plan:
        from ..planning import plan_for

        return plan_for(self.settings, hosts, specs, paths=self.model_paths(specs))
