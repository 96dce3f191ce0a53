"""distributed/sdnotify.py against a real unix datagram socket (as systemd's NOTIFY_SOCKET is).

The node side is a small stand-in with a scripted health; the real node under a real
``python -m distributed serve`` is in tests/e2e/test_sdnotify_serve.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distributed.sdnotify import EXTEND_S, WAITING_FOR_PLAN, Lifecycle, Notifier, status_line


class Listener:
    """A bound AF_UNIX/SOCK_DGRAM socket read by a thread, as systemd reads its notify
    socket; ``messages()`` are (arrival time, {key: value})."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), dict(line.split("=", 1) for line in data.decode().split("\n"))))

    def messages(self) -> list[tuple[float, dict[str, str]]]:
        time.sleep(0.06)  # what is in flight arrives
        return list(self.got)

    def keys(self) -> list[str]:
        return [k for _, m in self.messages() for k in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    address = str(tmp_path / "notify.sock") if request.param == "path" else f"@tars-test-{uuid.uuid4().hex}"
    lst = Listener(address)
    yield lst
    lst.close()


def test_a_datagram_reaches_the_socket_by_path_and_by_abstract_name(listener: Listener) -> None:
    n = Notifier(listener.address)
    assert n.enabled and n.send("READY=1", "STATUS=hello world")
    assert listener.messages()[-1][1] == {"READY": "1", "STATUS": "hello world"}
    n.close()


def test_without_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled and not n.send("READY=1") and n.watchdog_interval_s is None


def test_a_vanished_socket_is_logged_once_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "gone.sock"))
    assert not n.send("WATCHDOG=1") and not n.send("WATCHDOG=1")
    assert sum("could not notify the service manager" in r.message for r in caplog.records) == 1


def test_from_environ_reads_and_unsets_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "1"}
    n = Notifier.from_environ(env)
    assert n.address == "@x" and n.watchdog_interval_s == 1.5
    assert env == {"OTHER": "1"}  # the engine children must not inherit them
    kept = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000"}
    assert Notifier.from_environ(kept, unset=False).watchdog_interval_s == 1.5 and "NOTIFY_SOCKET" in kept


def test_a_watchdog_of_another_process_or_a_bad_value_is_ignored() -> None:
    other = Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_interval_s is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"}).watchdog_interval_s is None


def test_status_lines_say_what_loads_pulls_fails_and_serves() -> None:
    health = {"status": "loading", "models": {"a": "loading", "b": "ready", "c": "loading"}, "loading": ["a", "c"]}
    models = [{"id": "a", "local": True, "state": "pulling",
               "progress": {"done_bytes": 1_200_000_000, "total_bytes": 2_400_000_000, "percent": 50.0}},
              {"id": "b", "local": True, "state": "ready"}, {"id": "c", "local": True, "state": "loading"}]
    line = status_line(False, health, models)
    assert line == "starting: 1 of 3 model(s) ready; a pulling 50% (1.20 of 2.40 GB), c loading"
    failed = {"status": "failed", "models": {"a": "failed"}, "failed": {"a": "out of memory\nat line 3"}}
    assert status_line(False, failed, [{"id": "a", "local": True}]) == \
        "starting: 0 of 1 model(s) ready; failed: a: out of memory at line 3"
    ok = {"status": "ok", "models": {"b": "ready"}}
    assert status_line(True, ok, [{"id": "b", "local": True}, {"id": "x", "local": False}]) == \
        "serving 1 model(s) here: b; 1 on peers"
    assert len(status_line(False, {"failed": {"m": "x" * 5000}}, [])) <= 400


class ScriptedNode:
    def __init__(self) -> None:
        self.ok = False
        self.body: dict[str, Any] = {"status": "loading", "models": {"m": "loading"}, "loading": ["m"]}
        self.reads = 0

    def health(self) -> tuple[bool, dict[str, Any]]:
        self.reads += 1
        return self.ok, self.body

    def models(self) -> list[dict[str, Any]]:
        return [{"id": "m", "local": True, "state": "ready" if self.ok else "loading"}]

    def become_ready(self) -> None:
        self.ok = True
        self.body = {"status": "ok", "models": {"m": "ready"}}


async def _until(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_ready_only_after_start_and_health_then_stopping(listener: Listener) -> None:
    node = ScriptedNode()

    async def main() -> None:
        life = Lifecycle(Notifier(listener.address), node, poll_s=0.02)
        await life.start()
        await _until(lambda: node.reads >= 5)
        assert "READY" not in listener.keys()  # not started yet (profiling, planning)
        node.become_ready()  # healthy, but the node has not said it started: still no READY
        await asyncio.sleep(0.2)
        assert "READY" not in listener.keys()
        node.ok, node.body = False, {"status": "loading", "models": {"m": "loading"}, "loading": ["m"]}
        life.started()
        await _until(lambda: "EXTEND_TIMEOUT_USEC" in listener.keys())
        assert "READY" not in listener.keys()
        node.become_ready()
        await _until(lambda: "READY" in listener.keys())
        await asyncio.sleep(0.2)
        await life.stop()

    asyncio.run(main())
    msgs = [m for _, m in listener.messages()]
    keys = [k for m in msgs for k in m]
    assert keys.count("READY") == 1
    ready = next(m for m in msgs if "READY" in m)
    assert ready["STATUS"] == "serving 1 model(s) here: m"  # READY and its status in one datagram
    assert msgs[0]["STATUS"].startswith("starting: profiling")
    assert any(m.get("STATUS", "").startswith("starting: 0 of 1 model(s) ready; m loading") for m in msgs)
    assert next(m for m in msgs if "EXTEND_TIMEOUT_USEC" in m)["EXTEND_TIMEOUT_USEC"] == str(int(EXTEND_S * 1e6))
    assert msgs[-1]["STOPPING"] == "1" and keys.index("STOPPING") > keys.index("READY")
    assert "WATCHDOG" not in keys  # no WATCHDOG_USEC: no pings


class Accepting:
    def __init__(self) -> None:
        self.ok = True
        self.body = {"status": "ok", "models": {}}

    def health(self) -> tuple[bool, dict[str, Any]]:
        return self.ok, self.body

    def models(self) -> list[dict[str, Any]]:
        return []


def test_ready_waits_for_the_listening_socket(listener: Listener) -> None:
    async def main() -> None:
        probe = socket.socket()
        probe.bind(("127.0.0.4", 0))
        port = probe.getsockname()[1]
        life = Lifecycle(Notifier(listener.address), Accepting(), listen=("127.0.0.4", port), poll_s=0.02)
        await life.start()
        life.started()
        await asyncio.sleep(0.3)
        assert "READY" not in listener.keys()  # healthy, but nothing accepts on the port yet
        probe.listen(4)
        await _until(lambda: "READY" in listener.keys())
        await life.stop()
        probe.close()

    asyncio.run(main())


def test_watchdog_pings_come_from_the_event_loop_every_half_interval(listener: Listener) -> None:
    """A loop that is blocked sends no ping: systemd then restarts the node."""

    async def main() -> tuple[float, float]:
        life = Lifecycle(Notifier(listener.address, watchdog_usec=200_000), Accepting(), poll_s=0.05, settled_s=5)
        await life.start()
        life.started()
        await asyncio.sleep(1.0)
        blocked_at = time.monotonic()
        time.sleep(0.6)  # the loop is wedged: nothing may be sent meanwhile
        blocked_until = time.monotonic()
        await asyncio.sleep(0.5)
        await life.stop()
        return blocked_at, blocked_until

    blocked_at, blocked_until = asyncio.run(main())
    pings = [t for t, m in listener.messages() if m.get("WATCHDOG") == "1"]
    assert not [t for t in pings if blocked_at + 0.05 < t < blocked_until]
    before = [t for t in pings if t < blocked_at]
    gaps = [b - a for a, b in zip(before, before[1:])]
    assert len(before) >= 5, pings  # ~every 0.1 s for 1 s
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.1, abs=0.05)
    assert any(t > blocked_until for t in pings)  # the loop runs again: the pings resume


def test_a_failing_health_read_still_pings(listener: Listener) -> None:
    class Broken(Accepting):
        def health(self) -> tuple[bool, dict[str, Any]]:
            raise RuntimeError("boom")

    async def main() -> None:
        life = Lifecycle(Notifier(listener.address, watchdog_usec=100_000), Broken(), poll_s=0.02)
        await life.start()
        life.started()
        await asyncio.sleep(0.5)
        await life.stop()

    asyncio.run(main())
    assert listener.keys().count("WATCHDOG") >= 4 and "READY" not in listener.keys()


def test_a_full_manager_queue_never_blocks_the_loop_and_ready_is_sent_again(tmp_path: Path) -> None:
    """Unix datagram queues hold few messages (net.unix.max_dgram_qlen): a manager that reads
    slowly must cost dropped pings, never a blocked loop, and READY must still arrive."""
    address = str(tmp_path / "slow.sock")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    slow.bind(address)
    n = Notifier(address)
    t0 = time.monotonic()
    sent = [n.send("WATCHDOG=1") for _ in range(5000)]
    assert time.monotonic() - t0 < 5 and not all(sent)  # some were refused at once, none blocked

    async def main() -> None:
        life = Lifecycle(n, Accepting(), poll_s=0.02)
        await life.start()
        life.started()
        await asyncio.sleep(0.2)
        assert not life.ready  # the queue is still full: READY could not go out
        slow.setblocking(False)
        while True:
            try:
                slow.recv(65536)
            except BlockingIOError:
                break
        await _until(lambda: life.ready)
        await life.stop()

    asyncio.run(main())
    slow.settimeout(1)
    got = []
    while True:
        try:
            got.append(slow.recv(65536).decode())
        except (TimeoutError, socket.timeout, BlockingIOError):
            break
    assert any("READY=1" in g for g in got)
    slow.close()


def test_a_node_waiting_for_the_clusters_first_plan_is_not_ready(listener: Listener) -> None:
    node = Accepting()  # healthy with no model: what a node with peers reports before the first plan
    plan = {"applied": False}

    async def main() -> None:
        life = Lifecycle(Notifier(listener.address), node, poll_s=0.02)
        await life.start()
        life.started(planned=lambda: plan["applied"])
        await _until(lambda: any(m.get("STATUS") == WAITING_FOR_PLAN for _, m in listener.messages()))
        await asyncio.sleep(0.2)
        assert "READY" not in listener.keys()
        plan["applied"] = True
        await _until(lambda: "READY" in listener.keys())
        await life.stop()

    asyncio.run(main())
    ready = next(m for _, m in listener.messages() if "READY" in m)
    assert ready["STATUS"] == "serving 0 model(s) here"  # planned: this host serves nothing, and says so
