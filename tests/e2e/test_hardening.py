"""Issue 11 against real ``serve`` processes on loopback (fake backends): connection
deadlines and the connection bound (§1), HTTPS with a pinned self-signed certificate
between two hosts (§8)."""

from __future__ import annotations

import re
import socket
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest

from distributed import tls
from tests.support import ServerProcess, free_port, wait_until

HOST1, HOST2 = "127.0.0.2", "127.0.0.3"
TOKEN = "e2e-hardening-token"
FILE_LIMIT = 1024
# ``serve`` under a file limit of 1024 (soft and hard), as on many desktops
LIMITED = [sys.executable, "-c",
           "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
           "os.execv(sys.executable, [sys.executable, '-m', 'distributed', 'serve'])" % (FILE_LIMIT, FILE_LIMIT)]


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``trickle`` a byte each 0.5 s), or None."""
    t0 = time.monotonic()
    sock.settimeout(0.5)
    i = 0
    while time.monotonic() - t0 < seconds:
        try:
            if i < len(trickle):
                sock.send(trickle[i:i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:  # reset / broken pipe: closed
            return time.monotonic() - t0
    return None


@pytest.fixture(params=["http", "https"])
def limited_node(request, tmp_path: Path):
    """PC1 under a 1024 file limit, plain or HTTPS: over TLS a connection that never
    finishes its handshake must count and time out like one that never sends headers."""
    extra, verify = {}, True
    if request.param == "https":
        tls.generate(tmp_path / "pc1.crt", tmp_path / "pc1.key", ["pc1"], [HOST1])
        extra = {"TARS_TLS_CERT": str(tmp_path / "pc1.crt"), "TARS_TLS_KEY": str(tmp_path / "pc1.key")}
        verify = ssl.create_default_context(cafile=str(tmp_path / "pc1.crt"))  # the test trusts it directly
    # a range of ports, not one: if another process takes the port first, the next one is tried
    env = {"TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": TOKEN, "TARS_LOG_LEVEL": "info",
           "TARS_HEADER_TIMEOUT_S": "3", "TARS_MODELS_DIR": str(tmp_path), **extra}
    node = ServerProcess("pc1", HOST1, ports=range(18700, 18720), command=LIMITED, address_env=True,
                         log_dir=tmp_path, scheme=request.param, verify=verify, env=env)
    with node:
        node.start(timeout=120)
        yield node


def _health(node: ServerProcess) -> httpx.Response:
    return httpx.get(node.url + "/health", timeout=2.0, verify=node.verify)


def _closed_by_server(socks: list[socket.socket]) -> int:
    """How many of the non-blocking ``socks`` the other end has closed (EOF or reset)."""
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:  # open, nothing to read
            pass
        except OSError:  # reset, or the connect itself failed
            closed += 1
    return closed


def test_idle_connections_cannot_starve_the_node(limited_node):
    """1,100 idle connections (more than the file limit allows) and /health still answers
    within 2 s; before the fix accept() failed for lack of descriptors and /health hung."""
    socks = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST1, limited_node.port))
            socks.append(s)
        cap = int(re.search(r"at most (\d+) connections", limited_node.log_text()).group(1))
        wait_until(lambda: _closed_by_server(socks) >= len(socks) - cap, 30,
                   f"the node to accept them all and shed those over its bound of {cap}", limited_node)
        for attempt in range(3):
            t0 = time.monotonic()
            r = _health(limited_node)
            took = time.monotonic() - t0
            assert r.status_code == 200 and took < 2.0, (attempt, took)
        assert f"listening on {limited_node.scheme}://" in limited_node.log_text()
        assert "at most" in limited_node.log_text()
    finally:
        for s in socks:
            s.close()


def test_slow_header_idle_and_slow_body_connections_are_closed(limited_node):
    addr = (HOST1, limited_node.port)
    idle = socket.create_connection(addr)
    slow = socket.create_connection(addr)
    body = socket.create_connection(addr)
    try:
        body.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.2\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"input\":")
        # TARS_HEADER_TIMEOUT_S=3: closed after 3-4 s (the sweep runs each second), well before 10 s
        took = _closed_within(slow, 10.0, trickle=b"GET /health HTTP/1.1\r\nHost: 127.0.0.2\r\nX-Slow: " + b"a" * 40)
        assert took is not None and took < 6.0, took
        assert _closed_within(idle, 4.0) is not None
        assert _closed_within(body, 4.0) is not None
        assert _health(limited_node).status_code == 200
    finally:
        for s in (idle, slow, body):
            s.close()


def test_https_between_two_hosts_with_a_pinned_certificate(tmp_path: Path):
    """PC1 serves HTTPS with a self-signed certificate; PC2 gets its fingerprint (as
    setup_pc1.sh --tls prints it) and joins over pinned TLS; PC1 learns PC2's own
    certificate from the join. A third host pinning another fingerprint cannot join."""
    fp1 = tls.generate(tmp_path / "pc1.crt", tmp_path / "pc1.key", ["pc1", "localhost"], [HOST1])
    fp2 = tls.generate(tmp_path / "pc2.crt", tmp_path / "pc2.key", ["pc2"], [HOST2])
    taken: set[int] = set()
    p1, p2, p3 = (free_port(h, range(18720, 18760), taken) for h in (HOST1, HOST2, HOST2))
    ctx = tls.Pins([fp1]).context()  # the test's own client pins PC1 too
    pc1 = ServerProcess("pc1", HOST1, port=p1, log_dir=tmp_path, env={
        "TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": TOKEN, "TARS_MODELS_DIR": str(tmp_path),
        "TARS_TLS_CERT": str(tmp_path / "pc1.crt"), "TARS_TLS_KEY": str(tmp_path / "pc1.key"),
        "TARS_ADVERTISE_URL": f"https://{HOST1}:{p1}", "TARS_HEARTBEAT_S": "0.5"})
    pc2 = ServerProcess("pc2", HOST2, port=p2, log_dir=tmp_path, env={
        "TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": TOKEN, "TARS_MODELS_DIR": str(tmp_path),
        "TARS_TLS_CERT": str(tmp_path / "pc2.crt"), "TARS_TLS_KEY": str(tmp_path / "pc2.key"),
        "TARS_ADVERTISE_URL": f"https://{HOST2}:{p2}", "TARS_PEERS": f"https://{HOST1}:{p1}",
        "TARS_TLS_PINS": f"sha256:{fp1}", "TARS_HEARTBEAT_S": "0.5"})
    pc3 = ServerProcess("pc3", HOST2, port=p3, log_dir=tmp_path, env={
        "TARS_BACKEND_OVERRIDE": "fake", "TARS_CLUSTER_TOKEN": TOKEN, "TARS_MODELS_DIR": str(tmp_path),
        "TARS_PEERS": f"https://{HOST1}:{p1}", "TARS_TLS_PINS": fp2})  # pins the wrong certificate

    import asyncio

    from distributed.errors import PeerUnavailable

    def pc1_up() -> bool:
        try:
            asyncio.run(ctx.pin(f"https://{HOST1}:{p1}", "pc1", 5.0))
        except PeerUnavailable:
            return False  # not listening yet
        return client.get(f"https://{HOST1}:{p1}/health").status_code == 200

    with pc1, pc2, pc3, httpx.Client(verify=ctx.ssl, timeout=5.0) as client:
        url1, url2 = f"https://{HOST1}:{p1}", f"https://{HOST2}:{p2}"

        def peer_state(url: str, name: str) -> str:
            return next(p["state"] for p in client.get(url + "/status").json()["peers"] if p["name"] == name)

        pc1.start(timeout=120, ready=pc1_up, what="pc1 https")
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://{HOST1}:{p1}/health", timeout=2.0).raise_for_status()
        pc2.start(timeout=120, ready=lambda: peer_state(url1, "pc2") == "alive", what="pc2 joined over TLS")
        ctx2 = tls.Pins([fp2]).context()
        asyncio.run(ctx2.pin(url2, "pc2", 5.0))
        with httpx.Client(verify=ctx2.ssl, timeout=5.0) as c2:
            wait_until(lambda: next(p["state"] for p in c2.get(url2 + "/status").json()["peers"]
                                    if p["name"] == "pc1") == "alive", 30, "pc2 sees pc1 alive", pc1, pc2)
        # PC1 beats PC2 over https too (it learned PC2's fingerprint from the join): its beats are answered
        def pc2_seen() -> dict:
            return next(p for p in client.get(url1 + "/status").json()["peers"] if p["name"] == "pc2")

        wait_until(lambda: pc2_seen()["rtt_ms"] is not None, 30, "pc1's beats answered by pc2 over https", pc1, pc2)
        assert pc2_seen()["state"] == "alive"
        assert "missed heartbeat" not in pc1.log_text() and "not pinned" not in pc1.log_text()
        r = client.post(url1 + "/embed", json={"input": ["over tls"]})
        assert r.status_code == 200, r.text
        pc3.launch()
        wait_until(lambda: "not pinned" in pc3.log_text(), 30, "pc3 refuses PC1's certificate", pc3)
        assert "pc3" not in {p["name"] for p in client.get(url1 + "/status").json()["peers"]}


def _copy_repo(dest: Path) -> Path:
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, files):
        src = root / os.fsdecode(rel)
        if src.is_file() and not os.fsdecode(rel).startswith(("env/.env.pc1", "env/.env.pc2", "env/tls")) or \
                src.is_file() and os.fsdecode(rel).endswith(".example"):
            target = dest / os.fsdecode(rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(src.read_bytes())
            target.chmod(src.stat().st_mode)
    return dest


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="the setup scripts need the virtual environment")
def test_setup_scripts_api_key_tls_and_private_files(tmp_path: Path):
    """setup_pc1.sh on a LAN-facing host generates an API key (no keyboard) and prints how
    clients send it; --tls writes a certificate and prints TOKEN#sha256:FP; setup_pc2.sh
    splits that value, pins the certificate, and makes an env/.env.pc2 copied by hand 0600."""
    import os
    import stat
    import subprocess

    repo = _copy_repo(tmp_path / "repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARS_", "PYTHON"))}
    env.update({"CI": "1", "PYTHON": sys.executable, "TARS_VENV": sys.prefix, "TARS_SETUP_SKIP_INSTALL": "1",
                "TARS_SETUP_SELFCHECK": "0", "TARS_MODELS_DIR": str(tmp_path / "models"), "HF_HUB_OFFLINE": "1"})

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", *args], cwd=repo, env={**env, **extra}, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def values(name: str) -> dict[str, str]:
        text = (repo / "env" / name).read_text().splitlines()
        return dict(ln.split("=", 1) for ln in text if ln and not ln.startswith("#"))

    r = run("scripts/setup_pc1.sh", "--tls", TARS_HOST="0.0.0.0", TARS_PORT="18790",
            TARS_ADVERTISE_URL="http://127.0.0.2:18790")
    v1 = values(".env.pc1")
    key, token = v1["TARS_API_KEY"], v1["TARS_CLUSTER_TOKEN"]
    assert len(key) >= 32 and key != token
    assert f"API key for clients: {key}" in r.stdout and f"Authorization: Bearer {key}" in r.stdout
    fp = tls.fingerprint_file(repo / v1["TARS_TLS_CERT"])
    assert v1["TARS_ADVERTISE_URL"] == "https://127.0.0.2:18790" and f"{token}#sha256:{fp}" in r.stdout
    for name in ("env/.env.pc1", "env/tls/pc1.key"):
        assert stat.S_IMODE((repo / name).stat().st_mode) == 0o600, name
    assert "Nothing changed" in run("scripts/setup_pc1.sh", "--tls").stdout  # idempotent, keeps key and cert
    assert values(".env.pc1")["TARS_API_KEY"] == key

    example = repo / "env" / ".env.pc2"
    example.write_text((repo / "env" / ".env.pc2.example").read_text())
    example.chmod(0o644)  # copied by hand, as the README once said
    run("scripts/setup_pc2.sh", "127.0.0.2:18790", "--token", f"{token}#sha256:{fp}", TARS_HOST="127.0.0.3")
    v2 = values(".env.pc2")
    assert stat.S_IMODE(example.stat().st_mode) == 0o600
    assert v2["TARS_CLUSTER_TOKEN"] == token and v2["TARS_TLS_PINS"] == fp
    assert v2["TARS_PEERS"] == "https://127.0.0.2:18790"
