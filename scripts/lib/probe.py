"""The Python side of the setup scripts (standard library only).

The setup scripts run before anything is installed, on machines that may lack
curl, so every check that touches the network, a wheel, an installed package or an
env file goes through this file and the Python the script already validated (the
venv's, for the checks of what is installed there). Each sub-command prints one line
a shell can parse; network probes exit 3 when the other end cannot be reached.

    probe.py port-free HOST PORT        -> "free" | "in-use <reason>"   (exit 0 | 1)
    probe.py get URL                    -> "<status> <body>"            (exit 0 | 3)
    probe.py tars-node HOST PORT        -> "http" | "https" when a TARS node answers /health
                                           there, else "no" (exit 0 | 1)
    probe.py rpc URL TOKEN METHOD       -> "<status> <body>"            (exit 0 | 3)
    probe.py lan-ip [TARGET_HOST]       -> the local address used to reach TARGET
    probe.py token                      -> a new URL-safe cluster token
    probe.py llama-build                -> "<version> cuda|cpu|broken", nothing when not installed
    probe.py wheel-kind WHEEL           -> "cuda" when the wheel ships libggml-cuda, else "cpu"
    probe.py project-installed ROOT     -> exit 0 when tars-distributed is installed from ROOT
                                           (editable) with every dependency, else 1
    probe.py env-set FILE KEY=VALUE...  -> sets those keys in an env file (the first line of
                                           each, later duplicates dropped, missing keys appended);
                                           every other line is kept as it is

``get`` and ``rpc`` reach an https:// node with a self-signed certificate when
TARS_PROBE_PIN holds its SHA-256 fingerprint: the certificate is read in a handshake
that sends nothing, compared (constant time), and then trusted alone (no CA).
"""

from __future__ import annotations

import errno
import importlib.metadata as md
import json
import re
import secrets
import socket
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

TIMEOUT_S = 5.0


def port_free(host: str, port: int) -> int:
    bind_host = "" if host in ("0.0.0.0", "") else host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers do (uvicorn too): connections of a stopped server in TIME_WAIT do not
        # block the port; another program listening on it still does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bind_host, port))
            s.listen(1)
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            print(f"in-use {reason}")
            return 1
    print("free")
    return 0


def _pinned_context(url: str):  # noqa: ANN202 - ssl.SSLContext | None
    """For https:// with TARS_PROBE_PIN: a context trusting only the pinned certificate."""
    import hashlib
    import hmac
    import os
    import ssl
    from urllib.parse import urlsplit

    pin = os.environ.get("TARS_PROBE_PIN", "").lower().removeprefix("sha256:").replace(":", "")
    if not pin or not url.startswith("https://"):
        return None
    parts = urlsplit(url)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((parts.hostname, parts.port or 443), timeout=TIMEOUT_S) as raw:
        with probe.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            der = tls.getpeercert(binary_form=True) or b""
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest().encode(), pin.encode()):
        raise OSError(f"its TLS certificate (sha256 {hashlib.sha256(der).hexdigest()}) is not the pinned one")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ssl.DER_cert_to_PEM_cert(der))
    return ctx


def tars_node(host: str, port: int) -> int:
    """Is the program on HOST:PORT a TARS node, and over which scheme? Only /health is
    read, nothing is sent but the GET: over https no certificate is checked, since
    nothing secret crosses and the answer only says whether a node is already there."""
    import ssl

    loose = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    for scheme, ctx in (("http", None), ("https", loose)):
        try:
            with urllib.request.urlopen(f"{scheme}://{host}:{port}/health", timeout=TIMEOUT_S, context=ctx) as r:
                body = r.read(65536).decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            body = exc.read(65536).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if '"node"' in body:
            print(scheme)
            return 0
    print("no")
    return 1


def _request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers or {},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S, context=_pinned_context(url)) as resp:
            body = resp.read().decode("utf-8", "replace")
            status = resp.status
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", "replace")
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"unreachable {reason}")
        return 3
    print(f"{status} {' '.join(body.split())}")
    return 0


def rpc(url: str, token: str, method: str) -> int:
    payload = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": {}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    return _request(url.rstrip("/") + "/rpc", payload, headers)


def lan_ip(target: str = "192.0.2.1") -> int:
    # connect() on a UDP socket only picks the route; no packet is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((target, 9))
            print(s.getsockname()[0])
        except OSError:
            print("127.0.0.1")
    return 0


def llama_build() -> int:
    try:
        version = md.version("llama-cpp-python")
    except md.PackageNotFoundError:
        return 0
    try:
        import llama_cpp

        print(version, "cuda" if llama_cpp.llama_supports_gpu_offload() else "cpu")
    except Exception:  # noqa: BLE001 - installed, but its native library does not load (e.g. CUDA libraries gone)
        print(version, "broken")
    return 0


def wheel_kind(wheel: str) -> int:
    """Every build ships the header include/ggml-cuda.h: only the library counts."""
    names = zipfile.ZipFile(wheel).namelist()
    cuda = any(re.search(r"(^|/)(lib)?ggml-cuda\.(so|dll|dylib)", n) for n in names)
    print("cuda" if cuda else "cpu")
    return 0


def project_installed(root: str) -> int:
    try:
        dist = md.distribution("tars-distributed")
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
        if url.rstrip("/") != Path(root).resolve().as_uri():
            return 1  # installed from another checkout
        for req in dist.requires or []:
            if "extra ==" not in req:
                md.version(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    except md.PackageNotFoundError:
        return 1
    return 0


def env_set(path: str, pairs: list[str]) -> int:
    want = dict(pair.split("=", 1) for pair in pairs)
    file = Path(path)
    out, seen = [], set()
    for line in file.read_text().splitlines():
        key = line.split("=", 1)[0]
        if key in want:
            if key in seen:
                continue
            line = f"{key}={want[key]}"
            seen.add(key)
        out.append(line)
    out += [f"{k}={v}" for k, v in want.items() if k not in seen]
    file.write_text("\n".join(out) + "\n")
    return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "port-free" and len(args) == 2:
        return port_free(args[0], int(args[1]))
    if cmd == "get" and len(args) == 1:
        return _request(args[0])
    if cmd == "tars-node" and len(args) == 2:
        return tars_node(args[0], int(args[1]))
    if cmd == "rpc" and len(args) == 3:
        return rpc(*args)
    if cmd == "lan-ip":
        return lan_ip(*args[:1])
    if cmd == "token":
        print(secrets.token_urlsafe(32))
        return 0
    if cmd == "llama-build" and not args:
        return llama_build()
    if cmd == "wheel-kind" and len(args) == 1:
        return wheel_kind(args[0])
    if cmd == "project-installed" and len(args) == 1:
        return project_installed(args[0])
    if cmd == "env-set" and len(args) >= 2 and all("=" in a for a in args[1:]):
        return env_set(args[0], args[1:])
    print(f"unknown probe: {' '.join(argv)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
