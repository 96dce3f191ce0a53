"""Two real node processes, real embedded models, real sockets.

PC1: ``python -m distributed serve`` on 127.0.0.2:8000, simulated RTX 3060 12 GB.
PC2: the same on 127.0.0.3:8001, simulated GTX 1660 SUPER 6 GB, TARS_PEERS=PC1.
The planner puts the chat model (Gemma 3 270M GGUF) on PC1 and the embedding
model (all-MiniLM-L6-v2) on PC2; either host answers both. Then PC2 is killed
(SIGKILL: no goodbye), restarted, and PC1 is killed in the middle of a stream.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-cluster-token"
PC1 = ("127.0.0.2", 8000)
PC2 = ("127.0.0.3", 8001)
CHAT, EMB = "gemma-3-270m", "all-MiniLM-L6-v2"


def url(addr: tuple[str, int]) -> str:
    return f"http://{addr[0]}:{addr[1]}"


def require_free(addr: tuple[str, int]) -> None:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as exc:
        pytest.fail(f"{addr[0]}:{addr[1]} is busy ({exc}); the two-host test needs it free "
                    f"(stop whatever listens there, e.g. `ss -ltnp | grep {addr[1]}`)")
    finally:
        s.close()


class Node:
    """One `python -m distributed serve` process."""

    def __init__(self, name: str, addr: tuple[str, int], preset: str, models_dir: Path, logdir: Path,
                 **env: str) -> None:
        self.name, self.addr, self.url = name, addr, url(addr)
        self.env = {**os.environ, "TARS_NODE_NAME": name, "TARS_HOST": addr[0], "TARS_PORT": str(addr[1]),
                    "TARS_GPU_PROFILE": preset, "TARS_CLUSTER_TOKEN": TOKEN, "TARS_MODELS_DIR": str(models_dir),
                    "TARS_HEARTBEAT_S": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TARS_LOG_LEVEL": "info", "TARS_MODELS": f"{CHAT},{EMB}", **env}
        self.env.pop("TARS_API_KEY", None)
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self) -> "Node":
        require_free(self.addr)
        self.runs += 1
        self.log = self.logdir / f"{self.name}-{self.runs}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "distributed", "serve"], cwd=ROOT, env=self.env,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # ---- HTTP
    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.get("/models").json()["models"]}

    def peer(self, name: str) -> dict[str, Any]:
        return next(p for p in self.get("/status").json()["peers"] if p["name"] == name)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, *nodes: Node) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (httpx.HTTPError, KeyError, StopIteration, ValueError) as exc:
            last = exc
        time.sleep(0.25)
    logs = "\n".join(f"--- {n.name} log ---\n{n.tail()}" for n in nodes)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last error: {last!r})\n{logs}")


def cluster_ready(pc1: Node, pc2: Node) -> bool:
    m1, m2 = pc1.models(), pc2.models()
    return (pc1.get("/health").status_code == 200 and pc2.get("/health").status_code == 200
            and m1.get(EMB, {}).get("state") == "ready" and m1[EMB]["node"] == "pc2"
            and m2.get(CHAT, {}).get("state") == "ready" and m2[CHAT]["node"] == "pc1")


@pytest.fixture
def hosts(gemma_gguf: Path, minilm_dir: Path, models_dir: Path, tmp_path: Path):
    made: list[Node] = []

    def make(**pc1_env: str) -> tuple[Node, Node]:
        pc1 = Node("pc1", PC1, "rtx3060-12gb", models_dir, tmp_path, **pc1_env)
        pc2 = Node("pc2", PC2, "gtx1660s-6gb", models_dir, tmp_path, TARS_PEERS=url(PC1))
        require_free(PC1)
        require_free(PC2)
        made.extend([pc1, pc2])
        pc1.start()
        pc2.start()
        wait_for(lambda: cluster_ready(pc1, pc2), 180, "both hosts ready, chat on pc1, embeddings on pc2", pc1, pc2)
        return pc1, pc2

    yield make
    for n in made:
        n.stop()


def sse(node: Node, body: dict[str, Any], on_token: Callable[[int], None] | None = None
        ) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, event) for every SSE event of a streamed /inference."""
    out: list[tuple[float, dict[str, Any]]] = []
    with httpx.stream("POST", node.url + "/inference", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append((time.monotonic(), json.loads(line[6:])))
                if on_token is not None and out[-1][1]["type"] == "token":
                    on_token(len(out))
    return out


def test_two_hosts_route_fail_over_rejoin_and_survive_a_peer_dying_mid_stream(hosts):
    pc1, pc2 = hosts()

    # --- the plan and the routing table, on both hosts
    for node in (pc1, pc2):
        plan = {a["model"]: a["node"] for a in node.get("/status").json()["plan"]["assignments"]}
        assert plan == {CHAT: "pc1", EMB: "pc2"}
    assert pc2.peer("pc1")["role"] == "server" and pc2.peer("pc1")["state"] == "alive"
    assert pc1.peer("pc2")["gpu"]["name"] == "NVIDIA GeForce GTX 1660 SUPER"

    # --- chat computed on pc1, whoever receives it
    prompt = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0, "seed": 1}
    direct, routed = pc1.post("/inference", prompt).json(), pc2.post("/inference", prompt).json()
    assert (direct["node"], direct["via"]) == ("pc1", "pc1")
    assert (routed["node"], routed["via"]) == ("pc1", "pc2")
    assert routed["text"] == direct["text"] and routed["text"].strip()

    # --- embeddings computed on pc2, whoever receives them
    texts = ["a cat sat on the mat", "distributed inference at home"]
    e1, e2 = pc1.post("/embed", {"input": texts}).json(), pc2.post("/embed", {"input": texts}).json()
    assert (e1["node"], e1["via"]) == ("pc2", "pc1") and (e2["node"], e2["via"]) == ("pc2", "pc2")
    assert e1["dim"] == 384
    np.testing.assert_allclose(e1["embeddings"], e2["embeddings"], rtol=1e-5, atol=1e-6)

    # --- a stream received by pc2 and computed on pc1 arrives token by token
    events = sse(pc2, {"prompt": "Write a sentence about the sea.", "max_tokens": 24, "temperature": 0.0})
    tokens = [(t, e) for t, e in events if e["type"] == "token"]
    done_t, done = events[-1]
    assert done["type"] == "done" and (done["node"], done["via"]) == ("pc1", "pc2")
    assert len(tokens) >= 5
    assert done_t - tokens[0][0] > 0.02, "tokens arrived all at once, not streamed"
    assert "".join(e["text"] for _, e in tokens) == done["text"]

    # --- pc2 dies (SIGKILL): pc1 serves embeddings itself, marked fallback
    pc2.kill()
    t0 = time.monotonic()
    r = pc1.post("/embed", {"input": texts})
    assert r.status_code == 200, r.text
    fb = r.json()
    assert fb["fallback"] is True and fb["node"] == "pc1" and fb["via"] == "pc1"
    np.testing.assert_allclose(fb["embeddings"], e2["embeddings"], rtol=1e-4, atol=1e-5)
    assert time.monotonic() - t0 < 60
    wait_for(lambda: pc1.peer("pc2")["state"] == "dead", 15, "pc1 to declare pc2 dead", pc1)
    assert pc1.post("/inference", prompt).json()["node"] == "pc1"  # its own model is untouched

    # --- pc2 restarts: it rejoins by itself and computes embeddings again
    pc2.start()
    wait_for(lambda: cluster_ready(pc1, pc2) and pc1.peer("pc2")["state"] == "alive", 180,
             "pc2 to rejoin and load its model again", pc1, pc2)
    back = pc1.post("/embed", {"input": texts}).json()
    assert back["node"] == "pc2" and back["fallback"] is False
    assert pc2.post("/inference", prompt).json()["node"] == "pc1"

    # --- pc1 dies in the middle of a stream relayed by pc2: the stream ends cleanly
    killed_at: list[float] = []

    def kill_after_two(n: int) -> None:
        if n == 2 and not killed_at:
            pc1.kill()
            killed_at.append(time.monotonic())

    events = sse(pc2, {"prompt": "Tell me a long story about a lighthouse keeper.", "max_tokens": 400,
                       "temperature": 0.0}, on_token=kill_after_two)
    assert killed_at, "the stream ended before two tokens"
    end_t, last = events[-1]
    assert last["type"] == "error", last
    assert last["error"]["type"] == "peer_unavailable" and "pc1" in last["error"]["message"]
    assert end_t - killed_at[0] < 5.0
    # the next chat request on pc2 is served there: the chat model fits its GPU profile, fallback is on
    r = pc2.post("/inference", prompt)
    assert r.status_code == 200, r.text
    assert r.json()["fallback"] is True and (r.json()["node"], r.json()["via"]) == ("pc2", "pc2")


def test_without_fallback_a_dead_peer_is_a_fast_503_naming_it(hosts):
    pc1, pc2 = hosts(TARS_FALLBACK="false")
    assert pc1.post("/embed", {"input": ["x"]}).json()["node"] == "pc2"
    pc2.kill()
    for when in ("right after the kill", "after pc2 is declared dead"):
        t0 = time.monotonic()
        r = pc1.post("/embed", {"input": ["x"]})
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, (when, r.text)
        err = r.json()["error"]
        assert err["type"] == "peer_unavailable" and "pc2" in err["message"], (when, err)
        assert elapsed < 3.0, (when, elapsed)
        if when.startswith("right"):
            wait_for(lambda: pc1.peer("pc2")["state"] == "dead", 15, "pc2 dead", pc1)
    r = httpx.post(pc1.url + "/v1/embeddings", json={"input": "x", "model": EMB}, timeout=10)
    assert r.status_code == 503 and "pc2" in r.json()["error"]["message"]
    assert pc1.post("/inference", {"prompt": "Hi", "max_tokens": 4}).json()["node"] == "pc1"
