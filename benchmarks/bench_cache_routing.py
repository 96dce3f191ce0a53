"""Cache-aware routing among replicas (issue 18.3) against least-loaded routing, side by side.

Three real nodes on 127.0.0.2 / .3 / .4, each with its own llama-server child, serve the
embedded SmolLM2 as three replicas (``POST /models {"replicas": 3}``, ``deploy --replicas 3``'s
path). ``--conversations`` clients each hold a 4-turn chat conversation with its own long
system prompt (about ``--system-tokens`` tokens, so a turn that lands where its prompt is not
cached pays a visible prefill), sent to pc1, streamed at temperature 0, the turns of one
conversation one after another and the conversations at once. The same conversations run
under ``TARS_ROUTING=cache`` and ``TARS_ROUTING=least-loaded``: the nodes are restarted for
each setting (fresh caches), and the order alternates across rounds so both see the same
machine load.

    .venv/bin/python -m benchmarks.bench_cache_routing [--rounds 2] [--conversations 6] [--turns 4]
        [--system-tokens 1200] [--max-tokens 48] [--threads 0] [--json out.json]

Reports, per setting: the median time to first token of each turn (turn 1 always pays the
prefill; turns 2-4 are where the cache counts), the mean and 90th percentile over turns 2-4
(a turn that lands away from its cache is the tail: the median hides it), aggregate
completion tokens/s over the whole phase, and pc1's routing counters (cache hits, misses,
overridden by load); and the ratios cache / least-loaded (tokens/s also paired by round).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cli import json_option, numbers, report  # noqa: E402
from distributed.cpus import physical_cores  # noqa: E402
from tests.support import ServerFailed, ServerProcess, wait_until  # noqa: E402

MODEL = "smollm2-135m-instruct"
HOSTS = (("pc1", "127.0.0.2", "rtx3060-12gb"), ("pc2", "127.0.0.3", "gtx1660s-6gb"), ("pc3", "127.0.0.4", "gtx1660s-6gb"))
PORTS = range(18960, 18990)
TOKEN = "bench-cache-routing"
TOPICS = ("rivers", "volcanoes", "bread baking", "sailing", "chess openings", "beekeeping", "glaciers", "violins",
          "tea", "bridges", "comets", "forests")
QUESTIONS = ("Give me one short fact.", "Tell me one more.", "Another, please.", "And a last one.",
             "One more?", "Anything else?")


def system_prompt(i: int, tokens: int) -> str:
    """Conversation ``i``'s own long system prompt (~``tokens`` tokens of SmolLM2)."""
    topic = TOPICS[i % len(TOPICS)]
    rules = [f"Rule {n} for {topic} (conversation {i}): keep answers about {topic} short, plain and kind."
             for n in range(max(1, tokens // 20))]
    return f"You are a helpful expert on {topic}. " + " ".join(rules)


# --------------------------------------------------------------------------- nodes
def models_dir(logdir: Path) -> Path:
    """A fresh models folder per phase (the cluster's state and known peers live there: each
    phase starts a new cluster), with the GGUFs already assembled in .test-cache linked in."""
    d = logdir / "models"
    d.mkdir(parents=True, exist_ok=True)
    shared = ROOT / ".test-cache" / "models"
    for f in shared.glob("*.gguf") if shared.is_dir() else ():
        (d / f.name).symlink_to(f)
    return d


def start_cluster(routing: str, threads: int, context: int, logdir: Path) -> list[ServerProcess]:
    common = {"TARS_CLUSTER_TOKEN": TOKEN, "TARS_ROUTING": routing, "TARS_THREADS": str(threads),
              "TARS_CONTEXT": str(context), "TARS_PARALLEL": "4", "TARS_CHAT_ENGINE": "server",
              "TARS_SPECULATIVE": "off",  # as measured in docs/BENCHMARKS.md (routing, not decoding)
              "TARS_MODELS": "gemma-3-270m", "TARS_LOG_LEVEL": "info", "TARS_HEARTBEAT_S": "0.5",
              "TARS_MODELS_DIR": str(models_dir(logdir))}
    if os.environ.get("TARS_ENGINE_BIN"):
        common["TARS_ENGINE_BIN"] = os.environ["TARS_ENGINE_BIN"]
    procs: list[ServerProcess] = []
    try:
        for name, host, preset in HOSTS:
            env = {**common, "TARS_GPU_PROFILE": preset, **({"TARS_PEERS": procs[0].url} if procs else {})}
            p = ServerProcess(name, host, ports=PORTS, log_dir=logdir, env=env)  # each on its own address
            procs.append(p.start(timeout=240, ready=(None if not procs else lambda: True)))
        pc1 = procs[0].url
        wait_until(lambda: sum(1 for p in httpx.get(f"{pc1}/status", timeout=5).json()["peers"]
                               if p["state"] == "alive") == 2, 120, "two workers joined", *procs)
        r = httpx.post(f"{pc1}/models", json={"model": MODEL, "replicas": 3}, timeout=60)
        assert r.status_code in (200, 202), r.text
        wait_until(lambda: all(len(ready_replicas(p.url)) == 3 for p in procs), 300,
                   "three ready replicas seen from every node", *procs, interval=0.5)
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise
    return procs


def model_row(url: str) -> dict[str, Any]:
    return {m["id"]: m for m in httpx.get(f"{url}/models", timeout=5).json()["models"]}.get(MODEL, {})


def ready_replicas(url: str) -> set[str]:
    return {r["node"] for r in model_row(url).get("replicas", []) if r["state"] == "ready"}


def slot_counts(procs: list[ServerProcess]) -> dict[str, int]:
    """Slot affinity hits and misses of the three engines together (each node's own copy)."""
    rows = [model_row(p.url).get("slot_affinity") or {} for p in procs]
    return {k: sum(int(r.get(k, 0)) for r in rows) for k in ("hits", "misses")}


# --------------------------------------------------------------------------- load
async def chat(client: httpx.AsyncClient, url: str, messages: list[dict[str, str]], max_tokens: int
               ) -> tuple[float, str, int]:
    """One streamed turn: (seconds to the first token, the answer, completion tokens)."""
    import orjson

    t0 = time.perf_counter()
    first: float | None = None
    text, tokens = [], 0
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter()
                    text.append(piece)
            if chunk.get("usage"):
                tokens = int(chunk["usage"].get("completion_tokens") or 0)
    return (first or time.perf_counter()) - t0, "".join(text), tokens or len(text)


async def conversations(url: str, n: int, turns: int, system_tokens: int, max_tokens: int) -> dict[str, Any]:
    ttft: list[list[float]] = [[] for _ in range(turns)]
    total = [0]

    async def one(i: int, client: httpx.AsyncClient) -> None:
        messages = [{"role": "system", "content": system_prompt(i, system_tokens)}]
        for t in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]})
            s, answer, tokens = await chat(client, url, messages, max_tokens)
            ttft[t].append(s)
            total[0] += tokens
            messages.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    later = sorted(x for turn in ttft[1:] for x in turn)  # turns 2..: where the cache counts (the tail = misses)
    return {"ttft_median_ms": [round(statistics.median(x) * 1000, 1) for x in ttft],
            "later_turns_ttft_mean_ms": round(statistics.fmean(later) * 1000, 1) if later else None,
            "later_turns_ttft_p90_ms": round(later[int(0.9 * (len(later) - 1))] * 1000, 1) if later else None,
            "tokens": total[0], "wall_s": round(wall, 2), "tokens_per_s": round(total[0] / wall, 2)}


async def warm_up(procs: list[ServerProcess]) -> None:
    """One short turn sent to each node (its idle copy here takes it): first-call costs out of the way."""
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        for p in procs:
            await chat(client, p.url, [{"role": "user", "content": "Hi"}], 4)


def phase(routing: str, args: argparse.Namespace, threads: int, logdir: Path) -> dict[str, Any]:
    procs = start_cluster(routing, threads, args.context, logdir / routing)
    try:
        asyncio.run(warm_up(procs))
        before, slots_before = model_row(procs[0].url).get("routing", {}), slot_counts(procs)
        out = asyncio.run(conversations(procs[0].url, args.conversations, args.turns, args.system_tokens,
                                        args.max_tokens))
        after, slots_after = model_row(procs[0].url).get("routing", {}), slot_counts(procs)
        out["routing"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "misses", "overridden")}
        out["slot_affinity"] = {k: slots_after[k] - slots_before[k] for k in ("hits", "misses")}
        return out
    finally:
        for p in reversed(procs):
            p.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers(ap, rounds=2, conversations=6, turns=4, system_tokens=1200, max_tokens=48, context=4096,
            threads=(0, "TARS_THREADS of each node; 0 = the physical cores / 3 (three engines share the machine)"))
    json_option(ap)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes (timeout, kill)
    threads = args.threads or max(1, physical_cores() // 3)
    logdir = Path(tempfile.mkdtemp(prefix="bench-cache-routing-"))
    print(f"logs in {logdir}; TARS_THREADS={threads} per node", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"cache": [], "least-loaded": []}
    try:
        for rnd in range(args.rounds):
            order = ("cache", "least-loaded") if rnd % 2 == 0 else ("least-loaded", "cache")
            for routing in order:
                r = phase(routing, args, threads, logdir / f"round{rnd + 1}")
                runs[routing].append(r)
                print(f"round {rnd + 1} {routing}: {r}", flush=True)
    except ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    results: dict[str, Any] = {"command": " ".join(sys.argv), "threads": threads, "runs": runs}
    for routing, rs in runs.items():
        results[routing] = {
            "ttft_median_ms": [round(statistics.median(r["ttft_median_ms"][t] for r in rs), 1)
                               for t in range(args.turns)],
            "later_turns_ttft_mean_ms": round(statistics.median(r["later_turns_ttft_mean_ms"] for r in rs), 1),
            "later_turns_ttft_p90_ms": round(statistics.median(r["later_turns_ttft_p90_ms"] for r in rs), 1),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rs), 2),
            "routing": {k: sum(r["routing"][k] for r in rs) for k in ("hits", "misses", "overridden")},
            "slot_affinity": {k: sum(r["slot_affinity"][k] for r in rs) for k in ("hits", "misses")}}
    c, ll = results["cache"], results["least-loaded"]
    results["ratio_cache_over_least_loaded"] = {
        "ttft_per_turn": [round(a / b, 3) if b else None for a, b in zip(c["ttft_median_ms"], ll["ttft_median_ms"])],
        "later_turns_ttft_mean": round(c["later_turns_ttft_mean_ms"] / ll["later_turns_ttft_mean_ms"], 3),
        "later_turns_ttft_p90": round(c["later_turns_ttft_p90_ms"] / ll["later_turns_ttft_p90_ms"], 3),
        "tokens_per_s": round(c["tokens_per_s"] / ll["tokens_per_s"], 3) if ll["tokens_per_s"] else None,
        "tokens_per_s_paired": round(statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in
                                                       zip(runs["cache"], runs["least-loaded"])), 3)}
    results["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report(results, args.json)


if __name__ == "__main__":
    main()
