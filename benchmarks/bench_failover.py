"""Failover under load (issue 11.2): does a peer killed under load make the node thrash?

Starts two real nodes on loopback with fake backends (the cost measured is the routing,
not the models) — PC1 (127.0.0.2, simulated RTX 3060) and PC2 (127.0.0.3, simulated
GTX 1660 SUPER, joins PC1 and computes the embedding model) — runs ``--clients``
embedding clients through PC1, kills PC2 (SIGKILL: no goodbye) and keeps the load on
for ``--after`` seconds. Reports: failed requests before/after the kill and from 3 s
after it, requests answered by the fallback, fallback loads and stand-in drops on PC1
(counted in its log), PC1's RSS before the kill and at the end.

``--real`` serves the real all-MiniLM-L6-v2 instead, and ``--restart`` starts PC2 again
after ``--after`` seconds and keeps the load on until PC1 has dropped its stand-in (and
``--settle`` seconds more): then PC1's RSS with the stand-in loaded and after it was
dropped are reported too (issue 11.2: back within 10% of the value before the kill).

    .venv/bin/python -m benchmarks.bench_failover
    .venv/bin/python -m benchmarks.bench_failover --real --restart
    .venv/bin/python -m benchmarks.bench_failover --tree /tmp/old   # another checkout (e.g. before a fix)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak import rss_mb  # noqa: E402
from tests.support import ServerProcess, free_port  # noqa: E402

EMB = "all-MiniLM-L6-v2"


def _start(tree: Path, real: bool) -> tuple[ServerProcess, ServerProcess]:
    env = {"TARS_CLUSTER_TOKEN": "bench-failover", "TARS_HEARTBEAT_S": "1.0", "TARS_MODELS": f"gemma-3-270m,{EMB}"}
    if not real:
        env["TARS_BACKEND_OVERRIDE"] = "fake"
    pc1 = ServerProcess("pc1", "127.0.0.2", ports=range(19400, 19500), cwd=tree,
                        env={**env, "TARS_GPU_PROFILE": "rtx3060-12gb"}).start(timeout=300)
    pc2 = ServerProcess("pc2", "127.0.0.3", ports=range(19500, 19600), cwd=tree,
                        env={**env, "TARS_GPU_PROFILE": "gtx1660s-6gb", "TARS_PEERS": pc1.url}).start(timeout=300)
    deadline = time.time() + 300
    while True:  # the embedding model served by pc2, as pc1 sees it
        m = {x["id"]: x for x in httpx.get(pc1.url + "/models", timeout=5).json()["models"]}
        if m[EMB]["node"] == "pc2" and m[EMB]["state"] == "ready" and "handoff" not in m[EMB]:
            return pc1, pc2
        if time.time() > deadline:
            raise SystemExit(f"pc2 never served {EMB}: {m[EMB]}")
        time.sleep(0.2)


async def _load(pc1: ServerProcess, pc2: ServerProcess, clients: int, before: float, after: float,
                restart: bool = False, settle: float = 5.0) -> dict:
    log: list[tuple[float, int, bool]] = []
    extra: dict = {}
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=pc1.url, timeout=30,
                                 limits=httpx.Limits(max_connections=2 * clients)) as c:
        async def client(i: int) -> None:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    r = await c.post("/embed", json={"input": [f"client {i} says hello"]})
                    log.append((t, r.status_code, bool(r.json().get("fallback"))))
                except httpx.HTTPError:
                    log.append((t, 0, False))

        tasks = [asyncio.ensure_future(client(i)) for i in range(clients)]
        await asyncio.sleep(before)
        offset = len(pc1.log.read_text())  # pc1's log from the kill on
        killed = time.monotonic()
        pc2.kill()
        await asyncio.sleep(after)
        if restart:
            extra["pc1_rss_mb_with_standin"] = round(rss_mb(pc1.pid, children=False))
            await asyncio.to_thread(pc2.start, 300)
            t0 = time.monotonic()
            while "dropping the local" not in pc1.log.read_text()[offset:]:
                if time.monotonic() - t0 > 120:
                    raise SystemExit("pc1 never dropped its stand-in after pc2 came back")
                await asyncio.sleep(0.2)
            extra["standin_dropped_s_after_restart"] = round(time.monotonic() - t0, 1)
            await asyncio.sleep(settle)
            extra["pc1_rss_mb_after_drop"] = round(rss_mb(pc1.pid, children=False))
        stop.set()
        await asyncio.gather(*tasks)
    pre = [x for x in log if x[0] < killed]
    post = [x for x in log if x[0] >= killed]
    return {"requests_before_kill": len(pre), "failed_before_kill": sum(s != 200 for _, s, _ in pre),
            "requests_after_kill": len(post), "failed_after_kill": sum(s != 200 for _, s, _ in post),
            "failed_from_3s_after_kill": sum(s != 200 for t, s, _ in post if t >= killed + 3),
            "answered_by_fallback": sum(f for _, _, f in post), "log_offset": offset, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=ROOT, help="checkout whose `python -m distributed` runs the nodes")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--before", type=float, default=2.0, help="seconds of load before the kill")
    ap.add_argument("--after", type=float, default=8.0, help="seconds of load after the kill")
    ap.add_argument("--real", action="store_true", help="the real embedding model instead of fake backends")
    ap.add_argument("--restart", action="store_true", help="start PC2 again; measure RSS after the stand-in drop")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of load after the drop before measuring")
    args = ap.parse_args()

    pc1, pc2 = _start(args.tree, args.real)
    try:
        rss0 = rss_mb(pc1.pid, children=False)
        out = asyncio.run(_load(pc1, pc2, args.clients, args.before, args.after, args.restart, args.settle))
        text = pc1.log.read_text()[out.pop("log_offset"):]
        out.update(fallback_loads=text.count("fallback: loading"), standin_drops=text.count("dropping the local"),
                   pc1_rss_mb_before_kill=round(rss0), pc1_rss_mb_end=round(rss_mb(pc1.pid, children=False)))
        if "pc1_rss_mb_after_drop" in out:
            out["rss_after_drop_vs_before_kill"] = round(out["pc1_rss_mb_after_drop"] / out["pc1_rss_mb_before_kill"], 3)
        print(json.dumps(out, indent=2))
    finally:
        pc1.stop()
        pc2.stop()


if __name__ == "__main__":
    main()
