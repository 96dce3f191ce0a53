"""check_port of the setup scripts (scripts/lib/setup_common.sh): a port already held by a
TARS node is recognised over http *and* over https (a node set up with --tls), and a port
held by some other program is told apart from both. Runs the real shell function and the
real probe against small local servers on 127.0.0.4."""

from __future__ import annotations

import http.server
import json
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from distributed import tls

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.4"


def _handler(body: bytes) -> type[http.server.BaseHTTPRequestHandler]:
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    return H


@contextmanager
def _server(body: bytes, cert_dir: Path | None = None) -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer((HOST, 0), _handler(body))
    if cert_dir is not None:
        tls.generate(cert_dir / "n.crt", cert_dir / "n.key", ["n"], [HOST])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_dir / "n.crt", cert_dir / "n.key")
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def _check_port(port: int) -> str:
    script = f'source scripts/lib/setup_common.sh; VPY={sys.executable}; check_port {HOST} {port}; echo "$PORT_STATE"'
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


NODE = json.dumps({"status": "ok", "node": "pc1", "role": "server"}).encode()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_tars_node_on_the_port_is_recognised_over_http_and_https(scheme: str, tmp_path: Path) -> None:
    with _server(NODE, tmp_path if scheme == "https" else None) as port:
        assert _check_port(port) == "node"


def test_another_program_on_the_port_is_other_and_a_free_port_is_free(tmp_path: Path) -> None:
    with _server(b'{"hello": "world"}') as port:
        assert _check_port(port) == "other"
    with _server(b'{"hello": "world"}', tmp_path) as port:
        assert _check_port(port) == "other"
    assert _check_port(port) == "free"  # closed now
