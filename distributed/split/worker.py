"""The worker side of a split: llama.cpp RPC workers this host runs for another host's engine.

One ``ggml-rpc-server`` per split model (the worker serves one engine connection at a
time), each a supervised child (``engine.Supervisor``: health, restart with backoff, logs
through our logger, dies with the node) bound to **127.0.0.1 only** on a free port. Its
local tensor cache (``-c``: weights the engine sent once are kept on disk under their
hash, so a restart does not resend gigabytes) lives under the models folder,
``TARS_MODELS_DIR/rpc-cache/rpc`` (llama.cpp puts it under ``$LLAMA_CACHE/rpc``).

Only the node's split relay (``relay.RelayServer``) reaches a worker: ``targets()`` is the
relay's map of model id → 127.0.0.1 address of the workers that are ready.

API::

    pool = WorkerPool(settings, binary=None)     # binary: engine.binary.EngineBinary (None → locate())
    await pool.start_worker(model, device="", caller="") -> dict   # idempotent; waits until ready
    await pool.stop_worker(model) -> bool
    pool.targets() -> {model: ("127.0.0.1", port)}
    pool.info() -> [dict]; pool.version -> str; await pool.close()
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

from ..engine.supervisor import ChildState, Supervisor
from ..errors import ConfigError, ModelFailed
from ..logs import fields, get_logger

log = get_logger(__name__)

READY_TIMEOUT_S = 60.0
MAX_FAILURES = 5  # starts in a row that never get healthy before the worker is FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def tcp_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port (the worker is up)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def rpc_device(device: str, kind: str) -> str | None:
    """llama.cpp's device name for a plan device: cuda:1 → CUDA1 on a CUDA build; None
    (the worker's default: its GPUs, else its CPU) on a CPU build or for "cpu"."""
    if kind == "cuda" and device.startswith("cuda:"):
        return "CUDA" + device.split(":", 1)[1]
    return None


class Worker:
    """One supervised ``ggml-rpc-server`` for one split model."""

    def __init__(self, model: str, argv: list[str], port: int, env: dict[str, str], caller: str) -> None:
        self.model, self.port, self.caller = model, port, caller
        self.sup = Supervisor(f"rpc-{model}", argv, health=lambda: tcp_open(port), env=env,
                              start_timeout_s=READY_TIMEOUT_S, max_failures=MAX_FAILURES, backoff_max_s=5.0)

    def info(self) -> dict[str, Any]:
        return {"model": self.model, "listen": f"127.0.0.1:{self.port}", "caller": self.caller,
                **{k: v for k, v in self.sup.info().items() if k != "name"}}


class WorkerPool:
    def __init__(self, settings: Any, binary: Any = None) -> None:
        self.settings = settings
        self._binary = binary
        self._workers: dict[str, Worker] = {}
        self._lock = asyncio.Lock()

    @property
    def binary(self) -> Any:
        if self._binary is None:
            from ..engine.binary import locate

            self._binary = locate(getattr(self.settings, "engine_bin", "") or "")
        return self._binary

    @property
    def version(self) -> str:
        """The llama.cpp this host runs: the llama-cpp-python release it was built from, and its build."""
        b = self.binary
        return "" if b is None else (b.version or b.build or "")

    @property
    def cache_dir(self) -> Path:
        return Path(self.settings.models_dir) / "rpc-cache"

    def _argv(self, port: int, device: str) -> list[str]:
        b = self.binary
        if b is None or b.rpc_server is None:
            from ..engine.binary import why_not

            reason = why_not(getattr(self.settings, "engine_bin", "") or "") if b is None else \
                f"{b.server.parent} has no ggml-rpc-server (build with scripts/build_engine.sh, -DGGML_RPC=ON)"
            raise ConfigError(f"{self.settings.node_name} cannot run an RPC worker: {reason}")
        argv = [str(b.rpc_server), "--host", "127.0.0.1", "--port", str(port), "--cache"]
        threads = int(getattr(self.settings, "threads", 0) or 0) or max(1, (os.cpu_count() or 2) // 2)
        argv += ["--threads", str(threads)]
        dev = rpc_device(device, b.kind)
        if dev:
            argv += ["--device", dev]
        return argv

    async def start_worker(self, model: str, device: str = "", caller: str = "") -> dict[str, Any]:
        """Start (or reuse) the worker for ``model``; returns its info once it is ready."""
        async with self._lock:
            w = self._workers.get(model)
            if w is None or w.sup.state is ChildState.FAILED:
                if w is not None:
                    await w.sup.stop()
                port = free_port()
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                env = {**os.environ, "LLAMA_CACHE": str(self.cache_dir)}
                w = Worker(model, self._argv(port, device), port, env, caller)
                self._workers[model] = w
                log.info("starting RPC worker for %s (engine on %s) on 127.0.0.1:%d", model, caller or "?", port,
                         extra=fields(model=model))
                await w.sup.start()
        state = await w.sup.wait_ready(READY_TIMEOUT_S)
        if state is not ChildState.READY:
            raise ModelFailed(f"the RPC worker for {model} on {self.settings.node_name} did not start: "
                              f"{w.sup.error or state.value}", model=model)
        return w.info()

    async def stop_worker(self, model: str) -> bool:
        async with self._lock:
            w = self._workers.pop(model, None)
        if w is None:
            return False
        log.info("stopping RPC worker for %s (no split uses it)", model, extra=fields(model=model))
        await w.sup.stop()
        return True

    def targets(self) -> dict[str, tuple[str, int]]:
        return {m: ("127.0.0.1", w.port) for m, w in self._workers.items() if w.sup.state is ChildState.READY}

    def info(self) -> list[dict[str, Any]]:
        return [w.info() for w in self._workers.values()]

    def __len__(self) -> int:
        return len(self._workers)

    async def close(self) -> None:
        async with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(w.sup.stop() for w in workers), return_exceptions=True)
