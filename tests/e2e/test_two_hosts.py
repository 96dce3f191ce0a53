"""Two real node processes, real embedded models, real sockets.

PC1: ``python -m distributed serve`` on 127.0.0.2, simulated RTX 3060 12 GB.
PC2: the same on 127.0.0.3, simulated GTX 1660 SUPER 6 GB, TARS_PEERS=PC1 (free ports of
18650-18669; a restarted node keeps its port).
The planner puts the chat model (Gemma 3 270M GGUF) on PC1 and the embedding
model (all-MiniLM-L6-v2) on PC2; either host answers both. Then PC2 is killed
(SIGKILL: no goodbye), restarted, and PC1 is killed in the middle of a stream.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from tests.support import ServerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TOKEN = "e2e-cluster-token"
PORTS = range(18650, 18670)  # this file's share of 18600-18699
CHAT, EMB = "gemma-3-270m", "all-MiniLM-L6-v2"


class Node(ServerProcess):
    """One `python -m distributed serve` process, and its HTTP API. A restart keeps its port."""

    def __init__(self, name: str, host: str, preset: str, models_dir: Path, logdir: Path, taken: set[int],
                 **env: str) -> None:
        super().__init__(name, host, ports=PORTS, taken=taken, log_dir=logdir,
                         env={"TARS_GPU_PROFILE": preset, "TARS_CLUSTER_TOKEN": TOKEN,
                              "TARS_MODELS_DIR": str(models_dir), "TARS_HEARTBEAT_S": "1", "TARS_LOG_LEVEL": "info",
                              "TARS_MODELS": f"{CHAT},{EMB}",
                              **env})

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)

    def models(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.get("/models").json()["models"]}

    def peer(self, name: str) -> dict[str, Any]:
        return next(p for p in self.get("/status").json()["peers"] if p["name"] == name)


def cluster_ready(pc1: Node, pc2: Node) -> bool:
    m1, m2 = pc1.models(), pc2.models()
    return (pc1.get("/health").status_code == 200 and pc2.get("/health").status_code == 200
            and m1.get(EMB, {}).get("state") == "ready" and m1[EMB]["node"] == "pc2"
            and m2.get(CHAT, {}).get("state") == "ready" and m2[CHAT]["node"] == "pc1")


@pytest.fixture
def hosts(gemma_gguf: Path, minilm_dir: Path, models_dir: Path, tmp_path: Path):
    made: list[Node] = []
    taken: set[int] = set()

    def make(**pc1_env: str) -> tuple[Node, Node]:
        pc1 = Node("pc1", "127.0.0.2", "rtx3060-12gb", models_dir, tmp_path, taken, **pc1_env)
        pc2 = Node("pc2", "127.0.0.3", "gtx1660s-6gb", models_dir, tmp_path, taken)
        made.extend([pc1, pc2])
        pc1.launch()
        pc2.env["TARS_PEERS"] = pc1.url
        pc2.launch()
        wait_until(lambda: cluster_ready(pc1, pc2), 180, "both hosts ready, chat on pc1, embeddings on pc2",
                   pc1, pc2, interval=0.25)
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
    wait_until(lambda: pc1.peer("pc2")["state"] == "dead", 15, "pc1 to declare pc2 dead", pc1)
    assert pc1.post("/inference", prompt).json()["node"] == "pc1"  # its own model is untouched

    # --- pc2 restarts: it rejoins by itself and computes embeddings again
    pc2.launch()  # on the port it had
    wait_until(lambda: cluster_ready(pc1, pc2) and pc1.peer("pc2")["state"] == "alive", 180,
               "pc2 to rejoin and load its model again", pc1, pc2, interval=0.25)
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
            wait_until(lambda: pc1.peer("pc2")["state"] == "dead", 15, "pc2 dead", pc1)
    r = httpx.post(pc1.url + "/v1/embeddings", json={"input": "x", "model": EMB}, timeout=10)
    assert r.status_code == 503 and "pc2" in r.json()["error"]["message"]
    assert pc1.post("/inference", {"prompt": "Hi", "max_tokens": 4}).json()["node"] == "pc1"
