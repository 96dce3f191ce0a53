"""Chat through Ollama's API vs ``/v1/chat/completions``, on the same node (issue 17's speed target).

Starts one ``python -m distributed serve`` on 127.0.0.2 (``tests/support.ServerProcess``) with
``TARS_CHAT_ENGINE=server`` and one chat model, then sends the same streamed requests through
both dialects: ``POST /api/chat`` (NDJSON, ``options.num_predict``/``temperature``) and
``POST /v1/chat/completions`` (SSE, ``max_tokens``/``temperature``) — the same prompt but for a
distinct start per request (so the engine's prompt cache favours neither side), temperature 0,
the same token budget. Requests go in pairs, one a side back to back, the side going first
alternating pair by pair, one request at a time: only the dialect differs. The client is a
minimal asyncio HTTP/1.1 reader (it shares the CPU with the node and its engine).

Reported per side: streamed decode tokens/s ((pieces − 1) / (last − first piece)) and time to
first token, medians over every request; the ratio Ollama / OpenAI of those medians and the
median of the pairs' ratios — the target is decode ≥ 0.97×: one translation, no extra hop;
the node process's own CPU per streamed token (psutil; its llama-server child not counted);
and, first, the node's own cost of a whole streamed request per dialect in process (the fake
engine, no sockets), which a loaded machine blurs least.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_ollama --threads 1                 # ~3-6 min on 2 cores
    .venv/bin/python -m benchmarks.bench_ollama --rounds 3 --max-tokens 32   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.2"
PROMPT = "Write a short story about a lighthouse keeper and a storm."


def _bodies(model: str, prompt: str, max_tokens: int) -> dict[str, tuple[bytes, bytes]]:
    messages = [{"role": "user", "content": prompt}]
    return {
        "ollama": (b"/api/chat", orjson.dumps({"model": model, "messages": messages, "stream": True,
                                                "options": {"num_predict": max_tokens, "temperature": 0}})),
        "openai": (b"/v1/chat/completions", orjson.dumps({"model": model, "messages": messages, "stream": True,
                                                          "max_tokens": max_tokens, "temperature": 0})),
    }


def _content(side: str, line: bytes) -> bool:
    """Whether one line of the answer carries generated text."""
    if side == "ollama":
        obj = orjson.loads(line)
        return not obj.get("done") and bool((obj.get("message") or {}).get("content"))
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return False
    choices = orjson.loads(line[6:]).get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


async def _body_pieces(reader: asyncio.StreamReader, chunked: bool) -> Any:
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while size := int((await reader.readline()).strip() or b"0", 16):
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_once(port: int, side: str, path: bytes, body: bytes) -> dict[str, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: %d\r\n\r\n%s" % (path, HOST.encode(), len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"{side} request failed: {status!r} {(await reader.read(2000))[-500:]!r}")
    chunked = False
    while (header := await reader.readline()) not in (b"\r\n", b""):
        chunked |= header.lower().startswith(b"transfer-encoding:") and b"chunked" in header.lower()
    first = last = None
    n, buf = 0, b""
    async for data in _body_pieces(reader, chunked):
        buf += data
        *complete, buf = buf.split(b"\n")
        for line in complete:
            if line.strip() and _content(side, line.strip()):
                n += 1
                last = time.perf_counter()
                first = first or last
    writer.close()
    if first is None or last is None:
        raise SystemExit(f"{side}: no content streamed")
    return {"ttft_ms": (first - t0) * 1000, "tokens": n,
            "decode_tps": (n - 1) / (last - first) if n > 1 and last > first else 0.0}


def cpu_s(pid: int) -> float:
    """CPU seconds the node's own process has used (its llama-server child not included)."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def run(port: int, pid: int, model: str, rounds: int, requests: int,
              max_tokens: int) -> tuple[dict[str, list[dict[str, float]]], dict[str, float], list[float]]:
    """Pairs of requests, one a side with the same prompt back to back, the side that goes
    first alternating pair by pair (a load that drifts hits both alike)."""
    results: dict[str, list[dict[str, float]]] = {"ollama": [], "openai": []}
    cpu = {"ollama": 0.0, "openai": 0.0}
    ratios: list[float] = []
    for side in results:  # warm-up, not counted
        await stream_once(port, side, *_bodies(model, f"warm-up. {PROMPT}", max_tokens)[side])
    for r in range(rounds):
        for i in range(requests):
            pair: dict[str, dict[str, float]] = {}
            for side in (("ollama", "openai") if (r * requests + i) % 2 == 0 else ("openai", "ollama")):
                prompt = f"{side.title()} round {r} request {i}. {PROMPT}"  # its own start: no prompt cache hit
                c0 = cpu_s(pid)
                pair[side] = await stream_once(port, side, *_bodies(model, prompt, max_tokens)[side])
                cpu[side] += cpu_s(pid) - c0
                results[side].append(pair[side])
            if pair["openai"]["decode_tps"]:
                ratios.append(pair["ollama"]["decode_tps"] / pair["openai"]["decode_tps"])
        got = ratios[-requests:]
        print(f"round {r + 1}/{rounds}: ollama / openai decode, pair by pair: "
              + ", ".join(f"{x:.3f}" for x in got), flush=True)
    return results, cpu, ratios


async def inprocess(pairs: int, tokens: int) -> dict[str, float]:
    """The node's own cost of one whole streamed request per dialect, in process (httpx's ASGI
    transport, the fake engine, no sockets): parse, translate, route, ``tokens`` pieces, the
    answer. Medians over ``pairs`` pairs, the side going first alternating."""
    import httpx

    from distributed.api.app import create_app
    from distributed.domain import HostProfile
    from distributed.service import build
    from distributed.settings import load_settings

    settings = load_settings(None, node_name="bench", backend_override="fake", models_dir=tempfile.mkdtemp(),
                             models=["smollm2-135m-instruct"])
    service = build(settings, profile=HostProfile(hostname="bench", cpu_model="-", cpu_cores=2, ram_total_mb=8000,
                                                  ram_free_mb=4000), backend_extra={"reply_tokens": tokens})
    node, app = service.node, create_app(service)
    times: dict[str, list[float]] = {"ollama": [], "openai": []}
    async with app.router.lifespan_context(app):
        for target in node.local_targets():
            await target.wait_loaded(30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for i in range(pairs):
                for side in (("ollama", "openai") if i % 2 == 0 else ("openai", "ollama")):
                    path, body = _bodies("smollm2-135m-instruct", PROMPT, tokens)[side]
                    t0 = time.perf_counter()
                    async with client.stream("POST", path.decode(), content=body,
                                             headers={"content-type": "application/json"}) as resp:
                        async for _ in resp.aiter_bytes():
                            pass
                    times[side].append((time.perf_counter() - t0) * 1000)
    return {side: statistics.median(v) for side, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".test-cache" / "models")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=3, help="pairs of requests (one a side) per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0 = the node's default")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--inprocess-pairs", type=int, default=300, help="pairs for the in-process cost (0: skip)")
    args = ap.parse_args()

    from tests.support import ServerProcess

    if args.inprocess_pairs:
        cost = asyncio.run(inprocess(args.inprocess_pairs, 8))
        print(f"in process (fake engine, 8 pieces), the whole streamed request: ollama {cost['ollama']:.3f} ms, "
              f"openai {cost['openai']:.3f} ms ({cost['ollama'] - cost['openai']:+.3f} ms)", flush=True)

    env = {"TARS_MODELS": args.model, "TARS_CHAT_ENGINE": "server", "TARS_PARALLEL": "1",
           "TARS_CONTEXT": str(args.context), "TARS_LOG_LEVEL": "warning", "TARS_MODELS_DIR": str(args.models_dir)}
    if args.threads:
        env["TARS_THREADS"] = str(args.threads)
    if os.environ.get("TARS_ENGINE_BIN"):
        env["TARS_ENGINE_BIN"] = os.environ["TARS_ENGINE_BIN"]
    logs = Path(tempfile.mkdtemp(prefix="bench-ollama-"))
    print(f"{args.model}, llama-server engine, {args.rounds} rounds × {args.requests} requests per side × "
          f"{args.max_tokens} tokens, threads {args.threads or 'default'}; logs in {logs}", flush=True)
    with ServerProcess("bench-ollama", HOST, ports=range(19280, 19300), env=env, log_dir=logs) as node:
        node.start(timeout=300)
        load0 = os.getloadavg()[0]
        results, cpu, ratios = asyncio.run(run(node.port, node.pid, args.model, args.rounds, args.requests,
                                               args.max_tokens))
        load1 = os.getloadavg()[0]
    med = {side: {k: statistics.median(r[k] for r in runs) for k in ("decode_tps", "ttft_ms", "tokens")}
           for side, runs in results.items()}
    print(f"\n{'(medians of ' + str(len(results['ollama'])) + ' requests a side)':<40} {'ollama':>10} {'openai':>10} "
          f"{'ratio':>8}")
    print(f"{'decode tokens/s':<40} {med['ollama']['decode_tps']:>10.1f} {med['openai']['decode_tps']:>10.1f} "
          f"{med['ollama']['decode_tps'] / med['openai']['decode_tps']:>7.3f}x   (target >= 0.97x)")
    print(f"{'decode ratio, median of the pairs':<40} {'':>10} {'':>10} {statistics.median(ratios):>7.3f}x")
    print(f"{'time to first token, ms':<40} {med['ollama']['ttft_ms']:>10.1f} {med['openai']['ttft_ms']:>10.1f} "
          f"{med['ollama']['ttft_ms'] - med['openai']['ttft_ms']:>+7.1f} ms")
    print(f"{'tokens streamed':<40} {med['ollama']['tokens']:>10.0f} {med['openai']['tokens']:>10.0f}")
    per_token = {side: cpu[side] * 1000 / max(1, sum(r["tokens"] for r in runs)) for side, runs in results.items()}
    print(f"{'node process CPU per token, ms':<40} {per_token['ollama']:>10.3f} {per_token['openai']:>10.3f} "
          f"{per_token['ollama'] - per_token['openai']:>+7.3f} ms   (its llama-server child not counted)")
    print(f"load average (1 min): {load0:.2f} before, {load1:.2f} after")


if __name__ == "__main__":
    main()
