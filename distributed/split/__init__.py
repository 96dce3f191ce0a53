"""Pooled VRAM: one GGUF chat model across several hosts' GPUs (llama.cpp RPC behind the
cluster token). See ``relay.py``, ``worker.py``, ``service.py``, ``engine.py`` and
docs/RPC.md, *Pooled VRAM*."""

from __future__ import annotations

from typing import Any


def can_split(settings: Any) -> bool:
    """May the planner split models for this (engine) host? ``TARS_SPLIT`` is not ``off`` and
    its chat engine is a ``llama-server`` build (the in-process engine cannot use RPC workers:
    a split it cannot run would become a whole model on one GPU that does not hold it)."""
    if getattr(settings, "split", "auto") == "off":
        return False
    from ..engine.choice import decide

    d = decide(settings)
    return d.engine == "server" and d.binary is not None
