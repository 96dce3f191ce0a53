"""Helpers shared by tests and benchmarks that start real servers on loopback addresses.

``ServerProcess`` is the one way a test or a benchmark starts a node: ``python -m
distributed serve`` (or another command, e.g. a launcher written by a setup script) in a
process group of its own with its output in a log file; it picks a free port and moves
to the next one when another process takes the port first, waits for ``/health``, and
stops the whole group — nothing is left behind, whatever the node started::

    with ServerProcess("pc1", "127.0.0.2", ports=range(18600, 18610), log_dir=tmp,
                       env={"TARS_MODELS_DIR": str(models)}) as node:
        node.start()                 # launch + wait for /health 200
        httpx.get(node.url + "/status")

``serve_in_thread`` serves the app of one node with uvicorn in a thread of the test's own
process instead (fake backends, fast), ``serve_in_process`` runs it with no socket at all
(httpx over ASGI), and ``tars`` runs the real CLI against a node.

Importable without pytest (the benchmarks use it); ``free_port`` skips the calling test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIND_FAILED = "address already in use"  # what uvicorn logs when another process holds the port


class ServerFailed(RuntimeError):
    """The server exited, or did not get where it was waited for in time (the message
    carries the end of its log)."""


def _ports_that_bind(host: str, ports: range, taken: set[int] | None) -> Iterator[int]:
    """Ports of ``ports`` that bind on ``host`` now and are not in ``taken`` (each one
    handed out is added to it, so one run never hands a port out twice)."""
    for port in ports:
        if taken is not None and port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        yield port


def free_port(host: str, ports: range, taken: set[int] | None = None) -> int:
    """A port of ``ports`` that binds on ``host`` now and is not in ``taken`` (the one
    returned is added to it). Skips the test, naming the range, when none is free. A probe
    cannot reserve the port: a server that binds it later may still lose it to another
    process (``ServerProcess`` retries on the next port then)."""
    for port in _ports_that_bind(host, ports, taken):
        return port
    import pytest

    pytest.skip(f"no free port in {ports.start}-{ports.stop - 1} on {host}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running: it exists and is not a zombie (killed, but not yet
    reaped by its parent or init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone (FileNotFoundError), or its /proc entry vanished while being read
        return False
    return "\nState:\tZ" not in status


def wait_until(cond: Callable[[], Any], timeout: float, what: str, *servers: "ServerProcess",
               interval: float = 0.2) -> None:
    """Poll ``cond`` until it is true. HTTP errors and missing keys count as "not yet".
    Raises ``ServerFailed`` when one of ``servers`` exits, or after ``timeout`` seconds,
    with the last error and the end of each server's log."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        for s in servers:
            if s.exited():
                raise ServerFailed(f"{s.name} exited with {s.returncode} while waiting for {what}\n{s.tail()}")
        try:
            if cond():
                return
        except (httpx.HTTPError, KeyError, StopIteration, ValueError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            logs = "\n".join(f"--- {s.name} log ---\n{s.tail()}" for s in servers)
            raise ServerFailed(f"timed out after {timeout:g} s waiting for {what} (last error: {last!r})\n{logs}")
        time.sleep(interval)


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                interval: float = 0.002) -> None:
    """``wait_until`` inside an event loop: let the loop (and threads) run until ``cond()``
    holds — a wait on a condition, never a guessed sleep (the machine may be busy)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


@asynccontextmanager
async def serve_in_process(settings: Any, load_timeout: float = 300.0,
                           client_timeout: float = 120.0) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The real app of one ``Node`` of ``settings`` (on a 2-core CPU host with 16 GB) in this
    process, its lifespan running: yields an httpx client over ``ASGITransport`` (base URL
    ``http://<node name>``) and the node, once every model assigned here is ready (a model
    that fails to load fails the test with its error)."""
    from distributed.api.app import create_app
    from distributed.domain import HostProfile
    from distributed.service import build

    name = settings.node_name
    profile = HostProfile(hostname=name, cpu_model="test cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000)
    service = build(settings, profile=profile)
    node = service.node
    app = create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{name}",
                                     timeout=client_timeout) as client:
            for t in node.local_targets():
                assert await t.wait_loaded(load_timeout) == "ready", t.error
            yield client, node


@contextmanager
def serve_in_thread(settings: Any, name: str, timeout: float = 60.0) -> Iterator[str]:
    """The real app (``create_app`` over a ``Node`` of ``settings``) served by uvicorn on
    ``settings.host:settings.port`` in a thread of this process; yields its URL once
    ``/health`` answers 200, and stops the server after."""
    import threading

    import uvicorn

    from distributed.api.app import create_app
    from distributed.service import build

    app = create_app(build(settings))
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                          access_log=False))
    thread = threading.Thread(target=server.run, name=f"{name}-node", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout, f"{url} /health 200")
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


def tars(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m distributed ...``) as a user does, without this process's
    ``TARS_*`` settings; COLUMNS keeps rich from folding ids across lines."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run([sys.executable, "-m", "distributed", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


class ServerProcess:
    """One server process (default ``python -m distributed serve``) on ``host``.

    - port: ``port`` (fixed), else the first free one of ``ports``; when the server exits
      because another process bound that port first, ``start`` tries the next free one
      (``retries`` times). A restart keeps the port the last run had.
    - environment: this process's, less every inherited ``TARS_*`` variable (unless
      ``inherit_tars``), plus offline model hubs and ``env``; with ``address_env`` (default:
      for the default command) also ``TARS_NODE_NAME``/``TARS_HOST``/``TARS_PORT`` and
      ``TARS_STATE_DIR`` (``log_dir/state``) — a
      launcher with its own env file gets only what ``env`` says. ``args`` end the command.
    - output: ``log_dir/<name>-<run>.log`` (``self.log``, ``tail()``).
    - stop: SIGTERM to the process group, SIGKILL to what is left after ``grace_s``,
      then the process is reaped; ``kill()`` is SIGKILL at once (a crash, no goodbye).
    """

    def __init__(self, name: str, host: str, *, port: int | None = None, ports: range | None = None,
                 env: Mapping[str, str] | None = None, args: Sequence[str] = (), log_dir: Path | None = None,
                 command: Sequence[str] | None = None, address_env: bool | None = None, inherit_tars: bool = False,
                 taken: set[int] | None = None, retries: int = 4, grace_s: float = 15.0, cwd: Path = ROOT,
                 scheme: str = "http", verify: Any = True) -> None:
        if port is None and ports is None:
            raise ValueError("give a port or a range of ports")
        self.name, self.host, self.port = name, host, port
        self.scheme, self.verify = scheme, verify  # https: ``verify`` is the client's SSLContext (pins)
        self.ports, self.taken, self.retries, self.grace_s, self.cwd = ports, taken, retries, grace_s, cwd
        self.command = list(command or [sys.executable, "-m", "distributed", "serve"]) + list(args)
        self.address_env = command is None if address_env is None else address_env
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix=f"tars-{name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if inherit_tars or not k.startswith("TARS_")}
        base.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        if self.address_env:
            base["TARS_NODE_NAME"] = name
            # its cluster state and known peers beside its logs (a restart keeps them), never in
            # a models folder other tests' nodes of the same name share
            base["TARS_STATE_DIR"] = str(self.log_dir / "state")
        self.env: dict[str, str] = {**base, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path = self.log_dir / f"{name}.log"
        self.runs = 0
        self.started_at = 0.0
        self._group_gone = False

    # ---- where
    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    # ---- lifecycle
    def launch(self) -> "ServerProcess":
        """Start the process and return at once (no waiting; no port retry)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        if self.port is None:
            self.port = self._next_port()
        self.runs += 1
        self.log = self.log_dir / (f"{self.name}.log" if self.runs == 1 else f"{self.name}-{self.runs}.log")
        env = dict(self.env)
        if self.address_env:
            env.update({"TARS_HOST": self.host, "TARS_PORT": str(self.port)})
        self.started_at = time.perf_counter()
        self._group_gone = False
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def start(self, timeout: float = 240.0, ready: Callable[[], Any] | None = None,
              what: str = "/health 200") -> "ServerProcess":
        """Launch and wait until ``ready()`` (default: ``/health`` answers 200). A bind
        failure moves to the next free port of ``ports``; any other exit raises."""
        pinned = self.ports is None or self.runs > 0
        for attempt in range(self.retries + 1):
            self.launch()
            try:
                wait_until(ready or self.healthy, timeout, what, self)
                return self
            except ServerFailed:
                bind_failed = self.exited() and BIND_FAILED in self.log_text().lower()
                if pinned or not bind_failed or attempt == self.retries:
                    self.stop()
                    raise
                self.port = None  # taken between the probe and the bind: the next free one
        raise AssertionError("unreachable")

    def healthy(self) -> bool:
        return httpx.get(self.url + "/health", timeout=2, verify=self.verify).status_code == 200

    def wait_for(self, cond: Callable[[], Any], timeout: float = 60.0, what: str = "the condition") -> None:
        wait_until(cond, timeout, what, self)

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after ``grace_s``; reaps. Idempotent."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole group (what the node started too); reaps."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait()
        self._group_gone = True  # its id may be reused from now on: never signal it again

    def _signal(self, sig: int) -> None:
        if self.proc is None or self._group_gone:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group outlives its leader while children remain
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- output
    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:]) or "(empty log)"

    def _next_port(self) -> int:
        assert self.ports is not None
        for port in _ports_that_bind(self.host, self.ports, self.taken):
            return port
        raise ServerFailed(f"no free port in {self.ports.start}-{self.ports.stop - 1} on {self.host}")
