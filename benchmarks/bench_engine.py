"""The node's llama-server engine vs a bare llama-server (issue 9's speed targets).

Starts, side by side on this machine:

* a bare ``llama-server`` (the same binary the node uses, ``binary.locate()``) on 127.0.0.1
  with the GGUF, ``-np PARALLEL``, ``-c PARALLEL × CONTEXT``, ``-t THREADS``, ``--jinja``;
* ``python -m distributed serve`` on 127.0.0.2 serving only that chat model with
  ``TARS_CHAT_ENGINE=server``, the same ``TARS_PARALLEL``/``TARS_CONTEXT``/``TARS_THREADS``
  (its own llama-server child gets the same arguments);

then alternates, round by round (the order flips each round), the same load on both:
1 stream and ``--streams`` concurrent streams (default 4), each client sending
``--per-client`` streamed ``/v1/chat/completions`` requests back to back (temperature 0,
a distinct prompt start per request so the prompt cache cannot fake the first token).
The client is a minimal asyncio HTTP/1.1 reader (cheap: it shares the CPU with the servers).
Only one side is busy at a time; the idle one uses no CPU.

Reported: aggregate tokens/s, time to first token p50/p95, per-stream decode tokens/s,
and the ratios node / bare — the targets are aggregate ≥ 0.95× at 4 streams, node TTFT p50
at 4 ≤ 2× its 1-stream value + 50 ms, 1-stream decode ≥ 0.97× and TTFT ≤ +10 ms.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_engine                       # ~3-5 min on 2 cores
    .venv/bin/python -m benchmarks.bench_engine --rounds 2 --max-tokens 32   # quick
    .venv/bin/python -m benchmarks.bench_engine --inprocess   # + a node with the in-process engine (before)
    .venv/bin/python -m benchmarks.bench_engine --forwarded   # + PC2 → PC1's engine through /rpc
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.cli import THREADS_HELP, flags, json_option, numbers, report

ROOT = Path(__file__).resolve().parent.parent
CHAT = "gemma-3-270m"
PROMPT = "Write a short story about a lighthouse keeper and a storm."


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not healthy within {timeout:g} s:\n{log.read_text(errors='replace')[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- client
async def stream_once(host: str, port: int, prompt: str, max_tokens: int) -> dict[str, float]:
    """One streamed chat completion over a fresh connection; TTFT = request sent → first content."""
    body = orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                         "temperature": 0.0, "stream": True})
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        rest = await reader.read(2000)
        raise SystemExit(f"chat request failed: {status!r} {rest[-500:]!r}")
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
            chunked = True
    first = last = None
    n = 0
    buf = b""

    async def pieces():
        if not chunked:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                yield data
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data

    async for data in pieces():
        buf += data
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event[6:] == b"[DONE]":
                continue
            chunk = orjson.loads(event[6:])
            ch = chunk.get("choices") or []
            if ch and (ch[0].get("delta") or {}).get("content"):
                n += 1
                last = time.perf_counter()
                if first is None:
                    first = last
    writer.close()
    assert first is not None and last is not None, "no content streamed"
    return {"ttft_ms": (first - t0) * 1000, "tokens": n,
            "decode_tps": (n - 1) / (last - first) if n > 1 and last > first else 0.0}


async def level(host: str, port: int, streams: int, per_client: int, max_tokens: int, tag: str) -> dict[str, Any]:
    runs: list[dict[str, float]] = []

    async def client(c: int) -> None:
        for i in range(per_client):
            runs.append(await stream_once(host, port, f"{tag} client {c} request {i}. {PROMPT}", max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(streams)))
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft_ms"] for r in runs)
    return {"streams": streams, "requests": len(runs), "tokens": sum(r["tokens"] for r in runs),
            "aggregate_tps": sum(r["tokens"] for r in runs) / wall,
            "ttft_p50_ms": statistics.median(ttft), "ttft_p95_ms": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))],
            "decode_tps": statistics.median(r["decode_tps"] for r in runs)}


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the embedded Gemma 3 270M)")
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".test-cache" / "models")
    numbers(ap, parallel=4, context=1024, threads=(0, THREADS_HELP), streams=4, per_client=2, max_tokens=64, rounds=3)
    json_option(ap)
    flags(ap, forwarded="also a second node (127.0.0.3) joined to the first: chat forwarded PC2 → PC1's engine "
                        "(simulated GPU profiles place the chat model on the first node)",
          inprocess="also a node with TARS_CHAT_ENGINE=inprocess (llama-cpp-python, one request at a time)")
    args = ap.parse_args()

    from distributed.engine.binary import locate

    binary = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if binary is None:
        raise SystemExit("no llama-server built: bash scripts/build_engine.sh")
    if args.gguf is None:
        from benchmarks.inprocess import embedded_gguf

        args.gguf = embedded_gguf(args.models_dir)
    threads = args.threads
    if not threads:
        from distributed.cpus import physical_cores

        threads = physical_cores()
    logs = Path(tempfile.mkdtemp(prefix="bench-engine-"))

    bare_port = free_port("127.0.0.1")
    bare_log = logs / "llama-server.log"
    bare_cmd = [str(binary.server), "-m", str(args.gguf), "--host", "127.0.0.1", "--port", str(bare_port),
                "-np", str(args.parallel), "-c", str(args.parallel * args.context), "-t", str(threads), "-ngl", "0",
                "--jinja"]
    node_host = "127.0.0.2"
    node_port = free_port(node_host)
    node_log = logs / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_") or k == "TARS_ENGINE_BIN"}
    env.update({"HF_HUB_OFFLINE": "1", "TARS_MODELS": CHAT, "TARS_CHAT_ENGINE": "server",
                "TARS_PARALLEL": str(args.parallel), "TARS_CONTEXT": str(args.context), "TARS_THREADS": str(threads),
                "TARS_LOG_LEVEL": "warning", "TARS_QUEUE_SIZE": "64",
                "TARS_SPECULATIVE": "off",  # the node's own cost against the same bare engine (bench_spec measures it)
                # throughput, not admission: the in-process side (one request at a time) would refuse
                # the 4th stream at once when it expects to wait past the default 10 s bound
                "TARS_QUEUE_MAX_WAIT_S": "0"})
    if args.forwarded:
        env.update({"TARS_GPU_PROFILE": "rtx3060-12gb", "TARS_CLUSTER_TOKEN": "bench-token"})
    node_cmd = [sys.executable, "-m", "distributed", "serve", "--host", node_host, "--port", str(node_port),
                "--name", "bench", "--models-dir", str(args.models_dir)]
    print(f"llama-server: {binary.describe()}\nthreads {threads}, -np {args.parallel}, context {args.context}/slot, "
          f"{args.streams} streams × {args.per_client} requests × {args.max_tokens} tokens, {args.rounds} rounds; "
          f"logs in {logs}", flush=True)
    from distributed.engine.supervisor import _die_with_parent

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop both on TERM too
    die = _die_with_parent(os.getpid())  # and both die with this process even on SIGKILL
    with bare_log.open("wb") as sink:
        bare = subprocess.Popen(bare_cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=die)
    with node_log.open("wb") as sink:
        node = subprocess.Popen(node_cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die)
    inproc = fwd = None
    if args.forwarded:
        fwd_host = "127.0.0.3"
        fwd_port = free_port(fwd_host)
        fwd_log = logs / "node-pc2.log"
        fwd_cmd = [sys.executable, "-m", "distributed", "serve", "--host", fwd_host, "--port", str(fwd_port),
                   "--name", "bench-pc2", "--models-dir", str(args.models_dir)]
        with fwd_log.open("wb") as sink:
            fwd = subprocess.Popen(fwd_cmd, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die, env={**env, "TARS_GPU_PROFILE": "gtx1660s-6gb",
                                                        "TARS_PEERS": f"http://{node_host}:{node_port}"})
    if args.inprocess:
        ip_port = free_port(node_host)
        ip_log = logs / "node-inprocess.log"
        ip_cmd = [*node_cmd[:node_cmd.index("--port") + 1], str(ip_port), "--name", "bench-inprocess",
                  "--models-dir", str(args.models_dir)]
        with ip_log.open("wb") as sink:
            inproc = subprocess.Popen(ip_cmd, cwd=ROOT, env={**env, "TARS_CHAT_ENGINE": "inprocess"}, stdout=sink,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die)
    try:
        wait_health(f"http://127.0.0.1:{bare_port}", bare, bare_log)
        start_s = wait_health(f"http://{node_host}:{node_port}", node, node_log)
        sides = {"bare": ("127.0.0.1", bare_port), "node": (node_host, node_port)}
        if fwd is not None:
            fwd_url = f"http://{fwd_host}:{fwd_port}"
            t0 = time.perf_counter()
            while True:  # joined, and the chat model routed to the first node
                try:
                    m = {x["id"]: x for x in httpx.get(fwd_url + "/models", timeout=5).json()["models"]}
                    if m.get(CHAT, {}).get("node") == "bench" and m[CHAT].get("state") == "ready":
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                if time.perf_counter() - t0 > 240 or fwd.poll() is not None:
                    raise SystemExit(f"{fwd_url} never routed {CHAT} to the first node:\n"
                                     f"{fwd_log.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            sides["forwarded"] = (fwd_host, fwd_port)
        if inproc is not None:
            wait_health(f"http://{node_host}:{ip_port}", inproc, ip_log)
            sides["inprocess"] = (node_host, ip_port)
        for name, (h, p) in sides.items():  # warm both (connections, model pages, prompt path)
            asyncio.run(level(h, p, 1, 1, 8, f"warm {name}"))
            asyncio.run(level(h, p, args.streams, 1, 8, f"warm {name} x"))
        results: dict[str, dict[int, list[dict[str, Any]]]] = {s: {1: [], args.streams: []} for s in sides}
        import psutil

        node_proc = psutil.Process(node.pid)  # the node's own CPU (its llama-server child not included)
        node_cpu = node_tokens = 0.0
        for r in range(args.rounds):
            order = tuple(sides) if r % 2 == 0 else tuple(reversed(sides))
            for side in order:
                h, p = sides[side]
                for n in (1, args.streams):
                    cpu0 = sum(node_proc.cpu_times()[:2])
                    res = asyncio.run(level(h, p, n, args.per_client, args.max_tokens, f"round {r} {side} {n}"))
                    results[side][n].append(res)
                    if side == "node":
                        node_cpu += sum(node_proc.cpu_times()[:2]) - cpu0
                        node_tokens += res["tokens"]
                    print(f"  round {r + 1} {side:4} {n} stream(s): {res['aggregate_tps']:6.1f} tok/s aggregate, "
                          f"ttft p50 {res['ttft_p50_ms']:6.1f} ms, decode {res['decode_tps']:5.1f} tok/s/stream",
                          flush=True)
    finally:
        stop(node)
        stop(bare)
        for proc in (inproc, fwd):
            if proc is not None:
                stop(proc)

    def med(side: str, n: int, key: str) -> float:
        return statistics.median(x[key] for x in results[side][n])

    s = args.streams
    out = {
        "binary": binary.to_dict(), "threads": threads, "parallel": args.parallel, "context": args.context,
        "streams": s, "per_client": args.per_client, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "node_start_s": round(start_s, 2),
        "node_cpu_ms_per_token": round(node_cpu * 1000 / node_tokens, 3) if node_tokens else None,
        "load_average": os.getloadavg(),
        "bare": {n: {k: round(med("bare", n, k), 2) for k in ("aggregate_tps", "ttft_p50_ms", "ttft_p95_ms", "decode_tps")}
                 for n in (1, s)},
        "node": {n: {k: round(med("node", n, k), 2) for k in ("aggregate_tps", "ttft_p50_ms", "ttft_p95_ms", "decode_tps")}
                 for n in (1, s)},
    }
    for extra in ("inprocess", "forwarded"):
        if extra in results:
            out[extra] = {n: {k: round(med(extra, n, k), 2) for k in
                              ("aggregate_tps", "ttft_p50_ms", "ttft_p95_ms", "decode_tps")} for n in (1, s)}
    if "forwarded" in results:
        out["forwarded_vs_node_aggregate"] = round(med("forwarded", s, "aggregate_tps") / med("node", s, "aggregate_tps"), 3)
    out["ratios"] = {
        f"aggregate_{s}_streams": round(med("node", s, "aggregate_tps") / med("bare", s, "aggregate_tps"), 3),
        "decode_1_stream": round(med("node", 1, "decode_tps") / med("bare", 1, "decode_tps"), 3),
        "ttft_delta_1_stream_ms": round(med("node", 1, "ttft_p50_ms") - med("bare", 1, "ttft_p50_ms"), 2),
        f"node_ttft_{s}_vs_1": round(med("node", s, "ttft_p50_ms") / med("node", 1, "ttft_p50_ms"), 3),
        f"node_ttft_{s}_limit_ms": round(2 * med("node", 1, "ttft_p50_ms") + 50, 2),
    }
    report(out, args.json)


if __name__ == "__main__":
    main()
