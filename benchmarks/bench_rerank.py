"""Rerank with the embedded MiniLM: POST /v1/rerank through the node vs the library directly.

The node side: the real app and node in this process (httpx ASGI transport, no socket),
/v1/rerank with ``--docs`` documents (cosine similarity through the model's micro-batcher).
The direct side: sentence-transformers ``encode`` of the query and documents (normalised)
and one matrix product, on the model the node loaded. Runs alternate so both see the same
machine load; the ratio is direct time / node time (1.0 = no overhead).

    .venv/bin/python -m benchmarks.bench_rerank [--docs 100] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from distributed.api.app import create_app  # noqa: E402
from distributed.domain import HostProfile  # noqa: E402
from distributed.service import build  # noqa: E402
from distributed.settings import load_settings  # noqa: E402

EMB = "all-MiniLM-L6-v2"
WORDS = "the cat sat on a warm mat while distant rivers carried boats past quiet towns at dusk".split()


def _docs(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(8 + i % 12)) + f" {i}" for i in range(n)]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    settings = load_settings(None, node_name="bench", models_dir=tempfile.mkdtemp(), models=[EMB])
    service = build(settings, profile=HostProfile(hostname="bench", cpu_model="cpu", cpu_cores=2, ram_total_mb=8000,
                                                  ram_free_mb=4000))
    node, app = service.node, create_app(service)
    docs, query = _docs(args.docs), "a boat on the river at dusk"
    async with app.router.lifespan_context(app):
        target = node.targets[EMB]
        await target.wait_loaded(300)
        model = target.backend._model
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                     timeout=300) as client:
            node_ms, direct_ms = [], []
            for _ in range(args.runs + 1):  # the first pair warms both up and is not counted
                t0 = time.perf_counter()
                r = await client.post("/v1/rerank", json={"model": EMB, "query": query, "documents": docs})
                t1 = time.perf_counter()
                assert r.status_code == 200, r.text
                vecs = await asyncio.to_thread(model.encode, [query, *docs], batch_size=settings.embed_max_batch,
                                               convert_to_numpy=True, normalize_embeddings=True,
                                               show_progress_bar=False)
                scores = vecs[1:] @ vecs[0]
                t2 = time.perf_counter()
                top_direct = int(scores.argmax())
                assert r.json()["results"][0]["index"] == top_direct
                node_ms.append((t1 - t0) * 1000)
                direct_ms.append((t2 - t1) * 1000)
            node_med, direct_med = statistics.median(node_ms[1:]), statistics.median(direct_ms[1:])
            print(json.dumps({"docs": args.docs, "runs": args.runs, "node_ms_median": round(node_med, 1),
                              "direct_ms_median": round(direct_med, 1),
                              "ratio_direct_over_node": round(direct_med / node_med, 2)}))


if __name__ == "__main__":
    asyncio.run(main())
