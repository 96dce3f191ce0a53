"""Supervisor with tiny Python children: health, logs, restart, crash loop, stop, die with parent."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distributed.engine.supervisor import ChildState, Supervisor

pytestmark = pytest.mark.anyio


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _file_health(path: Path):
    async def probe() -> bool:
        return path.exists()
    return probe


async def test_ready_after_health_logs_go_through_our_logger_and_stop_ends_it(tmp_path, caplog):
    marker = tmp_path / "up"
    sup = Supervisor("kid", _child(f"""
        import sys, time, pathlib
        print("hello from the child", flush=True)
        print("E something error-like", file=sys.stderr, flush=True)
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(60)
    """), health=_file_health(marker), start_timeout_s=20)
    with caplog.at_level(logging.DEBUG, logger="distributed.engine.kid"):
        await sup.start()
        assert await sup.wait_ready(20) is ChildState.READY
        pid = sup.pid
        assert pid and _alive(pid)
        for _ in range(50):
            if len(sup.tail) >= 2:
                break
            await asyncio.sleep(0.05)
    assert "hello from the child" in sup.tail
    recs = [r for r in caplog.records if r.name == "distributed.engine.kid"]
    hello = next(r for r in recs if r.getMessage() == "hello from the child")
    assert hello.levelno == logging.DEBUG and hello.fields["child"] == "kid"
    err = next(r for r in recs if "error-like" in r.getMessage())
    assert err.levelno == logging.WARNING and err.fields["stream"] == "stderr"
    await sup.stop()
    assert sup.state is ChildState.STOPPED
    assert not _alive(pid)


async def test_a_crash_is_restarted_and_the_generation_moves_on(tmp_path):
    marker = tmp_path / "up"
    count = tmp_path / "count"
    # first life: healthy then exits 3; later lives: stay up
    sup = Supervisor("crashy", _child(f"""
        import pathlib, time, sys
        c = pathlib.Path({str(count)!r}); n = int(c.read_text()) if c.exists() else 0; c.write_text(str(n + 1))
        pathlib.Path({str(marker)!r}).touch()
        if n == 0:
            time.sleep(0.3); sys.exit(3)
        time.sleep(60)
    """), health=_file_health(marker), backoff_s=0.05)
    states: list[ChildState] = []
    sup.on_state = states.append
    try:
        await sup.start()
        assert await sup.wait_ready(20) is ChildState.READY
        first = sup.generation
        for _ in range(200):
            if sup.generation > first and sup.state is ChildState.READY:
                break
            await asyncio.sleep(0.05)
        assert sup.generation == first + 1 and sup.state is ChildState.READY
        assert ChildState.RESTARTING in states
        assert "exited with status 3" in (sup.error or "")
        assert sup.starts == 2
    finally:
        await sup.stop()


async def test_a_crash_loop_ends_failed_with_the_childs_last_lines():
    sup = Supervisor("loop", _child("""
        import sys
        print("fatal: cannot open model file", file=sys.stderr)
        sys.exit(1)
    """), health=lambda: asyncio.sleep(0, False), max_failures=3, backoff_s=0.01)
    try:
        await sup.start()
        assert await sup.wait_ready(30) is ChildState.FAILED
        assert sup.starts == 3 and sup.failures == 3
        assert "cannot open model file" in sup.error and "status 1" in sup.error
        assert sup.info()["state"] == "failed"
    finally:
        await sup.stop()


async def test_never_healthy_counts_as_a_failure_and_the_child_is_killed():
    sup = Supervisor("slow", _child("import time; time.sleep(60)"), health=lambda: asyncio.sleep(0, False),
                     start_timeout_s=0.5, max_failures=1)
    await sup.start()
    pid = None
    for _ in range(100):
        pid = sup.pid
        if pid:
            break
        await asyncio.sleep(0.02)
    assert await sup.wait_ready(20) is ChildState.FAILED
    assert "not healthy within 0.5 s" in sup.error
    assert pid and not _alive(pid)
    await sup.stop()


async def test_a_missing_binary_fails_with_the_reason():
    sup = Supervisor("nobin", ["/nonexistent/llama-server"], max_failures=2, backoff_s=0.01)
    await sup.start()
    assert await sup.wait_ready(10) is ChildState.FAILED
    assert "could not start /nonexistent/llama-server" in sup.error
    await sup.stop()


async def test_stop_kills_a_child_that_ignores_sigterm():
    sup = Supervisor("stubborn", _child("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring", flush=True)
        time.sleep(60)
    """), stop_timeout_s=0.5)
    await sup.start()
    assert await sup.wait_ready(10) is ChildState.READY
    for _ in range(100):
        if "ignoring" in sup.tail:
            break
        await asyncio.sleep(0.05)
    pid = sup.pid
    t0 = time.monotonic()
    await sup.stop()
    assert time.monotonic() - t0 < 5
    assert not _alive(pid)


def test_the_child_dies_with_its_parent_even_on_sigkill(tmp_path):
    """A parent process supervises a sleeper; SIGKILL the parent; the sleeper goes too."""
    pidfile = tmp_path / "child.pid"
    parent_code = textwrap.dedent(f"""
        import asyncio, sys, pathlib
        from distributed.engine.supervisor import Supervisor
        async def main():
            sup = Supervisor("orphan-test", [sys.executable, "-c", "import time; time.sleep(120)"])
            await sup.start()
            await sup.wait_ready(10)
            pathlib.Path({str(pidfile)!r}).write_text(str(sup.pid))
            await asyncio.sleep(120)
        asyncio.run(main())
    """)
    root = Path(__file__).resolve().parents[3]
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                break
            time.sleep(0.05)
        child = int(pidfile.read_text())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        for _ in range(100):
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child), "the supervised child outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


async def test_argv_can_be_a_callable_asked_before_every_spawn(tmp_path):
    calls: list[int] = []

    def argv() -> list[str]:
        calls.append(1)
        return [sys.executable, "-c", f"import sys; print('life {len(calls)}'); sys.exit({0 if len(calls) > 1 else 5})"]

    sup = Supervisor("calls", argv, max_failures=3, backoff_s=0.01)
    try:
        await sup.start()
        for _ in range(200):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.02)
        assert len(calls) >= 2 and sup.argv[-1].startswith("import sys")
    finally:
        await sup.stop()
