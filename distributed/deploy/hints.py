"""What `tars plan` suggests for hosts a plan leaves idle: replicas (issue 12.2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..domain import HostProfile, Plan
from ..settings import Settings


def replica_hints(hosts: dict[str, HostProfile], plan: Plan, specs: dict[str, Any], settings: Settings, *,
                  paths: dict[str, Path] | None = None) -> list[str]:
    """One line per model that could run on the hosts this plan gives nothing to do:
    ``tars run ID --replicas N`` (N = its hosts now + the idle ones it fits on; planned as
    the Deployer plans a replica)."""
    from ..planning import plan_for

    busy = {a.node for a in plan.assignments} | {n for a in plan.assignments for n in a.split_nodes}
    idle = [h for h in hosts if h not in busy]
    if not idle:
        return []
    lines = []
    for kind in ("chat", "embed", "rerank"):
        a = next((a for a in plan.assignments if a.kind == kind and not a.split and a.model in specs), None)
        if a is None:
            continue
        fits = [h for h in idle if plan_for(settings, {h: hosts[h]}, [specs[a.model]], paths=paths)
                .where(a.model) is not None]
        if fits:
            n = 1 + len(fits)
            lines.append(f"{', '.join(fits)} {'has' if len(fits) == 1 else 'have'} nothing to serve: "
                         f"`tars run {a.model} --replicas {n}` runs {a.model} there too (each request goes to "
                         "the least busy copy)")
            break
    return lines
