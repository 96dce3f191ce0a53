"""Pooled VRAM on loopback, CPU only, real processes (issue 10).

PC1 (127.0.0.2) and PC2 (127.0.0.3) get simulated GPUs that are each too small for the
embedded Gemma 3 270M (sized from the planner's own estimate: ``gpu_sizes``) but hold it
together, so the planner splits it: llama-server on PC1 with ``--rpc`` to PC1's tunnel,
PC2's relay (cluster token first), and ``ggml-rpc-server`` on PC2's 127.0.0.1.

Checked: the plan splits; both hosts answer chat with sensible text; nothing PC2 listens
on outside loopback answers raw RPC (the relay answers nothing at all); PC2 killed
mid-stream → the stream ends within seconds, requests sent right after wait for PC1 alone
(or get a 503 naming PC2, never a bare "stopped answering"), PC1 serves alone; PC2 back → the split is
restored while PC1 keeps answering (make before break); no process is left behind.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServerFailed, ServerProcess, alive, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TOKEN = "e2e-split-token"
PORTS = range(18770, 18790)  # this file's share of the e2e port ranges
MODEL = "gemma-3-270m"
PROMPT = "Paris is the capital of"  # the embedded base model: " France, and it is ..."


def engine_with_rpc() -> Any:
    from distributed.engine.binary import locate

    b = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    return b if b is not None and b.rpc_server is not None else None


def gpu_profile(path: Path, name: str, vram_mb: int) -> Path:
    path.write_text(json.dumps({
        "description": f"test: a {vram_mb} MB GPU, too small for the model alone",
        "hostname": name, "cpu_model": "loopback CPU", "cpu_cores": 2, "ram_total_mb": 16384, "ram_free_mb": 12000,
        "gpus": [{"index": 0, "name": f"Simulated {vram_mb} MB GPU", "vram_total_mb": vram_mb,
                  "vram_free_mb": vram_mb, "uuid": f"GPU-sim-{name}"}]}))
    return path


def gpu_sizes(gguf: Path, reserve: int = 500, slots: int = 2) -> tuple[int, int]:
    """Simulated VRAM for PC1 and PC2: PC1 misses the whole model by 40 MB even with one engine
    slot (with one it would rather take it whole with fewer slots than split it), PC2 has room
    for its runtime and ~60 % of the layers at ``slots`` slots — so only together."""
    import math

    from distributed.catalog import load_catalog
    from distributed.vram import estimate

    spec = load_catalog().get(MODEL)
    one, est = estimate(spec, 2048, gguf), estimate(spec, 2048, gguf, slots=slots)
    return reserve + one.total_mb - 40, reserve + est.overhead_mb + math.ceil(0.6 * est.n_layers * est.layer_mb) + 10


class Node(ServerProcess):
    def __init__(self, name: str, host: str, profile: Path, models_dir: Path, logdir: Path, taken: set[int],
                 **env: str) -> None:
        split_port = free_port(host, range(18790, 18799), taken)
        super().__init__(name, host, ports=PORTS, taken=taken, log_dir=logdir,
                         env={"TARS_GPU_PROFILE": str(profile), "TARS_CLUSTER_TOKEN": TOKEN,
                              "TARS_MODELS_DIR": str(models_dir), "TARS_MODELS": MODEL, "TARS_HEARTBEAT_S": "1",
                              "TARS_CHAT_ENGINE": "server", "TARS_PARALLEL": "2", "TARS_CONTEXT": "2048",  # as gpu_sizes counts
                              "TARS_THREADS": "1",
                              "TARS_SPLIT_PORT": str(split_port), "TARS_LOG_LEVEL": "info", **env})
        self.split_port = split_port

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def model(self) -> dict[str, Any]:
        return next((m for m in self.get("/models").json()["models"] if m["id"] == MODEL), {})

    def complete(self, max_tokens: int = 12) -> httpx.Response:
        return httpx.post(self.url + "/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})

    def rpc(self, method: str, params: dict | None = None) -> Any:
        r = httpx.post(self.url + "/rpc", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
                       json={"jsonrpc": "2.0", "method": method, "params": params or {}, "id": 1})
        return r.json()


def split_ready(pc1: Node) -> bool:
    m = pc1.model()
    return m.get("state") == "ready" and m.get("split_mode") == "split"


def listeners(pid_root: int) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP listener of the process tree under ``pid_root``."""
    import psutil

    procs = [psutil.Process(pid_root), *psutil.Process(pid_root).children(recursive=True)]
    out = []
    for p in procs:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                out.append((c.laddr.ip, c.laddr.port, p.pid))
    return out


RPC_HELLO = bytes([14]) + struct.pack("<Q", 0)  # ggml RPC: command byte + payload size (HELLO, empty)


def raw_answer(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(RPC_HELLO + b"\x00" * 64)
        s.settimeout(4)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except (TimeoutError, socket.timeout, ConnectionResetError):
            pass
        return data


@pytest.fixture
def pair(gemma_gguf: Path, models_dir: Path, tmp_path: Path):
    if engine_with_rpc() is None:
        pytest.skip("no llama-server + ggml-rpc-server build (scripts/build_engine.sh)")
    taken: set[int] = set()
    pc1_mb, pc2_mb = gpu_sizes(gemma_gguf)
    pc1 = Node("pc1", "127.0.0.2", gpu_profile(tmp_path / "pc1.json", "pc1", pc1_mb), models_dir, tmp_path, taken)
    pc2 = Node("pc2", "127.0.0.3", gpu_profile(tmp_path / "pc2.json", "pc2", pc2_mb), models_dir, tmp_path, taken)
    try:
        pc1.launch()
        pc2.env["TARS_PEERS"] = pc1.url
        pc2.launch()
        wait_until(lambda: split_ready(pc1), 240, "the split engine ready on pc1", pc1, pc2, interval=0.5)
        yield pc1, pc2
    finally:
        pc2.stop()
        pc1.stop()


def test_split_serves_behind_the_token_survives_the_worker_host_and_comes_back(pair) -> None:
    pc1, pc2 = pair
    # -- the plan splits, and says so in /status and /models
    a = next(x for x in pc1.get("/status").json()["plan"]["assignments"] if x["model"] == MODEL)
    assert a["node"] == "pc1" and [s["node"] for s in a["split"]] == ["pc1", "pc2"]
    assert sum(s["layers"] for s in a["split"]) == 18
    m = pc1.model()
    assert [s["state"] for s in m["split"]] == ["engine", "worker"]
    # -- one model with its split in every host's routing table (/models)
    wait_until(lambda: pc2.model().get("split"), 30, "pc2's /models showing the split", pc2)
    m2 = pc2.model()
    assert m2["node"] == "pc1" and [s["node"] for s in m2["split"]] == ["pc1", "pc2"]
    assert [x["id"] for x in pc2.get("/models").json()["models"]].count(MODEL) == 1
    # -- both hosts answer, sensibly
    for node in (pc1, pc2):
        r = node.complete()
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert "France" in text, text
    # -- PC2: the RPC worker listens on 127.0.0.1 only; nothing else answers raw RPC
    info = pc2.rpc("split.info")["result"]
    (worker,) = info["workers"]
    assert worker["listen"].startswith("127.0.0.1:") and info["relay"]["listen"] == f"127.0.0.3:{pc2.split_port}"
    outside = [(ip, port) for ip, port, _ in listeners(pc2.pid) if ip != "127.0.0.1"]
    assert (pc2.host, pc2.split_port) in outside and (pc2.host, pc2.port) in outside
    for ip, port in outside:
        answer = raw_answer(pc2.host if ip in ("0.0.0.0", "::") else ip, port)
        if port == pc2.split_port:
            assert answer == b"", "the relay must answer nothing without the token"
        else:
            assert not answer or answer.startswith(b"HTTP/"), f"{ip}:{port} answered raw RPC"
    refused_before = pc2.rpc("split.info")["result"]["relay"]["refused"]
    assert refused_before >= 1

    # -- PC2 dies mid-stream: the stream ends within seconds, PC1 serves alone
    ended: dict[str, Any] = {}

    def stream() -> None:
        t0 = time.monotonic()
        with httpx.stream("POST", pc1.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                                "temperature": 0.8, "stream": True}) as r:
            ended["status"] = r.status_code
            for line in r.iter_lines():
                ended.setdefault("first", time.monotonic())
                ended["last_line"] = line
        ended["took"] = time.monotonic() - t0

    th = threading.Thread(target=stream)
    th.start()
    wait_until(lambda: "first" in ended, 60, "the first streamed token", pc1)
    killed = time.monotonic()
    pc2.kill()
    # requests sent right after: they wait for PC1 alone (or get a 503 naming PC2), never a bare
    # "the engine stopped answering"
    answers: list[httpx.Response] = []
    askers = [threading.Thread(target=lambda: answers.append(pc1.complete(max_tokens=4))) for _ in range(3)]
    for a in askers:
        a.start()
    th.join(timeout=30)
    assert not th.is_alive(), "the stream hung after the worker host died"
    assert ended["status"] == 200
    for a in askers:
        a.join(timeout=150)
    assert len(answers) == 3
    for r in answers:
        assert r.status_code == 200 or (r.status_code == 503 and "pc2" in r.json()["error"]["message"]), r.text
        assert "stopped answering" not in r.text, r.text
    served_alone = sum(r.status_code == 200 for r in answers)
    wait_until(lambda: pc1.model().get("state") == "ready" and pc1.model().get("split_mode") == "alone", 60,
               "pc1 serving alone", pc1)
    alone_after = time.monotonic() - killed
    m = pc1.model()
    assert "pc2" in m["missing"] and [s["state"] for s in m["split"]] == ["engine", "missing"]
    r = pc1.complete()
    assert r.status_code == 200 and "France" in r.json()["choices"][0]["text"], r.text

    # -- PC2 back: the split is restored while PC1 keeps answering (make before break)
    pc2.start()
    failures: list[str] = []
    answered = 0
    deadline = time.monotonic() + 180
    while not split_ready(pc1):
        assert time.monotonic() < deadline, "split not restored in 180 s:\n" + pc1.tail(40)
        r = pc1.complete(max_tokens=4)
        if r.status_code != 200:
            failures.append(f"{r.status_code} {r.text[:200]}")
        answered += 1
    assert not failures, failures
    r = pc2.complete()
    assert r.status_code == 200 and "France" in r.json()["choices"][0]["text"]
    print(f"\nworker host killed → pc1 alone after {alone_after:.1f} s ({served_alone} of 3 requests sent right "
          f"after the kill waited and were served alone); {answered} requests answered during the restore, none refused")


def test_no_process_left_behind(pair) -> None:
    import psutil

    pc1, pc2 = pair
    tree = [p.pid for n in (pc1, pc2) for p in psutil.Process(n.pid).children(recursive=True)]
    assert tree  # llama-server on pc1, ggml-rpc-server on pc2
    pc2.stop()
    pc1.stop()
    try:  # killed at once; a child of the group is reaped by init, which may lag
        wait_until(lambda: not any(alive(pid) for pid in tree), 10, "every child to be gone")
    except ServerFailed:
        pytest.fail(f"left behind: {[pid for pid in tree if alive(pid)]}")
