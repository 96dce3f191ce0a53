"""tests/support.ServerProcess with a stand-in server: port retry on a bind failure, /health
wait, and stop() leaving no process behind (its children included)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.support import ServerFailed, ServerProcess, alive

HOST = "127.0.0.2"
PORTS = range(18690, 18700)  # this file's share of 18600-18699

# Binds TARS_HOST:TARS_PORT and answers /health 200 after starting a child that would live
# for 10 minutes; with FAIL_BIND_ONCE it first fails the way uvicorn does when the port is taken.
STANDIN = r"""
import http.server, os, subprocess, sys
once = os.environ.get("FAIL_BIND_ONCE")
if once and not os.path.exists(once):
    open(once, "w").close()
    print("ERROR: [Errno 98] error while attempting to bind on address: address already in use", flush=True)
    sys.exit(1)
if os.environ.get("CRASH"):
    print("boom: bad settings", flush=True)
    sys.exit(2)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["CHILD_PID_FILE"], "w") as f:
    f.write(str(child.pid))

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args):
        pass

http.server.HTTPServer((os.environ["TARS_HOST"], int(os.environ["TARS_PORT"])), Health).serve_forever()
"""


def _standin(tmp_path: Path, **env: str) -> ServerProcess:
    return ServerProcess("standin", HOST, ports=PORTS, command=[sys.executable, "-c", STANDIN], address_env=True,
                         log_dir=tmp_path, grace_s=5, env={"CHILD_PID_FILE": str(tmp_path / "child.pid"), **env})


def test_a_bind_failure_moves_to_the_next_port_and_stop_leaves_nothing(tmp_path: Path) -> None:
    server = _standin(tmp_path, FAIL_BIND_ONCE=str(tmp_path / "failed-once"))
    with server:
        server.start(timeout=30)
        assert server.runs == 2 and server.healthy()
        assert "address already in use" in (tmp_path / "standin.log").read_text()
        assert server.port in PORTS
        leader, child = server.pid, int((tmp_path / "child.pid").read_text())
    assert server.exited() and not alive(leader)
    deadline = time.monotonic() + 5
    while alive(child):  # SIGKILL is delivered at once; reaping by init may lag
        assert time.monotonic() < deadline, f"child {child} of the server outlived stop()"
        time.sleep(0.05)
    server.stop()  # idempotent, and never signals a group id that may have been reused


def test_any_other_exit_is_an_error_with_the_log(tmp_path: Path) -> None:
    server = _standin(tmp_path, CRASH="1")
    with pytest.raises(ServerFailed, match="boom: bad settings"):
        server.start(timeout=30)
    assert server.runs == 1 and server.returncode == 2


def test_a_restart_keeps_its_port(tmp_path: Path) -> None:
    with _standin(tmp_path) as server:
        server.start(timeout=30)
        port = server.port
        server.kill()
        server.start(timeout=30)
        assert server.port == port and server.runs == 2 and server.log.name == "standin-2.log"
        assert os.environ.get("TARS_PORT") != str(port)  # our own environment is untouched
