"""Replicas add capacity (issue 12.2): one chat model on 1 host vs on 3, side by side in one run.

Three nodes in one process (the real apps, nodes, cluster, planner, /rpc and ReplicaSet
routing; in-process transport as in tests/cluster_support.py) with the fake chat backend
slowed to ``--token-ms`` per token, so each host computes one generation at a time at a known
speed — what is measured is how well the routing spreads the work, not a model. Clients send
non-streamed /inference requests to pc1 and pc2 alternately. Rounds alternate replicas=1 and
replicas=3 (``tars run --replicas``'s path, POST /models) so both see the same machine load.

    .venv/bin/python -m benchmarks.bench_replicas [--clients 12] [--requests 96] [--rounds 2]

Prints requests/s per round, the ratio 3 replicas / 1 replica, and how the requests were
spread over the hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster_support import Host, Net, until  # noqa: E402

URLS = {"pc1": "http://127.0.0.2:18901", "pc2": "http://127.0.0.3:18902", "pc3": "http://127.0.0.4:18903"}
MODEL = "gemma-3-270m"


async def _cluster(token_ms: float, tokens: int) -> list[Host]:
    net, hosts, d = Net(), [], Path(tempfile.mkdtemp())
    extra = {"token_delay_s": token_ms / 1000, "reply_tokens": tokens}
    for name, preset in (("pc1", "rtx3060-12gb"), ("pc2", "gtx1660s-6gb"), ("pc3", "gtx1660s-6gb")):
        peers = () if name == "pc1" else (URLS["pc1"],)
        hosts.append(await Host(net, name, URLS[name], preset, peers=peers, extra=extra, heartbeat_s=0.2,
                                models=["smollm2-135m-instruct", "all-MiniLM-L6-v2"], models_dir=d / name).start())
    await until(lambda: len(hosts[0].cluster.hosts()) == 3, timeout=20, what="three hosts")
    return hosts


async def _scale(hosts: list[Host], replicas: int) -> None:
    r = await hosts[0].http.post("/models", json={"model": MODEL, "replicas": replicas})
    assert r.status_code in (200, 202), r.text

    def ready() -> bool:
        for h in hosts[:2]:
            rs = h.node.routes.replicas.get(MODEL)
            live = {m.node for m in rs.members() if rs.live(m)} if rs else set()
            t = h.node.targets.get(MODEL)
            if replicas > 1 and len(live) != replicas:
                return False
            if replicas == 1 and (rs is not None or t is None or t.state != "ready"):
                return False
        return True

    await until(ready, timeout=20, what=f"{replicas} replica(s) ready")


async def _load(hosts: list[Host], clients: int, requests: int, tokens: int) -> tuple[float, dict[str, int], int]:
    sem = asyncio.Semaphore(clients)
    served: collections.Counter[str] = collections.Counter()
    failed = 0

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            r = await hosts[i % 2].http.post("/inference", json={"model": MODEL, "prompt": f"p{i}",
                                                                 "max_tokens": tokens}, timeout=120)
            if r.status_code == 200:
                served[r.json()["node"]] += 1
            else:
                failed += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return requests / (time.perf_counter() - t0), dict(served), failed


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--token-ms", type=float, default=20.0)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    hosts = await _cluster(args.token_ms, args.tokens)
    rows = []
    try:
        for rnd in range(args.rounds):
            for replicas in (1, 3):
                await _scale(hosts, replicas)
                rps, served, failed = await _load(hosts, args.clients, args.requests, args.tokens)
                rows.append({"round": rnd + 1, "replicas": replicas, "req_per_s": round(rps, 2), "served": served,
                             "failed": failed})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for h in reversed(hosts):
            await h.stop()
    one = sum(r["req_per_s"] for r in rows if r["replicas"] == 1) / args.rounds
    three = sum(r["req_per_s"] for r in rows if r["replicas"] == 3) / args.rounds
    print(json.dumps({"replicas_1_req_per_s": round(one, 2), "replicas_3_req_per_s": round(three, 2),
                      "ratio_3_over_1": round(three / one, 2), "clients": args.clients,
                      "token_ms": args.token_ms, "tokens": args.tokens}))


if __name__ == "__main__":
    asyncio.run(main())
