"""A real ``python -m distributed serve`` speaking sd_notify to a real unix datagram socket.

The test plays systemd's part: it binds the socket named by NOTIFY_SOCKET, sets
WATCHDOG_USEC, and reads what the node sends while it loads the embedded models (real
ones: Gemma 270M GGUF and MiniLM), serves, and stops on SIGTERM. Meanwhile it polls
/health, so "READY=1 only once /health answers 200" is checked against the node's own
answers. What is not covered here is a real systemd reading the socket (see
tests/e2e/test_service_unit.py and the report).
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess
from tests.unit.test_sdnotify import Listener

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.4"
PORTS = range(19240, 19260)
WATCHDOG_USEC = 2_000_000  # pings every second
MODELS = "gemma-3-270m,all-MiniLM-L6-v2"


class Manager(Listener):
    """The service manager's side of NOTIFY_SOCKET: every datagram with its arrival time."""

    def first(self, key: str) -> float | None:
        return next((t for t, m in list(self.got) if key in m), None)


class HealthPoller(threading.Thread):
    """GET /health every 50 ms: (sent, answered, status)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[float, float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self.done.is_set():
                sent = time.monotonic()
                try:
                    status = client.get(self.url + "/health").status_code
                except httpx.HTTPError:
                    status = 0  # not listening yet
                self.seen.append((sent, time.monotonic(), status))
                time.sleep(0.05)


def test_the_node_tells_its_service_manager_status_ready_watchdog_and_stopping(gemma_gguf, models_dir: Path,
                                                                              tmp_path: Path) -> None:
    manager = Manager(str(tmp_path / "notify.sock"))
    node = ServerProcess("sdn", HOST, ports=PORTS, log_dir=tmp_path, grace_s=30,
                         env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC),
                              "TARS_MODELS": MODELS, "TARS_CONTEXT": "1024"},
                         args=["--models-dir", str(models_dir)])
    poller: HealthPoller | None = None
    try:
        with node:
            node.launch()
            poller = HealthPoller(node.url)
            poller.start()
            node.wait_for(lambda: manager.first("READY") is not None, timeout=240, what="READY=1")
            node.wait_for(lambda: sum(1 for _, m in manager.got if "WATCHDOG" in m) >= 8, timeout=60,
                          what="eight watchdog pings")
            poller.done.set()
            poller.join()
            ready_at = manager.first("READY")
            assert ready_at is not None
            stop_sent = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            node.proc.wait(60)
            # uvicorn ends a graceful shutdown by re-raising the signal: systemd counts SIGTERM as a clean exit
            assert node.returncode in (0, -signal.SIGTERM), node.tail()
            time.sleep(0.3)  # the manager thread reads what is still queued
    finally:
        if poller is not None:
            poller.done.set()
        manager.close()

    msgs = [m for _, m in manager.got]
    keys = [k for m in msgs for k in m]
    assert keys.count("READY") == 1, msgs
    # STATUS lines while it started: first the profiling, then the models loading
    statuses = [m["STATUS"] for m in msgs if "STATUS" in m]
    assert statuses[0].startswith("starting: profiling")
    loading = [s for s in statuses if s.startswith("starting:") and "loading" in s]
    assert loading, statuses
    ready_msg = next(m for m in msgs if "READY" in m)
    assert ready_msg["STATUS"].startswith("serving 2 model(s) here")
    assert "gemma-3-270m" in ready_msg["STATUS"] and "all-MiniLM-L6-v2" in ready_msg["STATUS"]

    # READY only once /health answers 200: no poll answered with 503 after READY, and one
    # sent after READY arrived answers 200; before it, /health said 503 (loading)
    assert poller is not None
    after = [(s, st) for s, a, st in poller.seen if s > ready_at]
    assert after and all(st == 200 for _, st in after), after[:5]
    assert any(st == 503 and a < ready_at for _, a, st in poller.seen)
    first_200 = min(a for _, a, st in poller.seen if st == 200)
    assert ready_at - first_200 < 2.0  # READY follows health within a few polls of the loop

    # WATCHDOG=1 every half WATCHDOG_USEC, also while the models loaded; never a gap that
    # would have let the watchdog expire
    pings = [t for t, m in manager.got if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert pings[0] < ready_at  # from the start, not only once ready
    assert statistics.median(gaps) == pytest.approx(WATCHDOG_USEC / 2e6, abs=0.25), gaps
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps

    # STOPPING=1 on the way down, after the signal, as the last word
    stopping = manager.first("STOPPING")
    assert stopping is not None and stopping > stop_sent
    assert "STOPPING" in msgs[-1] and msgs[-1]["STATUS"].startswith("stopping")
    # the node's children (llama-server) were not handed the socket
    assert "could not notify" not in node.log_text()
