"""The planner's rule 7: room for a model's draft (speculative decoding) beside it.

A GGUF chat model whose spec names a ``draft`` (the catalog field, or ``POST /models``'
option) and which the plan put whole on one GPU, or on a CPU, gets its draft placed after
every model has its place — a draft only speeds a model up, so it never takes the VRAM,
a slot or a layer of any model:

- on the model's own GPU when it has the room: the draft's weights, a KV cache of the
  model's context for each of its slots (llama-server gives the draft context as many
  tokens per sequence as the target's) and its compute buffer — no second CUDA runtime,
  it lives in the model's process. Added to the assignment's ``vram_mb``;
- else on another GPU of the same host with the room (``--device-draft``; that GPU pays
  a CUDA runtime too);
- a model on a CPU: its draft in the host's RAM beside it;
- otherwise left out, and the reason says so (a split or partly offloaded model runs
  without its draft: its GPU is full by definition and a draft in RAM is slower than
  the model it would guess for).

``Assignment.draft`` = ``{"model", "device", "vram_mb", "ram_mb"}``; the reason ends
with "plus draft ID, N MB on cuda:0" (or why it was left out).

API::

    place_drafts(assignments, drafts, gpu_free, ram_free, *, context, paths=None) -> None
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from .domain import Assignment, ModelSpec
from .vram import RUNTIME_MB, estimate, has_slots


def place_drafts(assignments: Sequence[Assignment], drafts: Mapping[str, ModelSpec],
                 gpu_free: dict[tuple[str, str], int], ram_free: dict[str, int], *, context: int,
                 paths: Mapping[str, Path] | None = None) -> None:
    """Give each assignment whose model has a draft in ``drafts`` (model id → the draft's
    spec) the room for it, in order; ``gpu_free`` ((node, "cuda:N") → MB) and ``ram_free``
    (node → MB) are what the plan left and are reduced by what the drafts take."""
    paths = paths or {}
    for a in assignments:
        draft = drafts.get(a.model)
        if draft is None or a.kind != "chat":
            continue
        if a.split:
            a.reason += f"; no draft: {draft.id} is not used by a model split across hosts"
            continue
        # the draft's context per slot is the model's: never capped below it by the draft's own
        wide = replace(draft, context=max(draft.context, context)) if has_slots(draft) else draft
        est = estimate(wide, context, paths.get(draft.id), slots=max(1, a.slots or 1))
        here = (a.node, a.device)
        beside = max(0, est.total_mb - RUNTIME_MB)  # the model's process already holds a CUDA runtime
        if a.device.startswith("cuda:") and a.n_gpu_layers < 0 and gpu_free.get(here, 0) >= beside:
            gpu_free[here] -= beside
            a.vram_mb += beside
            a.draft = {"model": draft.id, "device": a.device, "vram_mb": beside, "ram_mb": 0}
            a.reason += f"; plus draft {draft.id}, {beside} MB on {a.device}"
            continue
        other = sorted((g for g in gpu_free if g[0] == a.node and g != here and gpu_free[g] >= est.total_mb),
                       key=lambda g: (-gpu_free[g], g[1]))
        if a.device.startswith("cuda:") and a.n_gpu_layers < 0 and other:
            gpu_free[other[0]] -= est.total_mb
            a.draft = {"model": draft.id, "device": other[0][1], "vram_mb": est.total_mb, "ram_mb": 0}
            a.reason += (f"; plus draft {draft.id}, {est.total_mb} MB on its own GPU {other[0][1]} "
                         f"({a.device} has {gpu_free.get(here, 0)} MB free)")
            continue
        if a.device == "cpu" and ram_free.get(a.node, 0) >= est.ram_mb:
            ram_free[a.node] -= est.ram_mb
            a.ram_mb += est.ram_mb
            a.draft = {"model": draft.id, "device": "cpu", "vram_mb": 0, "ram_mb": est.ram_mb}
            a.reason += f"; plus draft {draft.id}, {est.ram_mb} MB of RAM"
            continue
        a.reason += f"; draft {draft.id} left out: {_why_not(a, est.total_mb, beside, gpu_free, ram_free, est.ram_mb)}"


def _why_not(a: Assignment, total: int, beside: int, gpu_free: dict[tuple[str, str], int],
             ram_free: dict[str, int], ram: int) -> str:
    if a.device == "cpu":
        return f"it needs {ram} MB of RAM, {a.node} has {ram_free.get(a.node, 0)} MB left"
    if a.n_gpu_layers >= 0:
        return f"{a.model} is partly offloaded ({a.n_gpu_layers} layers on {a.device}): no GPU room for a draft"
    return (f"it needs {beside} MB on {a.device} ({gpu_free.get((a.node, a.device), 0)} MB free) or {total} MB "
            f"on another GPU of {a.node}")
