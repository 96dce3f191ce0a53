"""Failover: serve a model here while the peer that runs it is down.

``Cluster.failover`` (which ``RemoteTarget`` calls when its peer fails) delegates here. The
planner decides whether the model fits beside what this host already runs; the node's
``Routes.fallback`` installs the one stand-in per model (loaded once, shared by every
request, kept until the peer is back and has answered). Otherwise, or with
``TARS_FALLBACK=false``, the request fails at once with ``PeerUnavailable`` naming the peer.
"""
from __future__ import annotations

from .domain import Assignment, ModelSpec
from .errors import ModelFailed, PeerUnavailable
from .logs import fields, get_logger
from .modelref import planned_template, with_template
from .peers import PeerState
from .seams import ClusterNode
from .settings import Settings
from .targets import RemoteTarget, Target, TargetState

log = get_logger(__name__)


async def serve_here(node: ClusterNode, settings: Settings, remote: RemoteTarget, cause: PeerUnavailable) -> Target:
    """The stand-in here for ``remote.model`` once loaded, or PeerUnavailable / ModelFailed naming the peer."""
    peer, model = remote.peer, remote.model
    why = peer.state if peer.state != PeerState.ALIVE else "unreachable"
    down = f"model '{model}' runs on {peer.name}, which is {why}"
    if not settings.fallback:
        raise PeerUnavailable(f"{down}; fallback is off on {node.name} (TARS_FALLBACK=false)",
                              peer=peer.name, model=model)

    def load() -> Target:
        spec = with_template(node.catalog.get(model), planned_template(node.plan, model))  # as its peer runs it
        assignment, reason = fits_here(node, settings, spec)
        if assignment is None:
            raise PeerUnavailable(f"{down}, and it cannot run on {node.name}: {reason}", peer=peer.name,
                                  model=model)
        log.warning("fallback: loading %s on %s (%s) because %s", model, node.name, assignment.device,
                    cause.message, extra=fields(model=model, peer=peer.name))
        return node.local_target(spec, assignment)

    standin = await node.routes.fallback(remote, load)
    state = await standin.wait_loaded(timeout=settings.request_timeout_s)
    if state != TargetState.READY:
        raise ModelFailed(f"{down}; loading it on {node.name} as a fallback failed: "
                          f"{standin.error or state}", model=model, peer=peer.name)
    return standin


def fits_here(node: ClusterNode, settings: Settings, spec: ModelSpec) -> tuple[Assignment | None, str]:
    """Would the planner place ``spec`` on this host beside what it already runs? (assignment, why not)"""
    from .planning import plan_for

    if node.profile is None:
        return None, f"{node.name} has not profiled its hardware yet"
    ids = [a.model for a in node.plan.for_node(node.name)]
    ids += [t.model for t in node.routes.standins()]
    ids.append(spec.id)
    specs = [node.catalog.get(m) for m in dict.fromkeys(ids)]
    plan = plan_for(settings, {node.name: node.profile}, specs, paths=node.model_paths(specs))
    found = plan.where(spec.id)
    if found is not None:
        return found, ""
    unplaced = next((u for u in plan.unplaced if u.model == spec.id), None)
    return None, unplaced.reason if unplaced else "the planner found no room"
