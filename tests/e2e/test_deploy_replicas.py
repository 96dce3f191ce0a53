"""Runtime deploys and replicas across three real node processes on 127.0.0.2 / .3 / .4
(fake models): a deploy asked on a worker, three replicas, the replica host SIGKILLed under
load with no failed request, removal everywhere, and the deployed set back after the server
restarts.

The fake models take ``TARS_FAKE_TOKEN_DELAY_S`` per token, so the clients really keep pc1 and
pc2 busy: least work in flight sends a request to the copy where it arrived while that copy is
idle, and to another replica only while it is busy. With instant fake models no request ever
found pc1 or pc2 busy, so pc3 (which no client calls) was rarely picked — sometimes never before
the kill (``{'pc2': 115, 'pc1': 65}``): the routing was right, the load was not load."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN = "e2e-deploy-token"
PORTS = range(19000, 19040)
BASE = "gemma-3-270m"
JSON_CT = {"Content-Type": "application/json"}


@pytest.fixture
def cluster(tmp_path: Path):
    taken: set[int] = set()
    common = {"TARS_CLUSTER_TOKEN": TOKEN, "TARS_BACKEND_OVERRIDE": "fake", "TARS_HEARTBEAT_S": "0.5",
              "TARS_MODELS": "smollm2-135m-instruct,all-MiniLM-L6-v2", "TARS_LOG_LEVEL": "info",
              "TARS_FAKE_TOKEN_DELAY_S": "0.01"}  # up to 16 tokens: ~0.1 s a request, so 8 clients keep hosts busy
    pc1 = ServerProcess("pc1", "127.0.0.2", ports=PORTS, taken=taken, log_dir=tmp_path,
                        env={**common, "TARS_GPU_PROFILE": "rtx3060-12gb", "TARS_MODELS_DIR": str(tmp_path / "m1")})
    procs = [pc1.start(timeout=120)]
    taken.add(pc1.port)
    for name, host in (("pc2", "127.0.0.3"), ("pc3", "127.0.0.4")):
        p = ServerProcess(name, host, ports=PORTS, taken=taken, log_dir=tmp_path,
                          env={**common, "TARS_GPU_PROFILE": "gtx1660s-6gb", "TARS_PEERS": pc1.url,
                               "TARS_MODELS_DIR": str(tmp_path / name)})
        procs.append(p.start(timeout=120, ready=lambda: True))
        taken.add(p.port)
    try:
        wait_until(lambda: sum(1 for p in httpx.get(f"{pc1.url}/status", timeout=5).json()["peers"]
                               if p["state"] == "alive") == 2, 60, "two workers joined", *procs)
        yield procs
    finally:
        for p in reversed(procs):
            p.stop()


def models(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{url}/models", timeout=5).json()["models"]}


def replicas_ready(url: str, hosts: set[str]) -> bool:
    m = models(url).get(BASE, {})
    return {r["node"] for r in m.get("replicas", []) if r["state"] == "ready"} == hosts


def test_replicas_across_processes_survive_a_sigkill_and_deploys_persist(cluster) -> None:
    pc1, pc2, pc3 = cluster
    r = httpx.post(f"{pc2.url}/models", json={"model": BASE, "replicas": 3}, timeout=30)  # on a worker
    assert r.status_code == 202, r.text
    assert sorted(a["node"] for a in r.json()["placement"]) == ["pc1", "pc2", "pc3"]
    wait_until(lambda: replicas_ready(pc1.url, {"pc1", "pc2", "pc3"}) and
               replicas_ready(pc2.url, {"pc1", "pc2", "pc3"}), 60, "three ready replicas seen from pc1 and pc2",
               *cluster)

    done, failures, served = [0], [], {}
    lock = threading.Lock()

    def one(i: int) -> None:
        url = (pc1.url, pc2.url)[i % 2]
        resp = httpx.post(f"{url}/inference", json={"model": BASE, "prompt": f"hello {i}", "max_tokens": 16,
                                                    "stream": i % 4 == 0}, timeout=60)
        with lock:
            done[0] += 1
            if resp.status_code != 200:
                failures.append(f"{resp.status_code}: {resp.text[:200]}")
            elif i % 4:
                node = resp.json()["node"]
                served[node] = served.get(node, 0) + 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(240)]
        wait_until(lambda: done[0] >= 60, 60, "load running")
        pc3.kill()  # SIGKILL: the replica host dies with no goodbye
        for f in futures:
            f.result()
    assert failures == [], failures[:5]
    assert served.get("pc3", 0) > 0 and served.get("pc1", 0) > 0 and served.get("pc2", 0) > 0, served

    # removal everywhere, and what was deployed comes back after the server restarts
    assert httpx.post(f"{pc1.url}/models", json={"model": "ms-marco-MiniLM-L-6-v2"}, timeout=30).status_code == 202
    r = httpx.delete(f"{pc1.url}/models/{BASE}", headers=JSON_CT, timeout=30)
    assert r.status_code == 202
    wait_until(lambda: BASE not in models(pc1.url) and BASE not in models(pc2.url), 30, "gemma gone on both", pc1, pc2)
    wait_until(lambda: models(pc2.url)["ms-marco-MiniLM-L-6-v2"]["state"] == "ready", 30, "reranker routed on pc2",
               pc1, pc2)
    pc1.stop()
    pc1.start(timeout=120)
    wait_until(lambda: models(pc1.url).get("ms-marco-MiniLM-L-6-v2", {}).get("state") == "ready"
               and BASE not in models(pc1.url), 60, "the deployed set back after the restart", pc1, pc2)
