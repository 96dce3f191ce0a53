"""The one planning entry: a plan from ``Settings`` and this install's chat engine.

``planner.plan`` is pure (hosts, specs and four options); this module is the one place
that reads those options, so every plan — a standalone node's, the cluster's, a runtime
deploy's, a replica's, a failover's fit check, ``tars plan`` and its hints — counts the
same memory:

- ``reserve_mb`` = TARS_VRAM_RESERVE_MB, ``context`` = TARS_CONTEXT (per slot);
- ``slots`` = ``engine.choice.engine_slots(settings)``: TARS_PARALLEL where GGUF chat runs
  in llama-server (a build is found, TARS_CHAT_ENGINE is not ``inprocess``, no backend
  override), else 1 — the in-process engine and the fake backend have one slot;
- ``split`` = ``split.can_split(settings)``: TARS_SPLIT is not ``off`` and that chat engine
  is llama-server (only it can use RPC workers).

The engine facts are those of the host that plans (the server, or the install running
``tars plan``) and count for every host it plans for. It sits above ``engine/`` and
``split/`` (which know the engine) and below every caller, so the planner itself stays a
pure function of data.

API::

    options(settings) -> PlanOptions(reserve_mb, context, split, slots)
    plan_for(settings, hosts, specs, *, paths=None) -> Plan
    recommend_for(settings, hosts, catalog_specs) -> list[ModelSpec]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from . import planner
from .domain import HostProfile, ModelSpec, Plan
from .engine.choice import engine_slots
from .settings import Settings
from .split import can_split


@dataclass(frozen=True)
class PlanOptions:
    """What the planner takes from ``Settings`` and the chat engine (``planner.plan``'s keywords)."""

    reserve_mb: int
    context: int
    split: bool
    slots: int


def options(settings: Settings) -> PlanOptions:
    """The planner's options for ``settings`` on this install (see the module docstring)."""
    return PlanOptions(reserve_mb=settings.vram_reserve_mb, context=settings.context,
                       split=can_split(settings), slots=engine_slots(settings))


def plan_for(settings: Settings, hosts: dict[str, HostProfile], specs: list[ModelSpec], *,
             paths: dict[str, Path] | None = None) -> Plan:
    """``planner.plan`` over ``hosts`` for ``specs`` with the options of ``settings``;
    ``paths``: the models' files on disk (their GGUF metadata beats the catalog's hints)."""
    return planner.plan(hosts, specs, paths=paths, **asdict(options(settings)))


def recommend_for(settings: Settings, hosts: dict[str, HostProfile], catalog: list[ModelSpec]) -> list[ModelSpec]:
    """``planner.recommend`` with the reserve and context of ``settings``."""
    return planner.recommend(hosts, catalog, reserve_mb=settings.vram_reserve_mb, context=settings.context)
