"""Supervise one child process: start, health, restart with backoff, crash-loop stop, logs.

One abstraction for every child the node runs (llama-server per GGUF chat model, the
ggml RPC worker for pooled VRAM). Everything runs on the node's event loop.

API::

    sup = Supervisor(name, argv, health=probe, env=None, cwd=None,   # argv: a list, or a callable
                     start_timeout_s=120, max_failures=3, stable_s=30,
                     backoff_s=0.5, backoff_max_s=10, stop_timeout_s=5,
                     tail_lines=40, log_level=classify, logger=None, on_state=None)
    await sup.start()                 # spawns; returns at once (idempotent). The monitor task
                                      # then waits for health, restarts after crashes, etc.
    await sup.wait_ready(timeout)     # -> ChildState once READY, FAILED or STOPPED (or timeout)
    await sup.stop()                  # SIGTERM to its process group, SIGKILL after stop_timeout_s
    sup.state: ChildState             # STOPPED → STARTING → READY; RESTARTING between tries; FAILED
    sup.pid, sup.starts, sup.failures, sup.error, sup.tail (last stdout/stderr lines), sup.info()
    sup.generation                    # +1 per spawn: a client can tell that the child was replaced

``argv`` may be a callable returning the command line; it is called before every spawn (a
fresh free port per life, say). ``health`` is ``async () -> bool`` (True = serving); it is
polled every 0.1 s after each spawn until True (→ READY) or ``start_timeout_s`` passes
(→ counted as a failure, child killed). Without ``health`` a child is READY as soon as it is spawned. A child that exits
or never gets healthy counts as a failure; ``max_failures`` failures in a row (a child
that stayed READY for ``stable_s`` resets the count) → FAILED, with ``error`` holding the
exit status and the child's last lines. Between tries it waits ``backoff_s`` doubling up
to ``backoff_max_s`` (state RESTARTING). ``on_state(state)`` is called on every change.

Every stdout/stderr line goes through our logger (``distributed.engine.<name>``) with the
child's name as a field; ``log_level(line) -> int`` picks the level (default: lines that
look like errors at WARNING, the rest at DEBUG — the supervisor's own start/exit/restart
records are at INFO).

The child dies with the node, even on SIGKILL of the node: it is spawned with
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux) in its own process group. Caveat of that
prctl: it fires when the *thread* that forked exits, so spawn from a long-lived loop
thread (the node's main loop) — not from a short-lived helper thread.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import enum
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..logs import fields, get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_ERRORISH = re.compile(r"\b(error|fatal|failed|abort|exception|panic)\b|^E ", re.IGNORECASE)


class ChildState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"


def default_level(line: str) -> int:
    return logging.WARNING if _ERRORISH.search(line) else logging.DEBUG


async def _drain(pumps: Sequence[asyncio.Future[Any]]) -> None:
    """Let the log pumps read what the child wrote last (not forever: a grandchild may
    still hold the pipes)."""
    await asyncio.wait(pumps, timeout=2.0)


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: SIGKILL this child when the forking thread dies; bail if it already has."""

    def setup() -> None:
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            except OSError:
                pass
        if os.getppid() != parent:  # the parent died between fork and prctl
            os._exit(1)

    return setup


class Supervisor:
    def __init__(self, name: str, argv: Sequence[str] | Callable[[], Sequence[str]], *, health: Callable[[], Awaitable[bool]] | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None, start_timeout_s: float = 120.0,
                 max_failures: int = 3, stable_s: float = 30.0, backoff_s: float = 0.5, backoff_max_s: float = 10.0,
                 stop_timeout_s: float = 5.0, tail_lines: int = 40, log_level: Callable[[str], int] = default_level,
                 logger: logging.Logger | None = None, on_state: Callable[[ChildState], None] | None = None) -> None:
        self.name = name
        self._argv = argv
        self.argv: list[str] = [] if callable(argv) else [str(a) for a in argv]  # the last spawned
        self.health = health
        self.env = env
        self.cwd = cwd
        self.start_timeout_s = start_timeout_s
        self.max_failures = max(1, max_failures)
        self.stable_s = stable_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stop_timeout_s = stop_timeout_s
        self.log_level = log_level
        self.child_log = logger or get_logger(f"distributed.engine.{name}")
        self.on_state = on_state
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.state = ChildState.STOPPED
        self.error: str | None = None
        self.pid: int | None = None
        self.starts = 0
        self.failures = 0  # in a row
        self.generation = 0
        self.ready_at: float | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._changed = asyncio.Event()

    # ----------------------------------------------------------------- public
    async def start(self) -> None:
        """Spawn the child and supervise it in the background; idempotent."""
        if self._task is not None and not self._task.done():
            return
        self._stopping = False
        self.failures = 0
        self.error = None
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"supervise-{self.name}")

    async def wait_ready(self, timeout: float | None = None) -> ChildState:
        """Wait until the child is READY, FAILED or STOPPED; returns the state (the
        current one on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.state not in (ChildState.READY, ChildState.FAILED, ChildState.STOPPED) or (
                self.state is ChildState.STOPPED and self._task is not None and not self._task.done()):
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), None if left is None else min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        return self.state

    async def stop(self) -> None:
        """Stop supervising and end the child (SIGTERM, then SIGKILL after stop_timeout_s)."""
        self._stopping = True
        task, self._task = self._task, None
        await self._kill()
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping anyway
                pass
        self._set(ChildState.STOPPED)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state.value, "pid": self.pid,
                               "starts": self.starts, "failures": self.failures}
        if self.error:
            out["error"] = self.error
        return out

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    # ----------------------------------------------------------------- internals
    def _set(self, state: ChildState) -> None:
        if state is self.state:
            return
        self.state = state
        self._changed.set()
        self._changed = asyncio.Event()
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:  # noqa: BLE001 - a callback must not break supervision
                log.exception("on_state callback of %s failed", self.name)

    async def _run(self) -> None:
        delay = self.backoff_s
        while not self._stopping:
            self._set(ChildState.STARTING)
            why = await self._one_life()
            if self._stopping:
                break
            stable = self.ready_at is not None and time.monotonic() - self.ready_at >= self.stable_s
            if stable:
                self.failures = 0
                delay = self.backoff_s
            self.failures += 1
            tail = "\n".join(self.tail)
            self.error = why + (f"; last lines:\n{tail}" if tail else "")
            if self.failures >= self.max_failures:
                log.error("%s failed %d times in a row; giving up: %s", self.name, self.failures, why,
                          extra=fields(child=self.name))
                self._set(ChildState.FAILED)
                return
            log.warning("%s %s; restarting in %.1f s (failure %d of %d)", self.name, why, delay, self.failures,
                        self.max_failures, extra=fields(child=self.name))
            self._set(ChildState.RESTARTING)
            await asyncio.sleep(delay)
            delay = min(self.backoff_max_s, delay * 2)

    async def _one_life(self) -> str:
        """Spawn, wait for health, wait for exit. Returns why this life ended."""
        self.ready_at = None
        try:
            self.argv = [str(a) for a in (self._argv() if callable(self._argv) else self._argv)]
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=self.env, cwd=self.cwd, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()), limit=1 << 20)
        except Exception as exc:  # noqa: BLE001 - no binary, bad argv: a failed try like a crash
            self.tail.append(f"{type(exc).__name__}: {exc}")
            return f"could not start {self.argv[0] if self.argv else self.name}: {exc}"
        self._proc = proc
        self.pid = proc.pid
        self.starts += 1
        self.generation += 1
        t0 = time.monotonic()
        log.info("%s started (pid %d)", self.name, proc.pid, extra=fields(child=self.name, pid=proc.pid))
        pumps = [asyncio.ensure_future(self._pump(s, n)) for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
        exited = asyncio.ensure_future(proc.wait())
        try:
            if self.health is not None:
                healthy = await self._wait_healthy(exited)
                if not healthy:
                    if exited.done():
                        await _drain(pumps)
                        return f"exited with status {proc.returncode} before it was healthy"
                    await self._kill()
                    await _drain(pumps)
                    return f"was not healthy within {self.start_timeout_s:g} s"
            self.ready_at = time.monotonic()
            log.info("%s ready in %.1f s", self.name, self.ready_at - t0, extra=fields(child=self.name, pid=proc.pid))
            self._set(ChildState.READY)
            code = await exited
            await _drain(pumps)
            return f"exited with status {code}" + (f" (signal {-code})" if code is not None and code < 0 else "")
        finally:
            if not exited.done():
                exited.cancel()
            for p in pumps:
                if not p.done():
                    p.cancel()

    async def _wait_healthy(self, exited: asyncio.Future[Any]) -> bool:
        assert self.health is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and not exited.done():
            try:
                if await self.health():
                    return True
            except Exception:  # noqa: BLE001 - not up yet
                pass
            await asyncio.wait([exited], timeout=0.1)
        return False

    async def _pump(self, stream: asyncio.StreamReader | None, which: str) -> None:
        if stream is None:
            return
        logger = self.child_log
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: take what is there
                raw = await stream.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self.tail.append(line)
            level = self.log_level(line)
            if logger.isEnabledFor(level):
                logger.log(level, line, extra=fields(child=self.name, stream=which))

    async def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.1f s; killing it", self.name, self.stop_timeout_s,
                        extra=fields(child=self.name))
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()

