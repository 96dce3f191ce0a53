"""How the llama-server engine's RAM grows with its prompt cache (TARS_ENGINE_CACHE_MB).

llama.cpp's server keeps the states of finished prompts in RAM for reuse (``--cache-ram``),
8 GB at most by default — memory no planner line accounts for. This starts a node on
127.0.0.2 serving the instruct chat model with ``TARS_CHAT_ENGINE=server``, once per
``--cache-mb`` value (default: 0, the node's default, and 8192, llama.cpp's), sends
``--requests`` short chat requests with distinct prompts 4 at a time, and reports the
engine child's RSS after every ``--every`` requests.

    .venv/bin/python -m benchmarks.bench_engine_cache
    .venv/bin/python -m benchmarks.bench_engine_cache --requests 200 --cache-mb 0 256
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.soak import rss_mb  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

CHAT = "smollm2-135m-instruct"
WORDS = "apple river stone cloud music engine garden silver window thunder".split()


def engine_rss(node: ServerProcess) -> float:
    return rss_mb(node.pid) - rss_mb(node.pid, children=False)


def run(cache_mb: int, requests: int, every: int) -> list[tuple[int, float]]:
    node = ServerProcess("pc1", "127.0.0.2", ports=range(19600, 19700),
                         env={"TARS_CLUSTER_TOKEN": "bench-cache", "TARS_MODELS": CHAT, "TARS_CHAT_ENGINE": "server",
                              "TARS_ENGINE_CACHE_MB": str(cache_mb), "TARS_LOG_LEVEL": "warning",
                              "TARS_SPECULATIVE": "off"})
    rnd = random.Random(cache_mb)
    with node:
        node.start(timeout=300)
        client = httpx.Client(base_url=node.url, timeout=120)

        def one(i: int) -> None:
            text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(5, 60)))
            r = client.post("/v1/chat/completions", json={"model": CHAT, "max_tokens": 16,
                                                          "messages": [{"role": "user", "content": f"{i}: {text}"}]})
            r.raise_for_status()

        points = [(0, round(engine_rss(node), 1))]
        with ThreadPoolExecutor(4) as pool:
            for done in range(every, requests + 1, every):
                list(pool.map(one, range(done - every, done)))
                points.append((done, round(engine_rss(node), 1)))
        client.close()
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[0, 8192])
    args = ap.parse_args()
    out = {str(mb): run(mb, args.requests, args.every) for mb in args.cache_mb}
    print(json.dumps({"engine_rss_mb_after_n_requests": out}, indent=1))


if __name__ == "__main__":
    main()
