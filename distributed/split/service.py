"""What one node does for pooled VRAM, both sides of a split.

- **Worker side** (the host lending its GPU): on ``split.worker_start`` over ``/rpc`` it
  runs an RPC worker for the model (``worker.WorkerPool``, 127.0.0.1 only) and, while any
  worker runs, the relay in front of them (``relay.RelayServer`` on ``TARS_HOST`` :
  ``TARS_SPLIT_PORT``, cluster token first). The last ``split.worker_stop`` stops both, so
  a host that lends nothing listens on nothing extra.
- **Engine side** (the host running llama-server): ``tunnel(host, port, model)`` gives a
  127.0.0.1 listener for the engine's ``--rpc`` that reaches that model's worker through
  the peer's relay.

Both hosts must run one llama.cpp version (llama.cpp's RPC protocol changes between
releases): ``worker_start`` refuses a caller whose version differs, naming both.

The composition root (``service.build``) makes one per node and hands it the node's
``peers`` (``seams.PeerDirectory``): the worker side stops the workers of an engine host
the cluster holds for dead or gone, the engine side (``engine.SplitEngineTarget``) looks
its worker hosts up there. The node builds its split engines with it (``Node.split``);
``rpc/split_methods.py`` serves its ``split.*`` methods.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..logs import get_logger
from ..seams import PeerDirectory
from ..settings import Settings
from .relay import RelayServer, Tunnel
from .worker import WorkerPool

if TYPE_CHECKING:
    from ..engine.binary import EngineBinary

log = get_logger(__name__)


class SplitService:
    REAP_EVERY_S = 5.0

    def __init__(self, settings: Settings, peers: PeerDirectory | None = None, *,
                 binary: "EngineBinary | None" = None, caller_gone: Callable[[str], bool] | None = None) -> None:
        """``peers``: the hosts this node knows (the engine side's worker hosts, the worker
        side's engine hosts); ``caller_gone(name)`` overrides "is that engine host dead or
        gone" (default: its peer is known and not live)."""
        self.settings = settings
        self.peers = peers
        self.name = settings.node_name
        self._token = settings.cluster_token.get_secret_value()
        self.pool = WorkerPool(settings, binary)
        self.relay: RelayServer | None = None
        self.tunnels: dict[str, Tunnel] = {}
        self._lock = asyncio.Lock()
        self._caller_gone = caller_gone or self._peer_gone  # the engine host is dead or left
        self._reaper: asyncio.Task[None] | None = None

    def _peer_gone(self, name: str) -> bool:
        peer = self.peers.get(name) if self.peers is not None else None
        return peer is not None and not peer.live

    @property
    def version(self) -> str:
        return self.pool.version

    @property
    def token(self) -> str:
        return self._token

    # ------------------------------------------------------------------ worker side
    async def worker_start(self, model: str, device: str = "", caller: str = "", version: str = "") -> dict[str, Any]:
        mine = self.version
        if version and mine and version != mine:
            raise ConfigError(f"llama.cpp versions differ: {caller or 'the engine host'} runs {version}, "
                              f"{self.name} runs {mine}; a split needs one llama.cpp version on both hosts "
                              f"(install the same llama-cpp-python and rebuild the engine)",
                              caller_version=version, version=mine)
        if not self._token:
            raise ConfigError(f"{self.name} has no TARS_CLUSTER_TOKEN: its split relay would accept no channel")
        info = await self.pool.start_worker(model, device, caller)
        async with self._lock:
            if self.relay is None:
                self.relay = RelayServer(self._token, self.settings.host, self.settings.relay_port, self.pool.targets,
                                         name=f"{self.name}-relay")
                try:
                    await self.relay.start()
                except OSError as exc:
                    self.relay = None
                    raise ConfigError(f"{self.name} cannot open its split relay on {self.settings.host}:"
                                      f"{self.settings.relay_port} ({exc.strerror or exc}); set TARS_SPLIT_PORT "
                                      f"to a free port") from None
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.get_running_loop().create_task(self._reap(), name=f"{self.name}-split-reaper")
        return {"node": self.name, "model": model, "target": model, "relay_port": self.relay.port,
                "version": mine, "worker": info}

    async def worker_stop(self, model: str) -> dict[str, Any]:
        stopped = await self.pool.stop_worker(model)
        async with self._lock:
            if not len(self.pool) and self.relay is not None:
                await self.relay.close()
                self.relay = None
        return {"node": self.name, "model": model, "stopped": stopped}

    async def _reap(self) -> None:
        """Stop the workers whose engine host the cluster holds for dead or gone: no split
        uses them any more (the engine host asks again when it is back)."""
        while len(self.pool):
            await asyncio.sleep(self.REAP_EVERY_S)
            for w in self.pool.info():
                if w.get("caller") and self._caller_gone(w["caller"]):
                    log.info("stopping the RPC worker for %s: its engine host %s is gone", w["model"], w["caller"])
                    await self.worker_stop(w["model"])

    # ------------------------------------------------------------------ engine side
    async def tunnel(self, host: str, port: int, model: str, key: str | None = None) -> Tunnel:
        """A 127.0.0.1 listener reaching ``model``'s worker behind the relay at host:port
        (replaces an older tunnel under the same ``key``, default the model id)."""
        key = key or model
        old = self.tunnels.pop(key, None)
        if old is not None:
            await old.close()
        t = Tunnel(self._token, (host, port), target=model, name=f"{self.name}->{host}:{port}/{model}")
        await t.start()
        self.tunnels[key] = t
        return t

    async def close_tunnel(self, key: str) -> None:
        t = self.tunnels.pop(key, None)
        if t is not None:
            await t.close()

    # ------------------------------------------------------------------ both
    def info(self) -> dict[str, Any]:
        return {"version": self.version,
                "relay": self.relay.info() if self.relay is not None else None,
                "workers": self.pool.info(),
                "tunnels": {m: t.info() for m, t in self.tunnels.items()}}

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for model in list(self.tunnels):
            await self.close_tunnel(model)
        await self.pool.close()
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
