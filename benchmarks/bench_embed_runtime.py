"""Embeddings through the node on each runtime vs sentence-transformers (torch) in process (issue 18.1).

Starts one ``python -m distributed serve`` per runtime on 127.0.0.2 — ``TARS_EMBED_RUNTIME``
torch, onnx, openvino and auto — all serving only the embedded all-MiniLM-L6-v2 from one models
folder (the exports are made by the first node that needs them and reused by the others), one
after the other so no two export at once. Then, round after round, alternating who goes first
so every side sees the same machine load, each workload runs on:

* the baseline: one in-process ``SentenceTransformer.encode`` (torch, the library's defaults:
  batches of ``--baseline-batch``) over the same sentences, in this process;
* each node through ``/v1/embeddings`` (``encoding_format`` base64, the openai client's
  default), from a minimal keep-alive asyncio HTTP client in this process.

Workloads: ``batched`` — 8 clients, 16 sentences per request; ``single`` — 32 clients, one
sentence per request. Reported: sentences/s, and each node's ratio to the baseline per round
(median over rounds). All processes share this machine's cores.

    .venv/bin/python -m benchmarks.bench_embed_runtime                 # full run
    .venv/bin/python -m benchmarks.bench_embed_runtime --rounds 3 --sentences 512 --runtimes torch,openvino
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_node import sentences
from benchmarks.inprocess import st_encode
from benchmarks.soak import rss_mb
from tests.support import ROOT, ServerFailed, ServerProcess

HOST = "127.0.0.2"
EMBED = "all-MiniLM-L6-v2"
WORKLOADS = {"batched": (8, 16), "single": (32, 1)}  # name: (clients, sentences per request)
TARGETS = {"batched": 1.5, "single": 0.6}


def node(runtime: str, models_dir: Path, extra_env: dict[str, str]) -> ServerProcess:
    env = {"TARS_MODELS": EMBED, "TARS_EMBED_RUNTIME": runtime, "TARS_GPU_PROFILE": "cpu", **extra_env}
    return ServerProcess(f"embed-{runtime}", HOST, ports=range(18550, 18600), env=env,
                         args=["--models-dir", str(models_dir), "--log-level", "warning"])


async def post_all(port: int, bodies: list[bytes], clients: int) -> float:
    """Seconds ``clients`` keep-alive connections take to post every body to /v1/embeddings."""
    it = iter(bodies)
    errors: list[str] = []

    async def conn() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for body in it:
                writer.write(b"POST /v1/embeddings HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line[15:]) for line in head.split(b"\r\n")
                              if line[:15].lower() == b"content-length:")
                data = await reader.readexactly(length)
                if head[9:12] != b"200":
                    errors.append(data.decode()[:200])
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(conn() for _ in range(clients)))
    took = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} embedding requests failed on port {port}, e.g. {errors[0]}")
    return took


def bodies_for(texts: list[str], per_request: int) -> list[bytes]:
    return [orjson.dumps({"model": EMBED, "input": texts[i:i + per_request], "encoding_format": "base64"})
            for i in range(0, len(texts), per_request)]


def run(ports: dict[str, int], texts: list[str], rounds: int, baseline_batch: int) -> dict[str, Any]:
    runner: Any = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        pass
    sides = ["in-process torch", *ports]
    st_encode(texts[:64], batch_size=baseline_batch)  # load + warm the in-process model
    out: dict[str, Any] = {}
    for name, (clients, per) in WORKLOADS.items():
        bodies = bodies_for(texts, per)
        for port in ports.values():  # warm each node on this shape
            runner(post_all(port, bodies[:clients * 2], clients))
        rates: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                if side == "in-process torch":
                    rates[side].append(st_encode(texts, batch_size=baseline_batch))
                else:
                    rates[side].append(len(texts) / runner(post_all(ports[side], bodies, clients)))
            print(f"  {name} round {r + 1}: " + " | ".join(f"{s} {rates[s][-1]:.0f}/s" for s in sides), flush=True)
        base = rates["in-process torch"]
        out[name] = {"clients": clients, "per_request": per, "sentences": len(texts),
                     "per_s": {s: round(statistics.median(v), 1) for s, v in rates.items()},
                     "ratio": {s: round(statistics.median(x / b for x, b in zip(rates[s], base)), 3)
                               for s in ports},
                     "rounds": {s: [round(x) for x in v] for s, v in rates.items()}}
    return out


def markdown(res: dict[str, Any], runtimes: list[str]) -> str:
    lines = [f"| workload | in-process torch, sentences/s | " + " | ".join(f"node {r}" for r in runtimes)
             + " | target |", "|---|---|" + "---|" * len(runtimes) + "---|"]
    for name, w in res["workloads"].items():
        cells = [f"{w['per_s'][r]:.0f} (**{w['ratio'][r]:.2f}x**)" for r in runtimes]
        lines.append(f"| {name}: {w['clients']} clients × {w['per_request']} sentence(s)/request | "
                     f"{w['per_s']['in-process torch']:.0f} | " + " | ".join(cells) + f" | >= {TARGETS[name]}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sentences", type=int, default=1024, help="sentences per workload round and side")
    ap.add_argument("--runtimes", default="torch,onnx,openvino,auto")
    ap.add_argument("--baseline-batch", type=int, default=32, help="encode batch of the in-process baseline")
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".test-cache" / "models")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the nodes (e.g. TARS_EMBED_MAX_WAIT_MS=4); repeatable")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    started: dict[str, ServerProcess] = {}
    res: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2), "server_env": extra,
                           "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}"}
    try:
        for rt in runtimes:  # one at a time: the first node that needs an export makes it
            proc = node(rt, args.models_dir, extra)
            print(f"starting the {rt} node ...", flush=True)
            try:
                proc.start(timeout=600)
            except ServerFailed as exc:
                raise SystemExit(str(exc)) from None
            started[rt] = proc
            row = next(m for m in httpx.get(f"{proc.url}/models", timeout=30).json()["models"] if m["id"] == EMBED)
            res.setdefault("runtime", {})[rt] = row.get("runtime")
            print(f"  {rt}: ready in {time.perf_counter() - proc.started_at:.1f} s, runs on "
                  f"{(row.get('runtime') or {}).get('why')}", flush=True)
        time.sleep(2.0)
        res["rss_mb"] = {rt: round(rss_mb(p.pid)) for rt, p in started.items()}
        res["workloads"] = run({rt: int(p.port or 0) for rt, p in started.items()}, sentences(args.sentences), args.rounds,
                               args.baseline_batch)
        res["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        for p in started.values():
            p.stop()
    print(json.dumps(res, indent=2))
    print()
    print(markdown(res, runtimes))


if __name__ == "__main__":
    main()
