"""Soak (issue 11 §10): mixed load for minutes, one peer killed and restarted twice.

Starts PC1 (127.0.0.2, the server: chat) and PC2 (127.0.0.3, joins PC1: embeddings),
then runs ``--clients`` (32) concurrent clients against PC1 for ``--minutes`` (10):
chat not streamed (``/v1/chat/completions``), chat streamed (SSE, read to the end) and
embeddings (``/v1/embeddings``, 4 texts), in the ratio 2:1:2. PC2 is killed (SIGKILL, no
goodbye) at 1/3 and 2/3 of the run and started again ``--down-s`` (20) seconds later.

It reports, and checks against issue 11:

* every status; no 5xx other than 503 *with* ``Retry-After`` (429 is the queue saying
  "later", also with Retry-After); a streamed answer that ends in ``event: error`` /
  an ``error`` object counts as failed unless that error is a 503-type with a retry;
* no request over 30 s (``--slow-s``);
* PC1's RSS (the node process and its children, e.g. a llama-server engine) at the end
  within 10% of its value after the first minute.

    .venv/bin/python -m benchmarks.soak                        # 10 minutes, real models
    .venv/bin/python -m benchmarks.soak --minutes 3 --json soak.json
    .venv/bin/python -m benchmarks.soak --backend fake         # the machinery only
    .venv/bin/python -m benchmarks.soak --pin                  # each node on a core of its own

``--pin`` runs PC1 on the first CPU this process may use and PC2 on the second (with
their children: the engine, the models), the clients on all of them: two hosts on one
machine, each with its own core, instead of both nodes' threads contending for every core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cli import numbers, report
from tests.support import ServerProcess, wait_until

TOKEN = "soak-token"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Two home computers act as one service.",
             "What time does the train to Lyon leave tomorrow morning?", "Embeddings map sentences to vectors.",
             "She sells sea shells by the sea shore.", "The heartbeat tells each node its peer is alive."]
PROMPTS = ["Name three colours.", "What is the capital of France?", "Say hello in French.", "Count to five."]


def pinned(cpu: int) -> list[str]:
    """The ``serve`` command run on CPU ``cpu`` only (children inherit the affinity)."""
    return [sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); "
            "os.execv(sys.executable, [sys.executable, '-m', 'distributed', 'serve'])"]


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of ``pid`` (and its descendants), MB (from /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            for task in Path(f"/proc/{p}/task").iterdir() if children else ():
                children = (task / "children").read_text().split()
                todo.extend(int(c) for c in children)
        except (OSError, ValueError):
            continue
    return total / 1024


class Recorder:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.bad: list[dict[str, Any]] = []
        self.latencies: dict[str, list[float]] = {"chat": [], "stream": [], "embed": []}
        self.slow: list[dict[str, Any]] = []

    def add(self, kind: str, status: str, seconds: float, ok: bool, why: str = "", t: float = 0.0) -> None:
        self.statuses[f"{kind} {status}"] += 1
        self.latencies[kind].append(seconds)
        if not ok:
            self.bad.append({"kind": kind, "status": status, "why": why[:200], "at_s": round(t, 1)})


def _acceptable(status: int, headers: httpx.Headers) -> bool:
    if status < 500 and status != 429:
        return status < 400
    return status in (429, 503) and "retry-after" in headers


async def one(client: httpx.AsyncClient, kind: str, rec: Recorder, t_start: float, slow_s: float) -> None:
    t0 = time.monotonic()
    status, ok, why = "error", False, ""
    try:
        if kind == "embed":
            body = {"input": random.sample(SENTENCES, 4)}
            r = await client.post("/v1/embeddings", json=body)
            status, ok, why = str(r.status_code), _acceptable(r.status_code, r.headers), r.text
        else:
            body = {"messages": [{"role": "user", "content": random.choice(PROMPTS)}], "max_tokens": 16,
                    "temperature": 0.7, "stream": kind == "stream"}
            if kind == "chat":
                r = await client.post("/v1/chat/completions", json=body)
                status, ok, why = str(r.status_code), _acceptable(r.status_code, r.headers), r.text
            else:
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    status, ok = str(r.status_code), _acceptable(r.status_code, r.headers)
                    text = ""
                    async for chunk in r.aiter_text():
                        text += chunk
                    why = text[-300:]
                    if r.status_code == 200:
                        if '"error"' in text:  # failed after the first token
                            status, ok = "200+error", False
                        elif "[DONE]" not in text:
                            status, ok = "200-truncated", False
    except httpx.HTTPError as exc:
        status, ok, why = type(exc).__name__, False, str(exc)
    took = time.monotonic() - t0
    rec.add(kind, status, took, ok, why, t0 - t_start)
    if took > slow_s:
        rec.slow.append({"kind": kind, "status": status, "seconds": round(took, 1), "at_s": round(t0 - t_start, 1)})


async def load(url: str, clients: int, seconds: float, rec: Recorder, slow_s: float) -> None:
    kinds = ["chat", "chat", "stream", "embed", "embed"]
    # keep-alive expires on this side before the node's 5 s (TARS_KEEPALIVE_S), as a client should:
    # otherwise a request sent on a connection the node is closing that instant fails (ReadError)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=3.0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        t_start = time.monotonic()
        end = t_start + seconds

        async def worker(i: int) -> None:
            rnd = random.Random(i)
            while time.monotonic() < end:
                await one(client, rnd.choice(kinds), rec, t_start, slow_s)

        await asyncio.gather(*(worker(i) for i in range(clients)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers(ap, minutes=10.0, clients=32, down_s=(20.0, "seconds PC2 stays dead each time"), slow_s=30.0)
    ap.add_argument("--backend", default="", help="TARS_BACKEND_OVERRIDE for both nodes (e.g. fake)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--pin", action="store_true", help="PC1 on one CPU, PC2 on another (two hosts, a core each)")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        ap.error("--pin needs two CPUs")
    cmd = (lambda i: {"command": pinned(cpus[i]), "address_env": True}) if args.pin else (lambda i: {})

    logdir = Path(tempfile.mkdtemp(prefix="tars-soak-"))
    common = {"TARS_CLUSTER_TOKEN": TOKEN, "TARS_LOG_LEVEL": "warning", "TARS_HEARTBEAT_S": "1"}
    if args.backend:
        common["TARS_BACKEND_OVERRIDE"] = args.backend
    pc1 = ServerProcess("pc1", "127.0.0.2", ports=range(18780, 18790), log_dir=logdir, **cmd(0),
                        env={**common, "TARS_GPU_PROFILE": "rtx3060-12gb", "TARS_LOG_LEVEL": "info"})
    pc1.start(timeout=300)
    pc2 = ServerProcess("pc2", "127.0.0.3", ports=range(18790, 18800), log_dir=logdir, **cmd(1),
                        env={**common, "TARS_GPU_PROFILE": "gtx1660s-6gb", "TARS_PEERS": pc1.url})
    rec = Recorder()
    seconds = args.minutes * 60
    rss: dict[str, float] = {}
    events: list[str] = []
    try:
        pc2.start(timeout=300)

        def joined() -> bool:
            peers = httpx.get(pc1.url + "/status", timeout=5).json().get("peers", [])
            return any(p["name"] == "pc2" and p["state"] == "alive" for p in peers)

        wait_until(joined, 120, "pc2 joined pc1", pc1, pc2)
        wait_until(lambda: httpx.get(pc2.url + "/health", timeout=5).status_code == 200, 300, "pc2 ready", pc2)
        rss["start"] = rss_mb(pc1.pid)
        rss["start_node_only"] = rss_mb(pc1.pid, children=False)

        async def chaos(t0: float) -> None:
            await asyncio.sleep(min(60.0, seconds / 4))
            rss["after_1min"] = rss_mb(pc1.pid)
            rss["after_1min_node_only"] = rss_mb(pc1.pid, children=False)
            for k in (1, 2):
                await asyncio.sleep(max(0.0, t0 + k * seconds / 3 - time.monotonic()))
                pc2.kill()
                events.append(f"{time.monotonic() - t0:.0f}s: pc2 killed")
                await asyncio.sleep(args.down_s)
                await asyncio.to_thread(pc2.start, 300)
                events.append(f"{time.monotonic() - t0:.0f}s: pc2 healthy again")

        async def run() -> None:
            t0 = time.monotonic()
            await asyncio.gather(load(pc1.url, args.clients, seconds, rec, args.slow_s), chaos(t0))

        asyncio.run(run())
        time.sleep(3.0)
        rss["end"] = rss_mb(pc1.pid)
        rss["end_node_only"] = rss_mb(pc1.pid, children=False)
    finally:
        pc2.stop()
        pc1.stop()

    total = sum(rec.statuses.values())
    growth = (rss["end"] - rss["after_1min"]) / rss["after_1min"] if rss.get("after_1min") else None
    out = {
        "minutes": args.minutes, "clients": args.clients, "backend": args.backend or "real", "pinned": args.pin,
        "requests": total,
        "statuses": dict(sorted(rec.statuses.items())), "failed": len(rec.bad), "failures": rec.bad[:20],
        "over_slow_s_count": len(rec.slow), "over_slow_s": rec.slow[:20], "events": events,
        "latency_s": {k: {"p50": round(statistics.median(v), 3) if v else None, "p99": round(percentile(v, 0.99), 3),
                          "max": round(max(v), 3) if v else None, "n": len(v)} for k, v in rec.latencies.items()},
        "pc1_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_growth_after_first_minute": None if growth is None else round(growth, 4),
        "pass": {"no_bad_5xx": not rec.bad, "none_over_slow_s": not rec.slow,
                 "rss_within_10pct": growth is not None and abs(growth) <= 0.10},
        "logs": str(logdir),
    }
    report(out, args.json)
    return 0 if all(out["pass"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
