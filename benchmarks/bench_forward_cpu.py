"""Where a node's CPU goes per streamed chat token, straight and forwarded (issue 18.4).

Starts two real nodes on loopback — PC1 (127.0.0.2, simulated RTX 3060: runs the chat model
in its llama-server engine) and PC2 (127.0.0.3, simulated GTX 1660 SUPER, joined to PC1) —
and streams ``/v1/chat/completions`` (temperature 0, ``--tokens`` tokens) straight to PC1 and
through PC2, alternating. For each stream it reads the CPU time (the scheduler's run time of
every thread, /proc/<pid>/task/*/schedstat, in nanoseconds) the node *processes* spent — PC1's node without its llama-server child, and PC2's node — and
divides by the tokens streamed: the node's own cost per token, apart from decoding.

Each node's idle CPU (heartbeats, health checks: measured for 5 s before the streams) is
subtracted; ``kernel_share`` is the system part of each node's CPU (/proc/<pid>/stat ticks,
summed over the rounds). With ``--py-spy`` it then samples both node processes with py-spy
(``--nonblocking``; idle threads left out, so every sample is CPU; a sample whose innermost
Python frame is the event loop's ``run`` is time in uvloop's C code: socket reads and writes,
callbacks) during forwarded streams and sums the samples by where they were spent: the
engine's stream (``engine/sse.py`` read + ``engine/wire.py`` folding), JSON decode/encode,
the ``/rpc`` NDJSON hop (``rpc/``, ``targets/remote.py``), the API's SSE writing, uvicorn /
asyncio, and the rest. Shares are of the samples that landed in Python code of the node.
Caveat, seen on the shared 2-core machine: py-spy counts a thread that is runnable but not
running (preempted right after its socket write woke the reader, or waiting for a core) as
active, so under load most samples land on the event loop's ``run`` and on uvicorn's
``transport.write`` — several times the CPU the node really used. The per-token CPU above
(schedstat) is the measure; ``benchmarks/bench_forward_parts.py`` times the re-parse and
re-encode steps alone, and ``perf record`` splits the CPU by library (docs/BENCHMARKS.md).

Each round streams once straight and once forwarded (the order alternates); the decode
ratio forwarded / straight (tokens/s, wall time of the whole stream as the client sees it)
is printed per round and summed up as median and minimum (issue 18.4's "≥ 0.95× in each
run"). ``--threads`` sets the engine's CPU threads (TARS_THREADS; 1 keeps a shared 2-core
machine from being swamped by spinning llama.cpp threads). ``raw`` figures are the node's
CPU per token before the idle correction.

    .venv/bin/python -m benchmarks.bench_forward_cpu --rounds 5 --tokens 256 [--threads 1] [--py-spy]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_node import RawStream
from tests.support import ROOT, ServerFailed, ServerProcess, wait_until

CHAT = "smollm2-135m-instruct"
PROMPT = "Write a long story about a cat who learns to sail, with many details about the sea."
# where a sample was spent: the first of these found in its stack, innermost frame first
BUCKETS = [
    ("engine stream read (engine/sse.py)", ("distributed/engine/sse.py",)),
    ("engine chunk folding (engine/wire.py)", ("distributed/engine/wire.py",)),
    ("JSON decode/encode (orjson/json)", ("orjson", "json/decoder.py", "json/encoder.py", "json/__init__.py")),
    ("/rpc hop (rpc/, targets/remote.py, streams.py)", ("distributed/rpc/", "distributed/targets/remote.py",
                                                       "distributed/streams.py")),
    ("API SSE writing (api/)", ("distributed/api/",)),
    ("engine target (engine/target.py)", ("distributed/engine/target.py",)),
    ("node / targets", ("distributed/node.py", "distributed/targets/")),
    ("uvicorn / h11 / httptools", ("uvicorn/", "h11/", "httptools/")),
    ("starlette / fastapi", ("starlette/", "fastapi/")),
    ("event loop: uvloop C code (socket I/O, callbacks) and asyncio", ("asyncio/", "uvloop/")),
]


def cpu_s(pid: int) -> float:
    """CPU seconds of one process (not its children): the sum over its threads of the
    scheduler's run time (/proc/<pid>/task/*/schedstat, nanoseconds; /proc's stat counts in
    10 ms ticks: 39 us per token of a 256-token stream). A thread that ends between two
    readings takes its time with it; the node's threads (the event loop, its pools) live on."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
    return total / 1e9


def user_sys_ticks(pid: int) -> tuple[int, int]:
    """User and system CPU of one process in clock ticks (/proc/<pid>/stat): the split of
    its time between Python/C code and the kernel (socket syscalls, loopback TCP)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def stream(url: str, tokens: int) -> int:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    body = orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                         "temperature": 0.0, "seed": 1, "stream": True})
    with RawStream(host, int(port)) as client:
        return sum(1 for _chunk in client.chat_content(body))


def idle_rates(pids: dict[str, int], seconds: float = 5.0) -> dict[str, float]:
    """CPU seconds per second each node spends with no request (heartbeats, health checks)."""
    before = {k: cpu_s(p) for k, p in pids.items()}
    time.sleep(seconds)
    return {k: (cpu_s(p) - before[k]) / seconds for k, p in pids.items()}


def measured(url: str, tokens: int, pids: dict[str, int], idle: dict[str, float]) -> dict[str, float]:
    """Per token: each node's CPU during the stream less what it spends idle in that time."""
    before = {k: cpu_s(p) for k, p in pids.items()}
    ticks: dict[str, tuple[int, ...]] = {k: user_sys_ticks(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    n = stream(url, tokens)
    wall = time.perf_counter() - t0
    used = {k: cpu_s(p) - before[k] for k, p in pids.items()}
    ticks = {k: tuple(b - a for a, b in zip(ticks[k], user_sys_ticks(p))) for k, p in pids.items()}
    out = {f"{k}_us_per_token": (used[k] - idle[k] * wall) / max(n, 1) * 1e6 for k in pids}
    out.update({f"{k}_raw_us_per_token": used[k] / max(n, 1) * 1e6 for k in pids})
    out.update({f"{k}_user_ticks": float(ticks[k][0]) for k in pids})
    out.update({f"{k}_sys_ticks": float(ticks[k][1]) for k in pids})
    out.update(tokens=n, tokens_per_s=n / wall)
    return out


def bucket_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, marks in BUCKETS:
            if any(m in frame for m in marks):
                return name
    return "other"


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--rate", "500",
                             "--duration", str(int(seconds)), "--nonblocking", "--format", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shares(raw: Path) -> dict[str, Any]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[bucket_of(stack)] += int(n)
    total = sum(counts.values()) or 1
    return {"samples": total, "share": {k: round(v / total, 3) for k, v in counts.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--token", default="bench-forward-token")
    ap.add_argument("--models-dir", default=str(ROOT / ".test-cache" / "models"))
    ap.add_argument("--threads", type=int, default=0, help="engine CPU threads (TARS_THREADS; 0: llama.cpp's rule)")
    ap.add_argument("--py-spy", action="store_true", help="also sample both nodes during forwarded streams")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logdir = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    common = {"TARS_MODELS_DIR": args.models_dir, "TARS_MODELS": CHAT, "TARS_CLUSTER_TOKEN": args.token,
              "TARS_LOG_LEVEL": "warning", "TARS_CHAT_ENGINE": "server", "TARS_QUEUE_MAX_WAIT_S": "0",
              "TARS_THREADS": str(args.threads),
              "TARS_SPECULATIVE": "off"}  # one token per engine event, as measured in docs/BENCHMARKS.md
    pc1 = ServerProcess("pc1", "127.0.0.2", ports=range(18600, 18620), log_dir=logdir,
                        env={**common, "TARS_GPU_PROFILE": "rtx3060-12gb"})
    pc2 = ServerProcess("pc2", "127.0.0.3", ports=range(18620, 18640), log_dir=logdir,
                        env={**common, "TARS_GPU_PROFILE": "gtx1660s-6gb"})
    res: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2)}
    try:
        pc1.launch()
        pc2.env["TARS_PEERS"] = pc1.url
        pc2.launch()

        def ready() -> bool:
            rows = {m["id"]: m for m in httpx.get(pc2.url + "/models", timeout=5).json()["models"]}
            return rows.get(CHAT, {}).get("state") == "ready" and rows[CHAT]["node"] == "pc1"

        try:
            wait_until(ready, 300, "chat ready on pc1 as pc2 sees it", pc1, pc2, interval=0.5)
        except ServerFailed as exc:
            raise SystemExit(str(exc)) from None
        pids = {"pc1": pc1.pid, "pc2": pc2.pid}
        stream(pc1.url, 16)
        stream(pc2.url, 16)
        idle = idle_rates(pids)
        res["idle_cpu_ms_per_s"] = {k: round(v * 1000, 2) for k, v in idle.items()}
        straight: list[dict[str, float]] = []
        forwarded: list[dict[str, float]] = []
        ratios: list[float] = []
        for r in range(args.rounds):
            sides = [("straight", pc1.url), ("forwarded", pc2.url)]
            for side, url in sides if r % 2 == 0 else sides[::-1]:
                row = measured(url, args.tokens, pids, idle)
                (straight if side == "straight" else forwarded).append(row)
                print(f"  round {r + 1} {side:9}: {row['tokens']} tokens, {row['tokens_per_s']:.1f} tok/s, "
                      f"pc1 node {row['pc1_us_per_token']:.0f} us/token (raw {row['pc1_raw_us_per_token']:.0f}), "
                      f"pc2 node {row['pc2_us_per_token']:.0f} us/token (raw {row['pc2_raw_us_per_token']:.0f})",
                      flush=True)
            ratios.append(forwarded[-1]["tokens_per_s"] / straight[-1]["tokens_per_s"])
            print(f"  round {r + 1} decode forwarded / straight: {ratios[-1]:.3f}x", flush=True)
        med = statistics.median
        res["straight"] = {k: round(med(r[k] for r in straight), 1) for k in straight[0] if "ticks" not in k}
        res["forwarded"] = {k: round(med(r[k] for r in forwarded), 1) for k in forwarded[0] if "ticks" not in k}
        res["kernel_share"] = {  # of each node's CPU over all rounds of a side: system time / (user + system)
            side: {k: round(sum(r[f"{k}_sys_ticks"] for r in rows) /
                            max(1.0, sum(r[f"{k}_sys_ticks"] + r[f"{k}_user_ticks"] for r in rows)), 2) for k in pids}
            for side, rows in (("straight", straight), ("forwarded", forwarded))}
        res["decode_ratio"] = {"per_round": [round(x, 3) for x in ratios], "median": round(med(ratios), 3),
                               "min": round(min(ratios), 3)}
        if args.py_spy:
            seconds = 20
            raws = {k: logdir / f"{k}.raw" for k in pids}
            spies = [spy(p, seconds, raws[k]) for k, p in pids.items()]
            time.sleep(1.0)  # py-spy attached
            stop = time.monotonic() + seconds - 2
            done = threading.Event()

            def load() -> None:
                while time.monotonic() < stop:
                    stream(pc2.url, args.tokens)
                done.set()

            threading.Thread(target=load, daemon=True).start()
            for s in spies:
                s.wait(seconds + 30)
            done.wait(120)
            res["py_spy"] = {k: shares(raw) for k, raw in raws.items() if raw.exists()}
        res["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        pc2.stop()
        pc1.stop()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
