"""Cluster benchmarks (issue 4): the /rpc channel, chat through a peer, embeddings through a peer.

Starts two real nodes on loopback with the embedded models — PC1 (127.0.0.2, simulated
RTX 3060: computes chat) and PC2 (127.0.0.3, simulated GTX 1660 SUPER, joins PC1:
computes embeddings) — then measures, alternating the two sides in one run so both see
the same machine load:

1. channel: a small call (``node.health`` through ``PeerClient``, the client nodes use)
   — median latency sequentially, and calls/s with 8 in flight;
2. chat: ``/v1/chat/completions`` streamed, received by PC2 and computed on PC1 vs sent
   straight to PC1 — decode tokens/s (tokens after the first / time after the first) and
   time to first token; targets ≥ 0.95× decode and ≤ +10 ms first token;
3. embeddings: 32 concurrent clients, one sentence per request, ``/v1/embeddings`` received
   by PC1 and computed on PC2 vs sent straight to PC2 — requests/s; target ≥ 0.9×.

The load client for (3) is a minimal keep-alive HTTP/1.1 client on asyncio streams, so
its own cost stays small and identical for both sides.

    .venv/bin/python -m benchmarks.bench_cluster                 # spawn both nodes
    .venv/bin/python -m benchmarks.bench_cluster --rounds 5 --json out.json
    .venv/bin/python -m benchmarks.bench_cluster --pc1 http://A:8000 --pc2 http://B:8001 --token T
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from distributed.cpus import physical_cores
from tests.support import ROOT, ServerFailed, ServerProcess, wait_until

CHAT, EMB = "gemma-3-270m", "all-MiniLM-L6-v2"
PROMPT = "Write a long story about a cat who learns to sail."
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed inference lets two home computers act as one service.",
    "A short one.",
    "Embeddings map sentences to vectors so that similar meanings are close together in space.",
    "What time does the train to Lyon leave tomorrow morning?",
    "GPUs with little memory still run small models well.",
    "She sells sea shells by the sea shore.",
    "The heartbeat tells each node that its peer is still alive.",
]


# --------------------------------------------------------------------------- nodes
def spawn(name: str, host: str, ports: range, preset: str, token: str, logdir: Path, **env: str) -> ServerProcess:
    return ServerProcess(name, host, ports=ports, log_dir=logdir,
                         env={"TARS_GPU_PROFILE": preset, "TARS_CLUSTER_TOKEN": token, "TARS_LOG_LEVEL": "warning",
                              **env})


def ready(pc1: str, pc2: str) -> bool:
    """Both healthy, chat computed on pc1 and embeddings on pc2, as seen from both."""
    m1 = {m["id"]: m for m in httpx.get(pc1 + "/models", timeout=5).json()["models"]}
    m2 = {m["id"]: m for m in httpx.get(pc2 + "/models", timeout=5).json()["models"]}
    return (httpx.get(pc1 + "/health", timeout=5).status_code == 200
            and httpx.get(pc2 + "/health", timeout=5).status_code == 200
            and m1.get(EMB, {}).get("state") == "ready" and m1[EMB]["node"] == "pc2"
            and m2.get(CHAT, {}).get("state") == "ready" and m2[CHAT]["node"] == "pc1")


# --------------------------------------------------------------------------- 1. channel
async def bench_channel(url: str, token: str, n: int = 400, seconds: float = 3.0) -> dict[str, Any]:
    from distributed.rpc.client import PeerClient

    client = PeerClient(url, token)
    for _ in range(20):
        await client.call("node.health")
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.call("node.health")
        lat.append((time.perf_counter() - t0) * 1000)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.call("node.health")
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(8)))
    rate = done / (time.perf_counter() - t0)
    await client.aclose()
    return {"median_ms": round(statistics.median(lat), 3), "p90_ms": round(sorted(lat)[int(0.9 * n)], 3),
            "calls_per_s": round(rate, 1)}


# --------------------------------------------------------------------------- 2. chat
def chat_once(url: str, max_tokens: int) -> dict[str, float]:
    body = {"model": CHAT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.0, "seed": 1, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    node = via = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            node = chunk.get("node", node)
            via = chunk.get("via", via)
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    if first is None or last is None or n < 2:
        raise SystemExit(f"chat through {url} produced {n} tokens")
    return {"ttft_ms": (first - t0) * 1000, "tokens_per_s": (n - 1) / (last - first), "tokens": n,
            "node": node, "via": via}


# --------------------------------------------------------------------------- 3. embeddings
class Conn:
    """One keep-alive HTTP/1.1 connection; just enough to POST JSON and read the answer."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await self._post(path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            # the server closed an idle keep-alive connection (uvicorn: after 5 s): reconnect once
            self.writer = None
            return await self._post(path, body)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def embed_run(url: str, clients: int, requests: int) -> dict[str, Any]:
    bodies = [json.dumps({"model": EMB, "input": SENTENCES[i % len(SENTENCES)] + f" #{i}"}).encode()
              for i in range(requests)]
    per = requests // clients
    conns = [Conn(url) for _ in range(clients)]
    # connect and warm up outside the timed part
    assert all(st == 200 for st, _ in await asyncio.gather(*(c.post("/v1/embeddings", bodies[0]) for c in conns)))
    sample: dict[str, Any] = {}

    async def worker(k: int) -> None:
        for j in range(per):
            status, raw = await conns[k].post("/v1/embeddings", bodies[k * per + j])
            if status != 200:
                raise SystemExit(f"/v1/embeddings on {url} answered {status}: {raw[:200]!r}")
            if k == 0 and j == per - 1:
                sample.update(json.loads(raw))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    for c in conns:
        await c.close()
    return {"requests_per_s": per * clients / elapsed, "node": sample.get("node"), "via": sample.get("via"),
            "fallback": sample.get("fallback")}


# --------------------------------------------------------------------------- main
def med(xs: list[float]) -> float:
    return statistics.median(xs)


def run(pc1: str, pc2: str, token: str, rounds: int, chat_tokens: int, embed_requests: int,
        clients: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": rounds}
    out["channel"] = asyncio.run(bench_channel(pc1, token))
    print(f"channel  node.health via PeerClient: median {out['channel']['median_ms']} ms, "
          f"p90 {out['channel']['p90_ms']} ms, {out['channel']['calls_per_s']} calls/s (8 in flight)", flush=True)

    chat_once(pc1, 8), chat_once(pc2, 8)  # warm both paths
    direct: list[dict[str, float]] = []
    routed: list[dict[str, float]] = []
    for r in range(rounds):
        order = [(pc1, direct), (pc2, routed)] if r % 2 == 0 else [(pc2, routed), (pc1, direct)]
        for url, into in order:
            into.append(chat_once(url, chat_tokens))
        print(f"chat     round {r + 1}: straight {direct[-1]['tokens_per_s']:.1f} tok/s ttft "
              f"{direct[-1]['ttft_ms']:.1f} ms | through pc2 {routed[-1]['tokens_per_s']:.1f} tok/s ttft "
              f"{routed[-1]['ttft_ms']:.1f} ms", flush=True)
    assert routed[-1]["node"] == "pc1" and routed[-1]["via"] == "pc2", routed[-1]
    out["chat"] = {
        "straight": {"tokens_per_s": round(med([d["tokens_per_s"] for d in direct]), 2),
                     "ttft_ms": round(med([d["ttft_ms"] for d in direct]), 2)},
        "through_pc2": {"tokens_per_s": round(med([d["tokens_per_s"] for d in routed]), 2),
                        "ttft_ms": round(med([d["ttft_ms"] for d in routed]), 2)},
        "tokens": int(med([d["tokens"] for d in direct])),
    }
    # Each round's two runs sit side by side in time, so their ratio cancels most of the
    # machine's load swings; the headline is the median of the per-round ratios.
    out["chat"]["decode_ratio"] = round(med([r["tokens_per_s"] / d["tokens_per_s"] for d, r in zip(direct, routed)]), 3)
    out["chat"]["ttft_delta_ms"] = round(med([r["ttft_ms"] - d["ttft_ms"] for d, r in zip(direct, routed)]), 2)
    out["chat"]["per_round"] = [{"straight": {k: round(d[k], 2) for k in ("tokens_per_s", "ttft_ms")},
                                 "through_pc2": {k: round(r[k], 2) for k in ("tokens_per_s", "ttft_ms")}}
                                for d, r in zip(direct, routed)]

    asyncio.run(embed_run(pc2, clients, clients * 4))  # warm
    asyncio.run(embed_run(pc1, clients, clients * 4))
    e_direct: list[float] = []
    e_routed: list[float] = []
    for r in range(rounds):
        order = [(pc2, e_direct), (pc1, e_routed)] if r % 2 == 0 else [(pc1, e_routed), (pc2, e_direct)]
        for url, into in order:
            res = asyncio.run(embed_run(url, clients, embed_requests))
            if url == pc1:
                assert res["node"] == "pc2" and res["via"] == "pc1" and not res["fallback"], res
            into.append(res["requests_per_s"])
        print(f"embed    round {r + 1}: straight to pc2 {e_direct[-1]:.0f} req/s | through pc1 "
              f"{e_routed[-1]:.0f} req/s", flush=True)
    out["embed"] = {"clients": clients, "requests": embed_requests,
                    "straight_rps": round(med(e_direct), 1), "through_pc1_rps": round(med(e_routed), 1)}
    out["embed"]["ratio"] = round(med([r / d for d, r in zip(e_direct, e_routed)]), 3)
    out["embed"]["per_round"] = [{"straight_rps": round(d, 1), "through_pc1_rps": round(r, 1)}
                                 for d, r in zip(e_direct, e_routed)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pc1", help="URL of a running PC1 (default: spawn one on a free port of 127.0.0.2:18510-18529)")
    ap.add_argument("--pc2", help="URL of a running PC2 joined to PC1 (default: spawn one on 127.0.0.3:18530-18549)")
    ap.add_argument("--token", default="bench-cluster-token")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--chat-tokens", type=int, default=96)
    ap.add_argument("--embed-requests", type=int, default=640)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0,
                    help="TARS_THREADS for the spawned nodes (default: the physical cores this process may use)")
    ap.add_argument("--models-dir", default=str(ROOT / ".test-cache" / "models"))
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes (timeout, kill)

    spawned: list[ServerProcess] = []
    pc1, pc2 = args.pc1, args.pc2
    try:
        if not (pc1 and pc2):
            threads = args.threads or physical_cores()
            logdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
            common = {"TARS_MODELS_DIR": args.models_dir, "TARS_THREADS": str(threads), "TARS_MODELS": f"{CHAT},{EMB}"}
            spawned.append(spawn("pc1", "127.0.0.2", range(18510, 18530), "rtx3060-12gb", args.token, logdir,
                                 **common).launch())
            spawned.append(spawn("pc2", "127.0.0.3", range(18530, 18550), "gtx1660s-6gb", args.token, logdir,
                                 TARS_PEERS=spawned[0].url, **common).launch())
            pc1, pc2 = spawned[0].url, spawned[1].url
            print(f"spawned pc1 {pc1} and pc2 {pc2} (TARS_THREADS={threads}); logs in {logdir}", flush=True)
        try:
            wait_until(lambda: ready(pc1, pc2), 300, "the two nodes ready (chat on pc1, embeddings on pc2)",
                       *spawned, interval=0.5)
        except ServerFailed as exc:
            raise SystemExit(str(exc)) from None
        results = run(pc1, pc2, args.token, args.rounds, args.chat_tokens, args.embed_requests, args.clients)
    finally:
        for s in spawned:
            s.stop()
    c, e = results["chat"], results["embed"]
    try:
        results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    print("\nresults (medians of the per-round ratios)")
    print(f"  channel: median {results['channel']['median_ms']} ms per small call, "
          f"{results['channel']['calls_per_s']} calls/s")
    print(f"  chat through pc2 vs straight to pc1: decode {c['decode_ratio']}x (target >= 0.95), "
          f"first token {c['ttft_delta_ms']:+.1f} ms (target <= +10)")
    print(f"  embeddings through pc1 vs straight to pc2, {e['clients']} clients: {e['ratio']}x (target >= 0.9)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
