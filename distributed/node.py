"""The node: one host's service. Routes each request to a Target, local or remote.

Which target serves a model is ``targets.Routes``'s to say (``node.routes``): the one
place where targets — local copies, peers' models, replicas, stand-ins — are installed,
swapped and dropped, and the one routing question (``Routes.resolve``). At start a
standalone node plans for itself (``Placement``: the desired set → planner) and loads its
share in the background; a node with peers loads nothing until the cluster layer hands it
a plan (``apply_plan``) and routes the peers' models. The HTTP and RPC layers only ever
call the methods here, so both see the same routing, the same limits and the same errors.

The composition root (``service.build``) hands the node what it needs: its settings,
catalog and store, the desired set (``placement``), the peer table (``/status``) and the
split service (its split engines); each defaults to its own for a bare node (tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import __version__
from .backends.base import Backend, BackendOptions, create_backend
from .catalog import Catalog
from .deploy.placement import Placement
from .domain import (Assignment, Completion, EmbedRequest, Embeddings, GenerateRequest, GPUInfo, HostProfile,
                     ModelKind, ModelSpec, Plan, TokenChunk)
from .errors import ModelFailed, ModelNotFound, ValidationFailed
from .logs import get_logger
from .metrics import Metrics
from .modelref import is_ref, resolve_all, with_template
from .peers import PeerTable
from .settings import Settings
from .split.service import SplitService
from .store import ModelStore
from .targets import LocalTarget, Routes, Target, TargetState

log = get_logger(__name__)


def user_catalog(settings: Settings) -> Catalog:
    """The one catalog of a host: built-in entries, then ``TARS_MODELS_DIR/catalog.toml``
    (the user's own models, e.g. a local GGUF by ``path``). The composition root builds it
    once and hands it to the node, the store and the planner (``tars plan`` / ``models``
    read the same file)."""
    from .catalog import load_catalog

    return load_catalog(user_file=settings.models_dir / "catalog.toml")


class Node:
    def __init__(self, settings: Settings, profile: HostProfile | None = None, catalog: Catalog | None = None,
                 store: ModelStore | None = None, metrics: Metrics | None = None, *,
                 backend_extra: dict[str, Any] | None = None, placement: Placement | None = None,
                 peers: PeerTable | None = None, split: SplitService | None = None) -> None:
        """``profile``/``catalog``/``store`` default to detecting, the one catalog of this
        host (built-in + ``TARS_MODELS_DIR/catalog.toml``, see ``user_catalog``) and a store
        over ``settings.models_dir`` sharing that catalog; ``placement`` to the desired set of
        ``settings`` (deploy/placement.py); ``peers`` (the peer table ``/status`` lists) to
        none; ``split`` to a split service over ``peers``. ``backend_extra`` is merged into
        every backend's ``BackendOptions.extra`` (tests tune the fake backend through it)."""
        self.settings = settings
        self.name = settings.node_name
        self.role = settings.effective_role
        self.profile = profile
        catalog = catalog if catalog is not None else user_catalog(settings)
        self.store = store if store is not None else ModelStore(settings.models_dir, catalog)
        self.placement = placement if placement is not None else Placement(settings, catalog, self.store)
        self.peers = peers
        self.split = split if split is not None else SplitService(settings, peers)
        self.metrics = metrics or Metrics(self.name)
        self.metrics.bind(queue_depths=self._queue_depths, gpus=self.live_gpus, models=lambda: self.targets)
        self.backend_extra = dict(backend_extra or {})
        # the one owner of which target serves each model
        self.routes = Routes(self.name, routing=settings.routing, slack=settings.cache_route_slack)
        self.plan = Plan()
        self.planned = False  # a plan applied here yet (a node with peers waits for the cluster's first)
        self.started_at = time.monotonic()
        self._started = False

    @property
    def catalog(self) -> Catalog:
        """The one catalog of this host (the placement's: what may be deployed and planned)."""
        return self.placement.catalog

    # ----------------------------------------------------------------- lifecycle
    def model_specs(self) -> list[ModelSpec]:
        """The models this cluster serves: the desired set (``TARS_MODELS`` in order, else the
        embedded defaults, plus runtime deploys, less removals; deploy/placement.py)."""
        return self.placement.specs()

    async def start(self, load: bool | None = None) -> None:
        """Profile (if not given), plan for this host alone and start loading in the
        background. ``load`` defaults to "no peers configured": a node that joins a
        cluster waits for the cluster's plan instead. Idempotent."""
        if self._started:
            return
        self._started = True
        self.started_at = time.monotonic()
        if self.profile is None:
            from . import profiler

            self.profile = await asyncio.to_thread(profiler.profile_host, self.settings.gpu_profile, self.name)
        if any(is_ref(m) for m in self.settings.models):  # hf.co/... in TARS_MODELS: resolved once (modelref.py)
            resolved = await asyncio.to_thread(resolve_all, [m for m in self.settings.models if is_ref(m)],
                                               self.catalog)
            self.placement.share(resolved)  # the cluster learns them from here (spec: entries)
        if load is None:
            load = not self.settings.peers
        if load:
            await self.apply_plan(self.plan_alone())

    def plan_alone(self) -> Plan:
        """The plan for this host alone (what a standalone node loads)."""
        assert self.profile is not None, "start() profiles this host first"
        return self.plan_for({self.name: self.profile})

    def plan_for(self, hosts: dict[str, HostProfile]) -> Plan:
        """The desired set placed over ``hosts`` (hosts asked for by deploys, replicas included)."""
        return self.placement.plan(hosts)

    def model_paths(self, specs: list[ModelSpec]) -> dict[str, Path]:
        """Where each model's file is on this host (``Placement.model_paths``)."""
        return self.placement.model_paths(specs)

    async def stop(self) -> None:
        await self.routes.close()
        self._started = False

    @property
    def targets(self) -> dict[str, Target]:
        """model id → Target (read it; change it only through ``routes``/``apply_plan``)."""
        return self.routes.targets

    async def apply_plan(self, plan: Plan) -> None:
        """Load what ``plan`` assigns to this host, unload local models it does not
        (``Routes.apply_local``: make before break for a model arriving from a peer)."""
        self.plan = plan
        mine = {a.model: a for a in plan.for_node(self.name)}
        self.catalog.learn(plan.specs)  # hub references the planning host resolved (modelref.py)
        await self.routes.apply_local(
            mine, lambda a: self.local_target(with_template(self.catalog.get(a.model), a.chat_template), a))
        self.planned = True

    def local_target(self, spec: ModelSpec, a: Assignment) -> LocalTarget:
        """A LocalTarget for ``spec`` placed as ``a``, not started (``.start()`` loads it in the
        background) and not routed to: the caller decides (apply_plan installs it; the
        cluster keeps fallback copies inside RemoteTargets). A GGUF chat model gets an
        ``engine.target.EngineTarget`` (a llama-server child) when TARS_CHAT_ENGINE picks it."""
        from .deploy.pull import fetch
        from .engine.choice import engine_target

        served: LocalTarget | None = engine_target(self, spec, a)
        if served is not None:
            return served
        s = self.settings
        fake = s.backend_override == "fake"

        made: list[LocalTarget] = []  # the target built below (its pull progress shows in info())

        def factory() -> Backend:
            extra: dict[str, Any] = {}
            if not fake and self.profile is not None:
                from . import profiler

                extra.update(profiler.tuning(self.profile, s.vram_reserve_mb) or {})
            if fake and s.fake_token_delay_s:
                extra["token_delay_s"] = s.fake_token_delay_s  # TARS_FAKE_TOKEN_DELAY_S (backends/fake.py)
            extra.update(self.backend_extra)
            context = min(s.context, spec.context) if spec.kind == "chat" else spec.context
            # TARS_THREADS=0 leaves the choice to the backend (llama.cpp: the physical
            # cores this process may use); see LlamaCppBackend.threads.
            threads = s.threads
            options = BackendOptions(context=context, threads=threads, batch_size=s.embed_max_batch, extra=extra,
                                     runtime=s.embed_runtime, runtime_dir=s.models_dir / "runtimes")
            path = None if fake else fetch(self.store, spec, made[0] if made else None)  # pulls when not on disk
            return create_backend(spec, a, options, path, backend=s.backend_override or None)

        made.append(LocalTarget(spec, a, factory, node=self.name, queue_size=s.queue_size,
                                timeout_s=s.request_timeout_s, queue_max_wait_s=s.queue_max_wait_s, embed_max_batch=s.embed_max_batch,
                                embed_max_wait_ms=s.embed_max_wait_ms, metrics=self.metrics,
                                backend_name=s.backend_override or None))
        return made[0]

    def set_target(self, target: Target, *, close_old: bool = True) -> Target | None:
        """Install (or replace) the target for ``target.model`` (``Routes.set``)."""
        return self.routes.set(target, close_old=close_old)

    def remove_target(self, model: str, *, close: bool = True) -> Target | None:
        """Stop routing ``model`` (``Routes.remove``)."""
        return self.routes.remove(model, close=close)

    def target(self, model: str) -> Target:
        try:
            return self.targets[model]
        except KeyError:
            raise ModelNotFound(model, list(self.targets)) from None

    # ----------------------------------------------------------------- routing
    def default_model(self, kind: ModelKind) -> str | None:
        """The first configured model of ``kind`` that has a target, else any target of that kind."""
        for s in self.model_specs():
            if s.kind == kind and s.id in self.targets:
                return s.id
        return next((m for m, t in self.targets.items() if t.kind == kind), None)

    def resolve(self, model: str | None, kind: ModelKind, *, here: bool = False) -> Target:
        """The target for ``model`` (None → this node's default of ``kind``), as ``Routes.resolve``
        says. ``here``: a call a peer forwarded, computed on this host and never forwarded
        again (else ``ModelLoading``: while routing tables converge two hosts could otherwise
        bounce a request between them)."""
        if model is None or model == "":
            default = self.default_model(kind)
            if default is None:
                kinds = {sp.id: sp.kind for sp in self.model_specs()}
                unplaced = [u for u in self.plan.unplaced if kinds.get(u.model) == kind]
                if unplaced:
                    raise ModelFailed(f"no {kind} model is served here: " +
                                      "; ".join(f"'{u.model}' is not placed: {u.reason}" for u in unplaced))
                raise ModelNotFound(f"<default {kind} model>", list(self.targets))
            model = default
        target = self.routes.resolve(model, here=here)
        if target is None:
            why = next((u.reason for u in self.plan.unplaced if u.model == model), None)
            if why is not None:
                raise ModelFailed(f"model '{model}' is not served: {why}", model=model)
            raise ModelNotFound(model, list(self.targets))
        if target.kind != kind:
            what = "an embedding model: use /embed or /v1/embeddings" if target.kind == "embed" else \
                "a chat model: use /inference, /v1/chat/completions or /v1/completions"
            raise ValidationFailed(f"model '{model}' is {what}", field="model", model=model)
        return target

    async def generate(self, req: GenerateRequest, *, here: bool = False) -> Completion:
        """The answer (``via`` = this node). ``here``: a call a peer forwarded (see ``resolve``)."""
        completion = await self.resolve(req.model, "chat", here=here).generate(req)
        completion.via = self.name
        return completion

    async def stream(self, req: GenerateRequest, *, here: bool = False) -> AsyncIterator[TokenChunk | Completion]:
        """Chunks as they come, then the Completion (with ``via`` set). The first
        ``__anext__`` raises any error that happens before the first token. Closing this
        stream closes the target's at once (its generation stops, its slot is freed)."""
        items = self.resolve(req.model, "chat", here=here).stream(req)
        try:
            async for item in items:
                if isinstance(item, Completion):
                    item.via = self.name
                yield item
        finally:
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()

    async def embed(self, req: EmbedRequest, *, here: bool = False) -> Embeddings:
        result = await self.resolve(req.model, "embed", here=here).embed(req)
        result.via = self.name
        return result

    # ----------------------------------------------------------------- reporting
    def local_targets(self) -> list[Target]:
        """Targets computed on this host (LocalTarget, engine targets)."""
        return self.routes.local()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """ok only when every local assigned model is ready. Busy is not unhealthy."""
        states = {t.model: t.state for t in self.local_targets()}
        failed = {t.model: t.error or t.state for t in self.local_targets()
                  if t.state in (TargetState.FAILED, TargetState.UNAVAILABLE)}
        loading = [m for m, s in states.items() if s == TargetState.LOADING]
        ok = all(s == TargetState.READY for s in states.values())
        status = "ok" if ok else ("loading" if loading else "failed")
        body: dict[str, Any] = {"status": status, "node": self.name, "models": states}
        if loading:
            body["loading"] = loading
        if failed:
            body["failed"] = failed
        return ok, body

    def live_gpus(self) -> list[GPUInfo]:
        """Live GPU figures (NVML); a simulated profile reports its own GPUs."""
        prof = self.profile
        if prof is not None and prof.simulated:
            return list(prof.gpus)
        try:
            from . import profiler

            live = profiler.live_gpus(prof)
        except Exception:  # noqa: BLE001 - reporting must not break /status
            live = []
        return live or (list(prof.gpus) if prof is not None else [])

    def _queue_depths(self) -> dict[str, int]:
        return {t.model: t.queue_depth for t in self.local_targets()}

    def models(self) -> list[dict[str, Any]]:
        """``Target.info()`` of every model, local and remote (replicas listed, ``Routes.describe``)."""
        return self.routes.describe()

    def totals(self) -> dict[str, Any]:
        """Live figures of the models computed here (``/status`` → totals; heartbeats carry them)."""
        local = self.local_targets()
        return {
            "tokens_per_s": round(sum(t.tokens_per_s() for t in local), 3),
            "embeddings_per_s": round(sum(t.embeddings_per_s() for t in local), 3),
            "queue_depth": sum(t.queue_depth for t in local),
            "requests": sum(t.requests for t in local),
        }

    def ram(self) -> dict[str, int]:
        """{"total_mb", "free_mb"} of this host now (``/status`` → ram; heartbeats carry it)."""
        from .optional import require

        psutil = require("psutil", purpose="memory figures in /status")
        vm = psutil.virtual_memory()
        return {"total_mb": vm.total // 2**20, "free_mb": vm.available // 2**20}

    def status(self) -> dict[str, Any]:
        models = self.models()
        peers = self.peers.status() if self.peers is not None else []
        ok, _ = self.health()
        return {
            "node": self.name,
            "role": self.role,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "healthy": ok,
            "url": self.settings.base_url,
            "profile": self.profile.to_dict() if self.profile is not None else None,
            "gpus": [g.to_dict() for g in self.live_gpus()],
            "ram": self.ram(),
            "models": models,
            "totals": self.totals(),
            "peers": peers,
            "plan": self.plan.to_dict(),
        }
