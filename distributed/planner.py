"""The planner: which host serves which model, on which device, and why.

``plan()`` is a pure, deterministic function of host profiles, model specs and the options
below (plus the GGUF files it may read for their metadata). Production code never calls it
with options of its own: ``planning.plan_for(settings, hosts, specs, paths=...)`` is the one
entry that reads them from ``Settings`` and this install's chat engine (reserve, context,
split, slots); tests call ``plan()`` directly. Rules, in the order they are applied:

1. The biggest chat model (4-bit GGUF preferred) goes to the host whose GPU has the most
   usable VRAM (total minus the reserve). If it does not fit fully, as many layers as fit
   are offloaded there (``n_gpu_layers``) and the rest runs on that host's CPU.
2. Embedding models and 8-bit small models go to *another* host when there is one, so the
   chat host keeps its VRAM for chat (a GPU shared by chat and embeddings is where other
   tools evict one for the other). The chat host takes them only when no other host can.
3. Further chat models take whatever GPU has room (chat host first), then a split, then
   a partial offload, then a CPU.
3a. Split (pooled VRAM, ``split=True``, TARS_SPLIT=auto): a GGUF chat model that fits no
   single GPU but fits the GPUs of several hosts together is split by layers across them
   (llama.cpp RPC) — preferred over a partial offload into RAM. The fewest hosts that hold
   it, most free VRAM first; layers in proportion to each GPU's room after its own runtime
   and compute buffer; the engine (and the layers that are not repeating blocks) on the
   host with the most free VRAM.
4. CPU when no GPU has room, checked against the host's RAM; a model that fits nowhere is
   reported unplaced with the reason.
5. No GPU is ever over-committed: per GPU, the sum of ``vram_mb`` stays <= total - reserve.
6. Slots (``slots`` > 1: a GGUF chat model on llama-server holds one KV cache of
   ``context`` tokens per slot, TARS_PARALLEL): every step of rules 1 and 3 is tried with
   all the slots first, then one fewer, down to 1, before the next step is tried. So the
   order is: whole on one GPU with all slots > whole on one GPU with fewer slots (>= 1) >
   split across hosts (all slots, then fewer) > partial offload into RAM (all, then fewer)
   > CPU (all, then fewer) > unplaced. A model whole on one GPU generates faster with one
   slot than split over the network or with layers in RAM with four; a slot it lacks only
   makes requests queue (the engine's SlotQueue). Among the other chat models, every one
   that fits whole with all its slots is placed before any is given fewer. The slots
   counted are ``Assignment.slots`` (the engine starts with that many, ``-np``), and a
   lowered count is said in the reason ("2 of 4 slots: the KV cache of 4 × 4096 tokens
   (2.0 GB) does not fit"). Embeddings, rerankers and 8-bit models have no slots
   (``Assignment.slots`` None); with ``slots=1`` (the in-process engine) a GGUF chat model
   has 1.
7. Drafts (speculative decoding, ``drafts`` = model id → its draft's spec): after every
   model is placed, a model whole on one GPU gets its draft on that GPU, else on another
   GPU of its host (``--device-draft``), a model on a CPU gets it in RAM — each only where
   the room is left ("plus draft ID, N MB on cuda:0" in the reason); a draft never takes
   the room of a model, a slot or a layer (``drafts.py``).

Every assignment carries a one-line reason a person can check against ``tars profile``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import Assignment, HostProfile, ModelSpec, Plan, Unplaced
from .drafts import place_drafts
from .vram import VramEstimate, estimate, has_slots, layers_that_fit, with_slots

FOUR_BIT = ("q4_k_m", "q4_0", "q4_k_s", "int4", "nf4")


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"


def ram_budget_mb(profile: HostProfile) -> int:
    """RAM a host can give to models: total minus max(1 GB, 1/8) for the OS and the node."""
    return max(0, profile.ram_total_mb - max(1024, profile.ram_total_mb // 8))


@dataclass
class _Gpu:
    node: str
    index: int
    name: str
    capacity: int  # total - reserve
    used: int = 0

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"


@dataclass
class _Host:
    name: str
    profile: HostProfile
    gpus: list[_Gpu]
    ram_free: int
    order: int = 0  # rank: 0 = most usable VRAM

    @property
    def best_capacity(self) -> int:
        return max((g.capacity for g in self.gpus), default=0)


@dataclass
class _State:
    hosts: list[_Host]  # in rank order
    reserve_mb: int
    split: bool = True  # TARS_SPLIT: may a model be split across hosts
    slots: int = 1  # engine slots a GGUF chat model asks for (TARS_PARALLEL with llama-server)
    placed: dict[str, Assignment] = field(default_factory=dict)
    unplaced: dict[str, Unplaced] = field(default_factory=dict)

    def gpus(self, hosts: list[_Host]) -> list[_Gpu]:
        """GPUs of ``hosts``, host rank first, then most free VRAM, then index."""
        return [g for h in hosts for g in sorted(h.gpus, key=lambda g: (-g.free, g.index))]


def _is_four_bit(spec: ModelSpec) -> bool:
    return spec.quant.lower() in FOUR_BIT


def _rank_key(spec: ModelSpec, est: VramEstimate) -> tuple:
    """Bigger first; deterministic tie-break by id."""
    return (-spec.params_b, -est.total_mb, spec.id)


def _at(est: VramEstimate) -> str:
    """The context an estimate counts: "4096 tokens", or "4 × 4096 tokens" with 4 slots."""
    return f"{est.slots} × {est.context} tokens" if est.slots > 1 else f"{est.context} tokens"


def _slots_of(spec: ModelSpec, est: VramEstimate) -> int | None:
    return est.slots if has_slots(spec) else None


def _fewer(st: _State, spec: ModelSpec, est: VramEstimate) -> bool:
    """Does ``est`` count fewer slots than the model asks for?"""
    return has_slots(spec) and est.slots < st.slots


def _lowered(st: _State, spec: ModelSpec, est: VramEstimate) -> str:
    """What a reason adds when the model got fewer slots than it asked for."""
    if not _fewer(st, spec, est):
        return ""
    kv_all = est.kv_mb // est.slots * st.slots
    return (f"; {est.slots} of {st.slots} slots: the KV cache of {st.slots} × {est.context} tokens "
            f"({_gb(kv_all)}) does not fit")


def _assign(st: _State, spec: ModelSpec, host: _Host, gpu: _Gpu | None, n_gpu_layers: int,
            est: VramEstimate, reason: str) -> None:
    vram = est.vram_for_layers(n_gpu_layers) if gpu is not None else 0
    ram = est.ram_for_layers(n_gpu_layers) if gpu is not None else est.ram_mb
    if gpu is not None:
        gpu.used += vram
    host.ram_free -= ram
    st.placed[spec.id] = Assignment(
        model=spec.id, kind=spec.kind, node=host.name, device=gpu.device if gpu else "cpu",
        quant=spec.quant, n_gpu_layers=n_gpu_layers if gpu is not None else 0, vram_mb=vram,
        reason=reason + _lowered(st, spec, est), backend=spec.backend, ram_mb=ram, slots=_slots_of(spec, est))


def _host_of(st: _State, gpu: _Gpu) -> _Host:
    return next(h for h in st.hosts if h.name == gpu.node)


def _fit_gpu(st: _State, spec: ModelSpec, est: VramEstimate, hosts: list[_Host], why: str) -> bool:
    for gpu in st.gpus(hosts):
        if est.total_mb <= gpu.free:
            reason = (f"{why}: {gpu.node} {gpu.device} ({gpu.name}) has {_gb(gpu.free)} free after the "
                      f"{st.reserve_mb} MB reserve, needs {_gb(est.total_mb)} at {_at(est)}")
            _assign(st, spec, _host_of(st, gpu), gpu, -1, est, reason)
            return True
    return False


def _fit_partial(st: _State, spec: ModelSpec, est: VramEstimate, hosts: list[_Host], why: str) -> bool:
    """Offload as many layers as fit on the GPU with the most free VRAM whose host has the RAM."""
    if not est.partial_ok:
        return False
    best: tuple[int, _Gpu] | None = None
    for gpu in sorted(st.gpus(hosts), key=lambda g: -g.free):
        n = layers_that_fit(est, gpu.free)
        if n > 0 and est.ram_for_layers(n) <= _host_of(st, gpu).ram_free and (best is None or n > best[0]):
            best = (n, gpu)
    if best is None:
        return False
    n, gpu = best
    reason = (f"{why}: needs {_gb(est.total_mb)}, more than any GPU has free; {n} of {est.n_layers} layers on "
              f"{gpu.node} {gpu.device} ({_gb(gpu.free)} free), the rest on its CPU")
    _assign(st, spec, _host_of(st, gpu), gpu, n, est, reason)
    return True


def _fit_cpu(st: _State, spec: ModelSpec, est: VramEstimate, hosts: list[_Host], why: str) -> bool:
    best = max(hosts, key=lambda h: (h.ram_free, -h.order), default=None)
    if best is None or est.ram_mb > best.ram_free:
        return False
    gpu_note = "no GPU in the cluster" if not any(h.gpus for h in st.hosts) else \
        f"no GPU has {_gb(est.total_mb)} free"
    reason = (f"{why}: {gpu_note}; on the CPU of {best.name}, which has {_gb(best.ram_free)} of RAM free "
              f"for models (needs {_gb(est.ram_mb)})")
    _assign(st, spec, best, None, 0, est, reason)
    return True


def _unplace(st: _State, spec: ModelSpec, est: VramEstimate) -> None:
    """``est``: the least the model could run with (one slot)."""
    most_vram = max((g.free for g in st.gpus(st.hosts)), default=0)
    most_ram = max((h.ram_free for h in st.hosts), default=0)
    pooled = ""
    if st.split and sum(1 for h in st.hosts if h.gpus) > 1:
        pooled = f"; split across hosts: {_gb(sum(_best_gpu(h).free for h in st.hosts if h.gpus))} free together"
    one = " with 1 slot" if _fewer(st, spec, est) else ""
    st.unplaced[spec.id] = Unplaced(
        spec.id, f"fits nowhere: needs {_gb(est.total_mb)} of VRAM{one} (most free on a GPU: {_gb(most_vram)}{pooled}) "
                 f"or {_gb(est.ram_mb)} of RAM on a CPU (most free on a host: {_gb(most_ram)})")


# --------------------------------------------------------------------------- split (pooled VRAM)
def _short_name(gpu_name: str) -> str:
    for prefix in ("NVIDIA GeForce ", "NVIDIA ", "GeForce "):
        if gpu_name.startswith(prefix):
            return gpu_name[len(prefix):]
    return gpu_name


def _best_gpu(host: _Host) -> _Gpu:
    return max(host.gpus, key=lambda g: (g.free, -g.index))


def split_layers(n_layers: int, rooms: Sequence[float], caps: Sequence[int]) -> list[int] | None:
    """``n_layers`` over devices in proportion to ``rooms``, device i taking at most ``caps[i]``.

    Rounds down, then hands the remaining layers one by one to the device furthest below
    its proportional share that still has room (ties: the earlier device). None when the
    caps together cannot hold every layer.
    """
    if n_layers <= 0 or sum(caps) < n_layers or sum(rooms) <= 0:
        return None
    ideal = [n_layers * r / sum(rooms) for r in rooms]
    layers = [min(c, math.floor(x)) for c, x in zip(caps, ideal)]
    while sum(layers) < n_layers:
        i = max((i for i in range(len(layers)) if layers[i] < caps[i]), key=lambda i: (ideal[i] - layers[i], -i))
        layers[i] += 1
    return layers


def _fit_split(st: _State, spec: ModelSpec, est: VramEstimate, hosts: list[_Host], why: str) -> bool:
    """Split the model by layers across the GPUs of the fewest hosts that hold it together.

    Each share costs the runtime and compute buffer (``overhead_mb``) plus its layers (weights
    and KV cache); the share of the engine host — the GPU with the most free VRAM — also
    carries what is not a repeating block (token embeddings, output layer).
    """
    if not st.split or spec.kind != "chat" or not est.partial_ok or est.layer_mb <= 0:
        return False
    rest_mb = max(0, est.total_mb - est.overhead_mb - math.ceil(est.n_layers * est.layer_mb))
    gpus = sorted((_best_gpu(h) for h in hosts if h.gpus), key=lambda g: (-g.free, _host_of(st, g).order))
    gpus = [g for i, g in enumerate(gpus) if g.free - est.overhead_mb - (rest_mb if i == 0 else 0) >= est.layer_mb]
    for k in range(2, len(gpus) + 1):
        chosen = gpus[:k]
        rooms = [g.free - est.overhead_mb - (rest_mb if i == 0 else 0) for i, g in enumerate(chosen)]
        if min(rooms) < est.layer_mb:
            continue
        layers = split_layers(est.n_layers, rooms, [math.floor(r / est.layer_mb) for r in rooms])
        if layers is None or min(layers) < 1:
            continue
        shares: list[dict[str, Any]] = [{"node": g.node, "device": g.device, "layers": n,
                                          "vram_mb": est.overhead_mb + math.ceil(n * est.layer_mb)
                                          + (rest_mb if i == 0 else 0)}
                                         for i, (g, n) in enumerate(zip(chosen, layers))]
        for g, share in zip(chosen, shares):
            g.used += share["vram_mb"]
        where = ", ".join(f"{s['layers']}{f' of {est.n_layers}' if i == 0 else ''} layers on {g.node} "
                          f"{_short_name(g.name)}" for i, (g, s) in enumerate(zip(chosen, shares)))
        reason = (f"{why}: needs {_gb(est.total_mb)} at {_at(est)}; no GPU has it free; split "
                  f"across {k} hosts, engine on {chosen[0].node}: {where}{_lowered(st, spec, est)}")
        st.placed[spec.id] = Assignment(
            model=spec.id, kind=spec.kind, node=chosen[0].node, device=chosen[0].device, quant=spec.quant,
            n_gpu_layers=-1, vram_mb=shares[0]["vram_mb"], reason=reason, backend=spec.backend, split=shares,
            slots=_slots_of(spec, est))
        return True
    return False


def _build_hosts(hosts: dict[str, HostProfile], reserve_mb: int) -> list[_Host]:
    built = [
        _Host(name, prof,
              [_Gpu(name, g.index, g.name, max(0, g.vram_total_mb - reserve_mb)) for g in prof.gpus],
              ram_budget_mb(prof))
        for name, prof in hosts.items()
    ]
    built.sort(key=lambda h: (-h.best_capacity, -h.ram_free, h.name))
    for i, h in enumerate(built):
        h.order = i
    return built


def _order(specs: list[ModelSpec], ests: dict[str, VramEstimate]) -> tuple:
    """(primary chat model, side models in placement order, the other chat models)."""
    chats = sorted((s for s in specs if s.kind == "chat" and s.backend != "hf8bit"),
                   key=lambda s: (not _is_four_bit(s), *_rank_key(s, ests[s.id])))
    primary = chats[0] if chats else None
    if primary is None:
        small_chats = sorted((s for s in specs if s.kind == "chat"), key=lambda s: _rank_key(s, ests[s.id]))
        primary = small_chats[0] if small_chats else None
    side = sorted((s for s in specs if s is not primary and (s.kind in ("embed", "rerank") or s.backend == "hf8bit")),
                  key=lambda s: (s.kind not in ("embed", "rerank"), *_rank_key(s, ests[s.id])))
    rest = sorted((s for s in specs if s is not primary and s not in side), key=lambda s: _rank_key(s, ests[s.id]))
    return primary, side, rest


def _place_primary(st: _State, spec: ModelSpec, ests: list[VramEstimate]) -> None:
    """1. The biggest chat model → the host with the most usable VRAM; else split; else offload.
    Each step with all its slots, then fewer (rule 6)."""
    chat_host, others = st.hosts[0], st.hosts[1:]
    why = "biggest chat model" + (f", {spec.quant}" if _is_four_bit(spec) else "")
    why_gpu = why + (", to the GPU with the most usable VRAM" if others else "")
    if not (any(_fit_gpu(st, spec, e, [chat_host], why_gpu) or _fit_gpu(st, spec, e, others, why) for e in ests)
            or any(_fit_split(st, spec, e, st.hosts, why) for e in ests)
            or any(_fit_partial(st, spec, e, [chat_host], why) or _fit_partial(st, spec, e, others, why)
                   for e in ests)
            or any(_fit_cpu(st, spec, e, st.hosts, why) for e in ests)):
        _unplace(st, spec, ests[-1])


def _place_side(st: _State, spec: ModelSpec, est: VramEstimate) -> None:
    """2. Embeddings and 8-bit small models → another host, keeping the chat host's VRAM for chat."""
    chat_host, others = st.hosts[0], st.hosts[1:]
    what = {"embed": "embedding model", "rerank": "reranker"}.get(spec.kind, f"{spec.quant} small model")
    away = f"{what} kept off the chat host {chat_host.name}"
    only = f"{what} on the chat host (no other host has room)" if others else f"{what} on the only host"
    if not (_fit_gpu(st, spec, est, others, away)
            or (spec.kind in ("embed", "rerank") and _fit_cpu(st, spec, est, others, away))
            or _fit_gpu(st, spec, est, [chat_host], only)
            or _fit_cpu(st, spec, est, st.hosts, what)):
        _unplace(st, spec, est)


def _place_rest(st: _State, rest: list[ModelSpec], ests: dict[str, list[VramEstimate]]) -> None:
    """3. The other chat models: first every one that fits whole on some GPU (chat host first)
    with all its slots, then with fewer, then splits, partial offloads and CPUs — so a split,
    a partial offload or fewer slots never take the VRAM a smaller model could have used whole."""
    waiting = [s for s in rest if not _fit_gpu(st, s, ests[s.id][0], st.hosts, "chat model")]
    waiting = [s for s in waiting if not any(_fit_gpu(st, s, e, st.hosts, "chat model") for e in ests[s.id][1:])]
    for spec in waiting:
        e_all = ests[spec.id]
        if not (any(_fit_split(st, spec, e, st.hosts, "chat model") for e in e_all)
                or any(_fit_partial(st, spec, e, st.hosts, "chat model") for e in e_all)
                or any(_fit_cpu(st, spec, e, st.hosts, "chat model") for e in e_all)):
            _unplace(st, spec, e_all[-1])


def _slot_choices(est: VramEstimate, spec: ModelSpec, slots: int) -> list[VramEstimate]:
    """The estimates a model may be placed with: all ``slots``, then one fewer, down to 1
    (only the first when the slots cost nothing: no slots, or no KV cache counted)."""
    full = with_slots(est, spec, slots)
    if full.kv_mb <= est.kv_mb:
        return [full]
    return [full, *(with_slots(est, spec, k) for k in range(slots - 1, 0, -1))]


def plan(hosts: dict[str, HostProfile], models: list[ModelSpec], *, reserve_mb: int = 500,
         context: int = 2048, paths: dict[str, Path] | None = None, split: bool = True, slots: int = 1,
         drafts: dict[str, ModelSpec] | None = None) -> Plan:
    """Place every model on a host and device (or split it across hosts' GPUs when ``split``),
    or report it unplaced with the reason. ``slots``: engine slots of a GGUF chat model
    (TARS_PARALLEL with llama-server, else 1): ``context`` is per slot, a KV cache per slot;
    fewer where VRAM is short (rule 6). ``drafts``: model id → its draft model (rule 7)."""
    paths = paths or {}
    st = _State(_build_hosts(hosts, reserve_mb), reserve_mb, split=split, slots=max(1, slots))
    specs: list[ModelSpec] = []
    for spec in models:
        if spec.id not in {s.id for s in specs}:  # listed twice: plan it once
            specs.append(spec)
    if not st.hosts:
        return Plan(unplaced=[Unplaced(s.id, "no hosts to place it on") for s in specs])
    choices = {s.id: _slot_choices(estimate(s, context, paths.get(s.id)), s, st.slots) for s in specs}
    primary, side, rest = _order(specs, {m: c[0] for m, c in choices.items()})
    if primary is not None:
        _place_primary(st, primary, choices[primary.id])
    for spec in side:
        _place_side(st, spec, choices[spec.id][0])
    _place_rest(st, rest, choices)
    if drafts:
        place_drafts(list(st.placed.values()), drafts,  # in placement order: the biggest chat model first
                     {(g.node, g.device): g.free for h in st.hosts for g in h.gpus},
                     {h.name: h.ram_free for h in st.hosts}, context=context, paths=paths)
    return Plan(assignments=[st.placed[s.id] for s in specs if s.id in st.placed],
                unplaced=[st.unplaced[s.id] for s in specs if s.id in st.unplaced])


def usable_vram_mb(profile: HostProfile, reserve_mb: int = 500) -> int:
    """VRAM of the host's biggest GPU minus the reserve (0 without a GPU)."""
    best = profile.best_gpu
    return max(0, best.vram_total_mb - reserve_mb) if best else 0


def recommend(hosts: dict[str, HostProfile], catalog: list[ModelSpec], *, reserve_mb: int = 500,
              context: int = 2048) -> list[ModelSpec]:
    """The catalog models this set of hosts should serve (and so pull).

    One chat model — the biggest 4-bit GGUF that fits fully on the best GPU (with one slot:
    the plan then gives it as many slots as fit), else the embedded default; one embedding model (the embedded default); and, for each other host
    with a GPU, an 8-bit small model that fits next to the embeddings there.
    """
    if not hosts:
        return []
    ranked = _build_hosts(hosts, reserve_mb)
    chat_host, others = ranked[0], ranked[1:]
    order = {s.id: i for i, s in enumerate(catalog)}
    by_size = lambda s: (-s.params_b, order[s.id])  # noqa: E731 - a sort key
    picks: list[ModelSpec] = []
    gguf_chats = sorted((s for s in catalog if s.kind == "chat" and s.backend == "llama_cpp"), key=by_size)
    chat = next((s for s in gguf_chats if not s.embedded
                 and estimate(s, context).total_mb <= chat_host.best_capacity), None)
    chat = chat or next((s for s in catalog if s.kind == "chat" and s.backend == "llama_cpp" and s.embedded), None)
    if chat is not None:
        picks.append(chat)
    embed = next((s for s in catalog if s.kind == "embed" and s.embedded), None) or \
        next((s for s in catalog if s.kind == "embed"), None)
    if embed is not None:
        picks.append(embed)
    small = [s for s in sorted(catalog, key=by_size) if s.backend == "hf8bit"]
    for host in others:
        room = host.best_capacity - (estimate(embed, context).total_mb if embed is not None and host is others[0] else 0)
        pick = next((s for s in small if s not in picks and estimate(s, context).total_mb <= room), None)
        if pick is not None:
            picks.append(pick)
    return picks
