"""The engine side of a split: one llama-server whose layers live on several hosts.

``SplitEngineTarget`` is an ``engine.target.EngineTarget`` (same lifecycle, requests,
slots, errors) whose assignment carries ``split`` shares on other hosts. Its command line
is the engine's (``EngineConfig.argv``) with the flags of its mode: a pure function of the
options, the mode and the port (``_argv_for``). Before the
engine starts it asks each worker host over ``/rpc`` for an RPC worker
(``split.worker_start``, which also checks that both hosts run one llama.cpp version) and
opens a token-checked tunnel to it (``relay.Tunnel``, 127.0.0.1 here); the engine gets
``--rpc <tunnels>`` and its layers by the plan:

- engine host with a CUDA build: ``-ngl 999 -sm layer --tensor-split <remote..>,<local>``
  (llama.cpp lists RPC devices first, then local GPUs; the output layer stays local);
- engine host with a CPU build (simulated GPUs): ``-ngl <remote layers + 1>``: llama.cpp
  offloads the *last* layers to the workers, the rest stays on the local CPU
  (``--tensor-split`` across the workers when there are several); the output layer is kept
  here (``-ot``), or the logits would cross the link every token.

**Failure.** llama.cpp aborts an engine whose RPC worker goes away. The supervisor
restarts it; meanwhile a watcher probes each worker through the relay. A worker host that
does not answer is *missing*: the engine is restarted without it — on this host alone
with as many layers on its GPU as fit beside its other models, the rest in RAM
(``alone``) — or, when it does not fit here at all, the model is ``failed`` and every
request gets a 503 that names the missing host (``down``). Nothing else on this host
restarts.

What a request sees. One whose engine died under it finds out why at once (the peer's
liveness, else a probe of each worker through the relay): a lost worker host makes the
target degrade then and there, and the request is sent again to the engine that now runs
alone — waiting for it to come up, at most ``RESTART_WAIT_S`` — or, when the model does not
fit here alone, answered with a 503 ``PeerUnavailable`` that names the lost host. A stream
that had already sent tokens cannot be sent again: it ends with that 503 naming the host
(the next request is served alone). Requests that arrive while the engine restarts wait
for it the same way instead of failing. An engine that died with every worker still there
(a crash of its own) is waited for and tried once more too; its supervisor restarts it.

**Restore, make before break.** While a host is missing, every ``RESTORE_EVERY_S`` the
watcher asks it for its worker again. Once every worker answers, a second engine with the
full split starts on another port while the single-host engine keeps serving; when the new
one is healthy, requests switch to it and the old one stops once its slots are idle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..domain import Assignment, Completion, GenerateRequest, ModelSpec, TokenChunk
from ..engine.config import EngineConfig
from ..engine.supervisor import ChildState, Supervisor
from ..engine.target import EngineTarget, free_port
from ..errors import ModelFailed, PeerUnavailable, TarsError
from ..logs import fields, get_logger
from ..metrics import Metrics
from ..targets.base import TargetState
from .alone import fit_alone, overlap_fits
from .relay import open_channel
from .service import SplitService

log = get_logger(__name__)

__all__ = ["PeerLink", "SplitEngineTarget", "fit_alone", "overlap_fits", "split_engine_target"]

KEEP_OUTPUT_HERE = r"^(output|token_embd)\.weight$=CPU"
Alone = Callable[[], "tuple[int | None, str]"]  # → (n_gpu_layers on this host alone | None, why)


PeerLookup = Callable[[str], Any]  # host name → its ``peers.Peer`` (url, client, live, state), or None


class PeerLink:
    """How the engine host ``me`` reaches its worker hosts: their ``/rpc`` and their
    address, through ``lookup`` (the cluster's peer table)."""

    def __init__(self, me: str, lookup: PeerLookup) -> None:
        self.me = me
        self.lookup = lookup

    def _peer(self, name: str) -> Any:
        peer = self.lookup(name)
        if peer is None:
            raise PeerUnavailable(f"{name} is not a known peer of {self.me}", peer=name)
        return peer

    def host(self, name: str) -> str:
        return urlparse(self._peer(name).url).hostname or "127.0.0.1"

    def gone(self, name: str) -> str | None:
        """Why the cluster holds ``name`` for dead or gone (missed heartbeats), else None."""
        peer = self.lookup(name)
        if peer is None or peer.live:
            return None
        return f"{name} is {getattr(peer, 'state', 'gone')} (missed heartbeats)"

    async def call(self, name: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        return await self._peer(name).client.call(method, params, timeout=timeout, retries=0)


def _set_opt(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (None: the flag and its value removed)."""
    out = list(argv)
    while flag in out:
        i = out.index(flag)
        del out[i:i + 2]
    return out + [flag, value] if value is not None else out


class SplitEngineTarget(EngineTarget):
    RESTORE_EVERY_S = 3.0
    PROBE_TIMEOUT_S = 2.0
    WORKER_TIMEOUT_S = 120.0
    RESTART_WAIT_S = 60.0  # the longest a request waits for the engine to come back (alone, or split again)

    def __init__(self, spec: ModelSpec, assignment: Assignment, config: EngineConfig, *, service: SplitService,
                 link: Any, alone: Alone, overlap: Callable[[int], bool] = lambda n: True,
                 model_path: Callable[[], Path], node: str, metrics: Metrics | None = None) -> None:
        super().__init__(spec, assignment, config, model_path=model_path, node=node, metrics=metrics)
        self.service, self.link, self._alone, self._overlap = service, link, alone, overlap
        shares = assignment.split or []
        self.remote = [s for s in shares if s["node"] != self.node]
        self.local_share = next((s for s in shares if s["node"] == self.node), None)
        self.mode = "split"  # "split" | "alone" | "down"
        self.missing: dict[str, str] = {}  # worker host -> why
        self._addr: dict[str, tuple[str, int]] = {}  # worker host -> its relay (host, port)
        self._tunnel: dict[str, str] = {}  # worker host -> 127.0.0.1:port of our tunnel to it
        self._alone_layers = 0
        self._path: Path | None = None
        self._watch: asyncio.Task[None] | None = None
        self._last_restore = 0.0
        self._last_probe = 0.0
        self._alone_why = ""
        self._degrading = asyncio.Lock()  # one degrade at a time (the watcher's, or a request's)

    # ----------------------------------------------------------------- argv
    def _argv_for(self, path: Path, mode: str, port: int) -> list[str]:
        """The command line of an engine on ``port`` in ``mode`` ("split" | "alone"); changes nothing."""
        argv = self.config.argv(path, port)
        cuda = self.config.binary.kind == "cuda"
        if mode == "alone":
            n = self._alone_layers
            return _set_opt(argv, "-ngl", str(n if n >= 0 else 999))
        argv = _set_opt(_set_opt(argv, "-sm", None), "-mg", None)
        argv += ["--rpc", ",".join(self._tunnel[s["node"]] for s in self.remote)]
        layers = [s["layers"] for s in self.remote]
        if cuda and self.local_share is not None:
            split = layers + [self.local_share["layers"]]
            return _set_opt(argv, "-ngl", "999") + ["-sm", "layer", "--tensor-split", ",".join(map(str, split))]
        argv = _set_opt(argv, "-ngl", str(sum(layers) + 1))
        argv += ["-ot", KEEP_OUTPUT_HERE]  # else the logits (vocab x 4 bytes) would cross the link every token
        return argv + (["--tensor-split", ",".join(map(str, layers))] if len(layers) > 1 else [])

    def argv(self, path: Path) -> list[str]:
        self.port = free_port(self.config.host)
        return self._argv_for(path, self.mode, self.port)

    # ----------------------------------------------------------------- workers
    async def _connect(self, share: dict[str, Any]) -> None:
        """Ask the worker host for its worker, open our tunnel to it (raises on failure)."""
        name = share["node"]
        res = await self.link.call(name, "split.worker_start",
                                   {"model": self.model, "device": share["device"], "caller": self.node,
                                    "version": self.service.version}, self.WORKER_TIMEOUT_S)
        addr = (self.link.host(name), int(res["relay_port"]))
        t = await self.service.tunnel(*addr, self.model, key=f"{self.model}@{name}")
        self._addr[name] = addr
        self._tunnel[name] = t.address

    async def _connect_missing(self, names: list[str]) -> dict[str, str]:
        async def one(share: dict[str, Any]) -> tuple[str, str | None]:
            try:
                await self._connect(share)
                return share["node"], None
            except TarsError as exc:
                return share["node"], exc.message
            except Exception as exc:  # noqa: BLE001 - reported as the host's problem
                return share["node"], f"{type(exc).__name__}: {exc}"

        results = await asyncio.gather(*(one(s) for s in self.remote if s["node"] in names))
        return {n: why for n, why in results if why is not None}

    async def _probe(self) -> dict[str, str]:
        """Worker hosts whose worker does not answer through the relay now."""
        async def one(name: str) -> tuple[str, str | None]:
            if name not in self._addr:
                return name, "never connected"
            try:
                _, w = await open_channel(*self._addr[name], self.service.token, self.model,
                                          timeout=self.PROBE_TIMEOUT_S)
                w.close()
                return name, None
            except TarsError as exc:
                return name, exc.message

        results = await asyncio.gather(*(one(s["node"]) for s in self.remote))
        return {n: why for n, why in results if why is not None}

    async def _release(self, names: list[str]) -> None:
        for name in names:
            await self.service.close_tunnel(f"{self.model}@{name}")
            self._tunnel.pop(name, None)

    # ----------------------------------------------------------------- lifecycle
    async def _boot(self) -> None:
        self._path = await asyncio.to_thread(self._model_path)
        self.missing = await self._connect_missing([s["node"] for s in self.remote])
        if self.missing:
            self._choose_degraded()
        self._watch = asyncio.get_running_loop().create_task(self._watcher(), name=f"split-{self.model}")
        if self.mode == "down":
            self.served.loaded.set()
            return
        await EngineTarget._boot(self)

    def _choose_degraded(self) -> None:
        n, why = self._alone()
        self._alone_why = why
        hosts = ", ".join(f"{h} ({w})" for h, w in sorted(self.missing.items()))
        if n is None:
            self.mode = "down"
            self.served.failed(f"needs {', '.join(sorted(self.missing))} for its split and that host is unreachable: "
                               f"{hosts}; it does not fit {self.node} alone ({why})")
        else:
            self.mode = "alone"
            self._alone_layers = n
        log.warning("split model %s: worker host missing: %s; %s", self.model, hosts,
                    f"running on {self.node} alone ({why})" if n is not None else "not served until it is back",
                    extra=fields(model=self.model))

    async def _degrade(self, gone: dict[str, str]) -> None:
        self.missing.update(gone)
        await self._release(list(gone))
        self._choose_degraded()
        sup = self.supervisor
        if sup is not None:
            await sup.stop()
            if self.mode == "alone":
                self.served.state = TargetState.LOADING
                await sup.start()
        elif self.mode == "alone":
            await EngineTarget._boot(self)

    async def _watcher(self) -> None:
        while not self.served.closed:
            await asyncio.sleep(0.5)
            try:
                if self.mode == "split":
                    gone = self._gone_hosts()
                    sup = self.supervisor
                    engine_down = sup is not None and sup.state in (ChildState.RESTARTING, ChildState.FAILED)
                    if not gone and engine_down and time.monotonic() - self._last_probe >= 1.0:
                        self._last_probe = time.monotonic()
                        gone = await self._probe()  # did the engine die because a worker went away?
                    if gone and not self.served.closed:
                        async with self._degrading:
                            if self.mode == "split":
                                await self._degrade(gone)
                elif time.monotonic() - self._last_restore >= self.RESTORE_EVERY_S:
                    self._last_restore = time.monotonic()
                    await self._try_restore()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watcher must outlive one bad round
                log.exception("split watcher of %s", self.model)

    async def _try_restore(self) -> None:
        still = await self._connect_missing(list(self.missing))
        if still:
            self.missing = still
            return
        assert self._path is not None
        if self.supervisor is None:  # never served (down from the start): nothing to keep serving
            self.mode, self.missing = "split", {}
            self.served.state, self.served.error = TargetState.LOADING, None
            await EngineTarget._boot(self)
            return
        if self.mode == "alone" and self.config.binary.kind == "cuda" and not self._overlap(self._alone_layers):
            # both engines at once would not fit this GPU: break before make, said out loud
            log.warning("split model %s: the single-host engine and the split engine do not fit %s's GPU "
                        "together; restarting straight into the split (a short gap)", self.model, self.node,
                        extra=fields(model=self.model))
            self.mode, self.missing = "split", {}
            self.served.state = TargetState.LOADING
            await self.supervisor.stop()
            await self.supervisor.start()
            return
        port = free_port(self.config.host)
        holder: dict[str, Supervisor] = {}
        path = self._path

        def argv() -> list[str]:
            # the first life on the port the health check knows; once serving, the usual way
            return self.argv(path) if self.supervisor is holder.get("sup") else self._argv_for(path, "split", port)

        async def healthy() -> bool:
            r = await self._client.get(f"http://{self.config.host}:{port}/health", timeout=2.0)
            return r.status_code == 200

        sup = Supervisor(self.model, argv, health=healthy, env=self.supervisor.env if self.supervisor else None,
                         start_timeout_s=self.config.start_timeout_s, max_failures=1)
        holder["sup"] = sup
        await sup.start()
        if await sup.wait_ready() is not ChildState.READY or self.served.closed:
            log.warning("split model %s: the split engine did not come back (%s); still %s", self.model,
                        sup.error, self.mode, extra=fields(model=self.model))
            await sup.stop()
            return
        old, self.supervisor = self.supervisor, sup
        self.port, self.mode, self.missing = port, "split", {}
        sup.max_failures = self.config.max_failures
        sup.on_state = self._on_child
        self._ever_ready = True
        self.served.ready()
        log.info("split model %s: split restored across %s (make before break)", self.model,
                 ", ".join(s["node"] for s in self.remote), extra=fields(model=self.model))
        if old is not None:
            deadline = time.monotonic() + 60
            while self.slots.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            old.on_state = None
            await old.stop()

    # ----------------------------------------------------------------- requests around a lost host
    def _gone_hosts(self) -> dict[str, str]:
        """Worker hosts the cluster holds for dead or gone, with why."""
        return {n: why for s in self.remote if (why := self.link.gone(n := s["node"]))}

    def _gone(self, exc: Exception) -> ModelFailed:
        err = super()._gone(exc)
        err.details["engine_died"] = True  # the request may be sent again once the engine runs
        return err

    def _lost_error(self, *, mid_answer: bool = False) -> PeerUnavailable:
        host, why = sorted(self.missing.items())[0] if self.missing else ("a worker host", "unknown")
        hosts = ", ".join(s["node"] for s in self.assignment.split or [])
        if mid_answer:
            msg = (f"model '{self.model}' is split across {hosts}; {host} went away mid-answer ({why}): send the "
                   f"request again" + (f" ({self.node} serves it alone now)" if self.mode == "alone" else ""))
        else:
            msg = (f"model '{self.model}' is split across {hosts}; {host} is gone ({why}) and the model does not "
                   f"fit {self.node} alone ({self._alone_why}); it is served again when {host} is back")
        return PeerUnavailable(msg, peer=host, model=self.model, missing=dict(self.missing))

    async def _after_death(self) -> None:
        """The engine died under a request: was it a worker host? Degrade now (not at the
        watcher's next round), so the request can be sent again or told which host is gone."""
        async with self._degrading:
            if self.mode == "split" and not self.served.closed:
                gone = self._gone_hosts() or await self._probe()
                if gone:
                    await self._degrade(gone)
        if self.mode == "down":
            raise self._lost_error()

    async def _engine_ready(self) -> None:
        """Wait (at most ``RESTART_WAIT_S``) while the engine restarts, alone or split again;
        a model that is down for a lost host is a 503 naming it. A first load is not waited
        for: it answers "loading" as always."""
        if self.mode == "down":
            raise self._lost_error()
        if not self._ever_ready or self.served.state == "ready":
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.RESTART_WAIT_S
        while self.served.state != "ready" and self.mode != "down" and not self.served.closed \
                and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.mode == "down":
            raise self._lost_error()

    async def generate(self, req: GenerateRequest) -> Completion:
        await self._engine_ready()
        try:
            return await EngineTarget.generate(self, req)
        except ModelFailed as exc:
            if not exc.details.get("engine_died"):
                raise
        await self._after_death()
        await self._engine_ready()
        return await EngineTarget.generate(self, req)  # once more, on the engine that runs now

    async def stream(self, req: GenerateRequest) -> AsyncIterator[TokenChunk | Completion]:
        await self._engine_ready()
        sent = False
        for attempt in (1, 2):
            inner = EngineTarget.stream(self, req)
            try:
                async for item in inner:
                    sent = sent or isinstance(item, TokenChunk)
                    yield item
                return
            except ModelFailed as exc:
                if attempt == 2 or not exc.details.get("engine_died"):
                    raise
                await self._after_death()
                if sent:  # tokens are out: the answer cannot be sent again from its start
                    if self.missing:
                        raise self._lost_error(mid_answer=True) from None
                    raise
                await self._engine_ready()
            finally:
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()

    async def close(self) -> None:
        self.served.close()
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        await super().close()
        await self._release(list(self._tunnel))
        await asyncio.gather(*(self._stop_worker(s["node"]) for s in self.remote), return_exceptions=True)

    async def _stop_worker(self, name: str) -> None:
        try:
            await self.link.call(name, "split.worker_stop", {"model": self.model, "caller": self.node}, 3.0)
        except Exception as exc:  # noqa: BLE001 - the worker host may be gone already
            log.info("split model %s: could not stop the worker on %s (%s)", self.model, name, exc)

    def info(self) -> dict[str, Any]:
        out = super().info()
        shares = []
        for s in self.assignment.split or []:
            here = s["node"] == self.node
            state = "missing" if s["node"] in self.missing else ("engine" if here else "worker")
            shares.append({**s, "state": state})
        out["split"] = shares
        out["split_mode"] = self.mode
        if self.missing:
            out["missing"] = dict(self.missing)
        return out


def split_engine_target(spec: ModelSpec, a: Assignment, config: EngineConfig, *, node: str,
                        model_path: Callable[[], Path], metrics: Metrics | None, service: SplitService,
                        peers: PeerLookup, alone: Alone, overlap: Callable[[int], bool]) -> SplitEngineTarget:
    """The engine for a split assignment on host ``node`` (``engine.choice`` calls this), from
    what it needs and nothing else: the split service of this host (workers, relay, tunnels),
    the cluster's peer lookup, and where the model goes without its worker hosts (``alone``:
    ``fit_alone``) and whether both engines fit at once (``overlap``: ``overlap_fits``)."""
    return SplitEngineTarget(spec, a, config, service=service, link=PeerLink(node, peers), alone=alone,
                             overlap=overlap, model_path=model_path, node=node, metrics=metrics)
