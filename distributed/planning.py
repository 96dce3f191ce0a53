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
  is llama-server (only it can use RPC workers);
- ``drafts`` (the planner's rule 7): for each spec naming a ``draft``, that draft's spec,
  where TARS_SPECULATIVE is ``auto`` or ``draft`` and that chat engine is llama-server
  (the in-process engine does not speculate). The ids are looked up in ``catalog`` (the
  caller's), else in this host's catalog (built-in + ``TARS_MODELS_DIR/catalog.toml``).

The engine facts are those of the host that plans (the server, or the install running
``tars plan``) and count for every host it plans for. It sits above ``engine/`` and
``split/`` (which know the engine) and below every caller, so the planner itself stays a
pure function of data.

API::

    options(settings) -> PlanOptions(reserve_mb, context, split, slots)
    drafts_for(settings, specs, catalog=None) -> {model id: draft ModelSpec}
    plan_for(settings, hosts, specs, *, paths=None, catalog=None) -> Plan
    recommend_for(settings, hosts, catalog_specs) -> list[ModelSpec]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import planner
from .domain import HostProfile, ModelSpec, Plan
from .engine.choice import engine_slots, uses_server
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


def drafts_for(settings: Settings, specs: list[ModelSpec], catalog: Any = None) -> dict[str, ModelSpec]:
    """model id → its draft's spec, for the specs whose draft this install would run."""
    named = [s for s in specs if s.draft]
    if not named or settings.speculative not in ("auto", "draft") or not uses_server(settings):
        return {}
    if catalog is None:
        from .catalog import load_catalog

        catalog = load_catalog(user_file=settings.models_dir / "catalog.toml")
    return {s.id: catalog.get(s.draft) for s in named if s.draft in catalog}


def plan_for(settings: Settings, hosts: dict[str, HostProfile], specs: list[ModelSpec], *,
             paths: dict[str, Path] | None = None, catalog: Any = None) -> Plan:
    """``planner.plan`` over ``hosts`` for ``specs`` with the options of ``settings``;
    ``paths``: the models' files on disk (their GGUF metadata beats the catalog's hints);
    ``catalog``: where the specs' drafts are looked up (default: this host's catalog)."""
    return planner.plan(hosts, specs, paths=paths, drafts=drafts_for(settings, specs, catalog),
                        **asdict(options(settings)))


def recommend_for(settings: Settings, hosts: dict[str, HostProfile], catalog: list[ModelSpec]) -> list[ModelSpec]:
    """``planner.recommend`` with the reserve and context of ``settings``."""
    return planner.recommend(hosts, catalog, reserve_mb=settings.vram_reserve_mb, context=settings.context)
