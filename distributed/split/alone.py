"""Where a split model goes on its engine host without its worker hosts, and whether the
single-host engine and the split engine fit its GPU at once (``split/engine.py`` asks both;
``engine.choice`` binds them to the node)."""

from __future__ import annotations

from typing import Any

from ..domain import Assignment, ModelSpec
from ..errors import TarsError


def fit_alone(node: Any, spec: ModelSpec, a: Assignment) -> tuple[int | None, str]:
    """Where the model goes on ``node`` without its worker hosts: ``n_gpu_layers`` (-1 all,
    0 CPU) on its planned GPU beside the other models planned there, else None — with why."""
    from ..planner import ram_budget_mb
    from ..vram import estimate, layers_that_fit

    s = node.settings
    try:
        path = node.store.path_for(spec)
    except TarsError:
        path = None
    est = estimate(spec, s.context, path)
    others = [o for o in node.plan.for_node(node.name) if o.model != a.model]
    gpu = next((g for g in (node.profile.gpus if node.profile else []) if f"cuda:{g.index}" == a.device), None)
    ram_free = ram_budget_mb(node.profile) - sum(o.ram_mb for o in others) if node.profile else 0
    if gpu is not None:
        free = gpu.vram_total_mb - s.vram_reserve_mb - sum(o.vram_mb for o in others if o.device == a.device)
        n = layers_that_fit(est, free)
        if n == -1:
            return -1, f"all {est.n_layers} layers fit its GPU"
        if n > 0 and est.ram_for_layers(n) <= ram_free:
            return n, f"{n} of {est.n_layers} layers on its GPU, the rest in RAM"
    if est.ram_mb <= ram_free:
        return 0, f"on its CPU ({est.ram_mb} MB of RAM)"
    return None, f"needs {est.total_mb} MB of VRAM or {est.ram_mb} MB of RAM; {max(0, ram_free)} MB of RAM free"


def overlap_fits(node: Any, spec: ModelSpec, a: Assignment, n_alone: int) -> bool:
    """Do the single-host engine (``n_alone`` GPU layers) and this host's split share fit
    its GPU at once (what a make-before-break restore needs)?"""
    from ..vram import estimate

    s = node.settings
    gpu = next((g for g in (node.profile.gpus if node.profile else []) if f"cuda:{g.index}" == a.device), None)
    if gpu is None:
        return True
    try:
        path = node.store.path_for(spec)
    except TarsError:
        path = None
    others = sum(o.vram_mb for o in node.plan.for_node(node.name) if o.model != a.model and o.device == a.device)
    alone_mb = estimate(spec, s.context, path).vram_for_layers(n_alone)
    return alone_mb + a.vram_mb <= gpu.vram_total_mb - s.vram_reserve_mb - others
