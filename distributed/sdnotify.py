"""sd_notify: the node tells systemd (``Type=notify``) how it is doing. No dependency.

The protocol (systemd's ``sd_notify(3)``): newline-separated ``KEY=VALUE`` lines in one
datagram to the unix socket named by ``$NOTIFY_SOCKET`` — a path, or an abstract socket
written with a leading ``@``. Outside systemd the variable is unset and every call here
does nothing.

What the node says, and when (``Lifecycle``, a task on the node's event loop):

* ``STATUS=...`` while it starts: which models load, a pull's progress; later what it
  serves, or which model failed (``systemctl status`` shows the last one);
* ``EXTEND_TIMEOUT_USEC`` while a model is still loading or pulling, so a first start
  that pulls gigabytes is not killed by ``TimeoutStartSec`` — and a start that stopped
  making progress (every model failed, or the loop is wedged) still is;
* ``READY=1`` once, when ``/health`` would answer 200 (``node.health()``: every model
  assigned to this host is ready);
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, from the event loop itself: a loop that is
  wedged (a blocking call, a deadlock) sends nothing, and systemd restarts the node
  (``WatchdogSec=`` in the unit; ``$WATCHDOG_PID`` names the process it is for);
* ``STOPPING=1`` on the way down.

``Lifecycle.from_environ(node)`` reads the three variables and removes them from the
environment, so the engine and worker processes the node starts do not inherit them
(systemd would refuse their datagrams anyway: ``NotifyAccess=main``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Protocol

from .logs import get_logger

log = get_logger(__name__)

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
EXTEND_S = 60.0  # a loading node promises its next word within this (EXTEND_TIMEOUT_USEC)
STATUS_MAX = 400  # characters of one STATUS line (systemctl status shows one line)


class Notifier:
    """Datagrams to ``$NOTIFY_SOCKET`` (``address``; None = not under systemd: no-op)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True) -> "Notifier":
        """From ``NOTIFY_SOCKET``/``WATCHDOG_USEC``/``WATCHDOG_PID`` (removed when ``unset``).
        A watchdog meant for another process (``WATCHDOG_PID`` not ours) is ignored."""
        env: MutableMapping[str, str] = os.environ if environ is None else environ
        values: Mapping[str, str] = {k: env.get(k, "") for k in ENV_VARS}
        if unset:
            for key in ENV_VARS:
                env.pop(key, None)
        usec: int | None = None
        try:
            usec = int(values["WATCHDOG_USEC"]) if values["WATCHDOG_USEC"] else None
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", values["WATCHDOG_USEC"])
        pid = values["WATCHDOG_PID"]
        if usec and pid and pid != str(os.getpid()):
            usec = None  # the watchdog is another process's
        return cls(values["NOTIFY_SOCKET"], usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the watchdog timeout (None: no watchdog)."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):  # abstract namespace: a leading NUL byte, no file
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *lines: str) -> bool:
        """Send ``lines`` (``"READY=1"``, ``"STATUS=..."``) in one datagram. Never raises:
        the service manager going away must not take the node with it (logged once)."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:  # non-blocking: a full queue at the manager must not wedge the loop
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(payload, self._target())
            return True
        except BlockingIOError:
            return False  # the manager's queue is full: the caller sends again on its next round
        except OSError as exc:
            if not self._warned:
                log.warning("could not notify the service manager at %s: %s", self.address, exc)
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class HealthSource(Protocol):
    """What the lifecycle reads of the node (``Node`` has both)."""

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def models(self) -> list[dict[str, Any]]: ...


WAITING_FOR_PLAN = "starting: waiting for the cluster's first plan (the peers' answers, or a few seconds)"


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= STATUS_MAX else text[: STATUS_MAX - 1] + "…"


def status_line(ok: bool, health: Mapping[str, Any], models: list[dict[str, Any]]) -> str:
    """The ``STATUS=`` text for a node's health body and model infos (pure)."""
    local = {m.get("id"): m for m in models if m.get("local")}
    if ok:
        remote = sorted(str(m.get("id")) for m in models if not m.get("local"))
        text = f"serving {len(local)} model(s) here"
        if local:
            text += ": " + ", ".join(sorted(str(k) for k in local))
        if remote:
            text += f"; {len(remote)} on peers"
        return _one_line(text)
    loading = list(health.get("loading") or [])
    failed = dict(health.get("failed") or {})
    parts: list[str] = []
    for model in loading:
        info = local.get(model) or {}
        progress = info.get("progress") if info.get("state") == "pulling" else None
        if isinstance(progress, dict):
            done, total = progress.get("done_bytes") or 0, progress.get("total_bytes") or 0
            size = f" ({done / 1e9:.2f} of {total / 1e9:.2f} GB)" if total else ""
            parts.append(f"{model} pulling {float(progress.get('percent') or 0):.0f}%{size}")
        else:
            parts.append(f"{model} loading")
    states = health.get("models") or {}
    ready = sum(1 for s in states.values() if s == "ready")
    head = f"starting: {ready} of {len(states)} model(s) ready"
    if parts:
        head += "; " + ", ".join(parts)
    if failed:
        head += "; failed: " + "; ".join(f"{m}: {why}" for m, why in failed.items())
    return _one_line(head)


class Lifecycle:
    """READY / STATUS / EXTEND_TIMEOUT / WATCHDOG / STOPPING for one node, run as one task
    on the node's event loop. In the app's lifespan: ``start()`` before the node starts
    (STATUS and pings while it profiles and plans), ``started()`` once it has (from then on
    READY as soon as ``/health`` would answer 200 and the socket accepts: ``listen`` is
    the (host, port) the server binds), ``stop()`` on the way down."""

    def __init__(self, notifier: Notifier, node: HealthSource, *, listen: tuple[str, int] | None = None,
                 poll_s: float = 0.25, settled_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.notifier = notifier
        self.node = node
        self.listen = listen
        self.poll_s = poll_s  # how often health is read until READY
        self.settled_s = settled_s  # ... and after it (STATUS changes)
        self.clock = clock
        self.ready = False
        self._node_started = False
        self._planned: Callable[[], bool] = lambda: True
        self._status = ""
        self._extended_at = -1e18
        self._pinged_at = -1e18
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_environ(cls, node: HealthSource, settings: Any = None, **kw: Any) -> "Lifecycle":
        """From the process environment (see ``Notifier.from_environ``); ``settings`` gives
        the address the server listens on."""
        if settings is not None and "listen" not in kw:
            kw["listen"] = (settings.host, settings.port)
        return cls(Notifier.from_environ(), node, **kw)

    async def start(self, status: str = "starting: profiling the hardware and planning") -> None:
        if not self.notifier.enabled or self._task is not None:
            return
        self._status = _one_line(status)
        lines = [f"STATUS={self._status}"]
        if self.notifier.watchdog_interval_s is not None:
            lines.append("WATCHDOG=1")
            self._pinged_at = self.clock()
        self.notifier.send(*lines)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sdnotify")

    def started(self, planned: Callable[[], bool] | None = None) -> None:
        """The node has started (loading in the background): READY may follow, once
        ``planned()`` (a node with peers waits for the cluster's first plan: until then it
        would report "serving 0 models")."""
        self._node_started = True
        if planned is not None:
            self._planned = planned

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.notifier.enabled:
            self.notifier.send("STOPPING=1", "STATUS=stopping: unloading models, leaving the cluster")
        self.notifier.close()

    def _watchdog_due(self, lines: list[str]) -> None:
        wd = self.notifier.watchdog_interval_s
        now = self.clock()
        if wd is not None and now - self._pinged_at >= wd * 0.95:
            lines.append("WATCHDOG=1")
            self._pinged_at = now

    async def _accepting(self) -> bool:
        """The server's socket takes connections (uvicorn binds it after the lifespan)."""
        if self.listen is None:
            return True
        host, port = self.listen
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout=1.0)
        except (OSError, asyncio.TimeoutError):
            return False
        writer.close()
        return True

    async def tick(self) -> float:
        """One round: read health, send what changed, ping the watchdog when due. Returns
        the seconds until the next round is needed."""
        lines: list[str] = []
        try:
            ok, body = self.node.health()
            planned = self._node_started and self._planned()
            if planned:
                status = status_line(ok, body, self.node.models())
            elif self._node_started:
                status = WAITING_FOR_PLAN
            else:
                status = self._status
            if status != self._status:
                lines.append(f"STATUS={status}")
                self._status = status
            if not self.ready and planned:
                if ok and await self._accepting():
                    lines.insert(0, "READY=1")
                    self.ready = True
                    log.info("ready: told the service manager (%s)", status)
                elif body.get("loading") and self.clock() - self._extended_at >= EXTEND_S / 3:
                    lines.append(f"EXTEND_TIMEOUT_USEC={int(EXTEND_S * 1e6)}")  # still making progress
                    self._extended_at = self.clock()
        finally:  # a broken health read still pings: only a wedged loop must stop the pings
            self._watchdog_due(lines)
            if lines and not self.notifier.send(*lines) and "READY=1" in lines:
                self.ready = False  # not delivered: READY again next round
        wait = self.settled_s if self.ready else self.poll_s
        wd = self.notifier.watchdog_interval_s
        if wd is not None:
            wait = min(wait, max(0.0, self._pinged_at + wd - self.clock()))
        return wait

    async def _run(self) -> None:
        while True:
            try:
                wait = await self.tick()
            except Exception as exc:  # noqa: BLE001 - keep going; a broken health read is logged
                log.warning("service manager status failed: %s", exc)
                wait = self.poll_s
            await asyncio.sleep(wait)
