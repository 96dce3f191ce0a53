"""One node through HTTP vs the same libraries in process (issue 3's speed targets).

Starts ``python -m distributed serve`` as a real process on 127.0.0.2 with the
embedded models, then measures, alternating with the in-process baselines of
``benchmarks/inprocess.py`` in the same run so both see the same machine load:

* chat — decode tokens/s and time to first token of a streamed
  ``/v1/chat/completions`` (temperature 0; read by a minimal socket client) vs llama-cpp-python
  ``create_chat_completion(stream=True)`` on the same GGUF, context and threads;
* embeddings — ``--clients`` concurrent clients, one sentence per request, through
  ``/v1/embeddings`` vs one sentence-transformers ``encode`` over the same
  sentences in batches of 32. The load client is a minimal keep-alive HTTP/1.1
  client on asyncio (it shares the CPU with the server, so it must be cheap);
  ``encoding_format`` base64 is what the official openai client sends by default;
* the node's start → ``/health`` 200 time and its idle RSS.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_node            # full run (several minutes)
    .venv/bin/python -m benchmarks.bench_node --rounds 3 --embed-rounds 1 --sentences 500   # quick
    .venv/bin/python -m benchmarks.bench_node --overhead   # the node's own cost, fake backends
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import orjson

from benchmarks.inprocess import default_threads, embedded_gguf, llama_decode, st_encode
from benchmarks.soak import rss_mb
from tests.support import ROOT, ServerProcess, ServerFailed
HOST = "127.0.0.2"
CHAT, EMBED = "gemma-3-270m", "all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- server
def node_process(models_dir: Path, threads: int, context: int, extra_env: dict[str, str] | None = None) -> ServerProcess:
    """The node under test: the embedded models on a free port of 18450-18499, with
    ``threads`` llama.cpp threads (TARS_THREADS), or 0: none set, the node's own default."""
    env = {"TARS_SPECULATIVE": "off",  # the node against the library, like for like (bench_spec measures it)
           **(extra_env or {}), "TARS_CONTEXT": str(context), "TARS_MODELS": f"{CHAT},{EMBED}"}
    if threads:
        env["TARS_THREADS"] = str(threads)
    return ServerProcess("bench", HOST, ports=range(18450, 18500), env=env,
                         args=["--models-dir", str(models_dir), "--log-level", "warning"])


# --------------------------------------------------------------------------- chat
class RawStream:
    """A keep-alive HTTP/1.1 connection that streams SSE with almost no client CPU
    (httpx spends ~0.3 ms of CPU per event, which on 2 cores is taken from the server)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rf = self.sock.makefile("rb")

    def post_stream(self, path: str, body: bytes):  # yields the data payload of each SSE event
        self.sock.sendall(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        status = self.rf.readline()
        if b" 200 " not in status:
            raise SystemExit(f"chat request failed: {status!r}")
        while self.rf.readline() not in (b"\r\n", b""):
            pass  # headers (uvicorn streams with chunked transfer encoding)
        while True:
            size = int(self.rf.readline().strip(), 16)
            if size == 0:
                self.rf.readline()
                return
            data = self.rf.read(size)
            self.rf.read(2)
            for event in data.split(b"\n\n"):
                if event.startswith(b"data: "):
                    yield event[6:]

    def chat_content(self, body: bytes) -> Iterator[dict[str, Any]]:
        """Each chunk of a streamed /v1/chat/completions that carries content, read to the end."""
        for data in self.post_stream("/v1/chat/completions", body):
            if data == b"[DONE]":
                continue  # read on to the end of the chunked body
            chunk = orjson.loads(data)
            if chunk.get("choices") and (chunk["choices"][0].get("delta") or {}).get("content"):
                yield chunk

    def close(self) -> None:
        self.rf.close()
        self.sock.close()

    def __enter__(self) -> RawStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_chat(port: int, prompt: str, n_tokens: int) -> dict[str, float]:
    """Stream one chat completion; TTFT from sending the request to the first content delta.
    Each request has a connection of its own, opened before the clock starts: the node closes
    keep-alive connections idle for TARS_KEEPALIVE_S (5 s), which the in-process rounds
    between two requests can exceed on a busy machine."""
    body = orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": n_tokens,
                         "temperature": 0.0, "stream": True})
    client = RawStream(HOST, port)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _chunk in client.chat_content(body):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    client.close()
    assert first is not None, "no content streamed"
    return {"ttft_ms": (first - t0) * 1000, "tokens_per_s": (n - 1) / (end - first) if n > 1 else 0.0, "tokens": n}


def bench_chat(port: int, gguf: Path, rounds: int, n_tokens: int, threads: int | None, context: int) -> dict:
    names = ["Tom", "Mia", "Leo", "Zoe", "Max", "Ivy", "Sam", "Ada", "Ben", "Eva"]
    llama_decode(gguf, 8, "Hello", threads=threads, n_ctx=context)  # load + warm the in-process model
    http_chat(port, "Hello", 8)  # warm the server's model
    base: list[dict[str, float]] = []
    http: list[dict[str, float]] = []
    for r in range(rounds):
        prompt = f"Write a short story about a cat named {names[r % len(names)]}."
        order = ("base", "http") if r % 2 == 0 else ("http", "base")
        for side in order:
            if side == "base":
                base.append(llama_decode(gguf, n_tokens, prompt, threads=threads, n_ctx=context))
            else:
                http.append(http_chat(port, prompt, n_tokens))
        print(f"  chat round {r + 1}: in-process {base[-1]['tokens_per_s']:.1f} tok/s ttft {base[-1]['ttft_ms']:.1f} ms"
              f" | http {http[-1]['tokens_per_s']:.1f} tok/s ttft {http[-1]['ttft_ms']:.1f} ms", flush=True)
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    return {
        "base_tps": med(base, "tokens_per_s"), "http_tps": med(http, "tokens_per_s"),
        "base_ttft_ms": med(base, "ttft_ms"), "http_ttft_ms": med(http, "ttft_ms"),
        "decode_ratio": med(http, "tokens_per_s") / med(base, "tokens_per_s"),
        # each round's two runs sit side by side in time: their ratio cancels most load swings
        "decode_ratio_rounds": statistics.median(h["tokens_per_s"] / b["tokens_per_s"] for b, h in zip(base, http)
                                                 if b["tokens_per_s"] > 0),
        "ttft_delta_ms": med(http, "ttft_ms") - med(base, "ttft_ms"),
        "tokens": med(http, "tokens"), "rounds": rounds,
    }


# --------------------------------------------------------------------------- embeddings
def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the a quick lazy brown dog cat runs jumps over under near market price rises falls today "
             "yesterday model server network local home computer graphics card memory fast slow new old "
             "river mountain city music book reads writes sings small large bright dark morning evening").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 20))).capitalize() + "." for _ in range(n)]


async def post_embeddings(host: str, port: int, bodies: list[bytes], clients: int) -> float:
    """Seconds ``clients`` keep-alive connections take to post every body to /v1/embeddings
    (a minimal HTTP/1.1 client: it shares the CPU with the server, so it must be cheap)."""
    it = iter(bodies)
    errors: list[str] = []

    async def conn() -> None:
        reader, writer = await asyncio.open_connection(host, port)
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


async def _load(host: str, port: int, texts: list[str], clients: int, fmt: str) -> float:
    """Requests/s of ``clients`` keep-alive connections, one sentence per request."""
    bodies = [orjson.dumps({"model": EMBED, "input": t, "encoding_format": fmt}) for t in texts]
    return len(texts) / await post_embeddings(host, port, bodies, clients)


def bench_embed(port: int, n: int, clients: int, rounds: int) -> dict:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    texts = sentences(n)
    st_encode(texts[:64])  # load + warm the in-process model
    runner(_load(HOST, port, texts[:256], clients, "base64"))  # warm the server
    check = httpx.post(f"http://{HOST}:{port}/v1/embeddings", json={"input": texts[0]}).json()
    assert len(check["data"][0]["embedding"]) == 384
    base, b64, flt = [], [], []
    for r in range(rounds):
        base.append(st_encode(texts, batch_size=32))
        b64.append(runner(_load(HOST, port, texts, clients, "base64")))
        flt.append(runner(_load(HOST, port, texts, clients, "float")))
        print(f"  embed round {r + 1}: in-process {base[-1]:.0f}/s | http base64 {b64[-1]:.0f}/s | "
              f"http float {flt[-1]:.0f}/s", flush=True)
    med = statistics.median
    return {"base_per_s": med(base), "http_b64_per_s": med(b64), "http_float_per_s": med(flt),
            "ratio_b64": med(b64) / med(base), "ratio_float": med(flt) / med(base), "sentences": n,
            "clients": clients, "rounds": rounds}


# --------------------------------------------------------------------------- overhead
async def _asgi_call(app: Any, path: str, body: bytes) -> list[dict[str, Any]]:
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)  # never disconnects
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1), "server": ("bench", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent
    return sent


async def _overhead() -> dict[str, float]:
    """The node's own cost, without a model or sockets: the fake backends through the app."""
    from distributed.api.app import create_app
    from distributed.domain import HostProfile
    from distributed.service import build
    from distributed.settings import load_settings

    settings = load_settings(None, node_name="probe", backend_override="fake", context=8192)
    service = build(settings, profile=HostProfile("probe", "cpu", 2, 16000, 16000), backend_extra={"reply_tokens": 4000})
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        for t in node.local_targets():
            await t.wait_loaded(10)
        chat = orjson.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000, "stream": True})
        await _asgi_call(app, "/v1/chat/completions", chat)
        t0 = time.perf_counter()
        await _asgi_call(app, "/v1/chat/completions", chat)
        per_token = (time.perf_counter() - t0) / 4000
        emb = orjson.dumps({"input": "a sentence of a few words", "encoding_format": "base64"})

        async def client(n: int) -> None:
            for _ in range(n):
                await _asgi_call(app, "/v1/embeddings", emb)

        await asyncio.gather(*(client(10) for _ in range(32)))
        t0 = time.perf_counter()
        await asyncio.gather(*(client(60) for _ in range(32)))
        per_request = (time.perf_counter() - t0) / (32 * 60)
    return {"us_per_streamed_token": per_token * 1e6, "us_per_embedding_request": per_request * 1e6}


# --------------------------------------------------------------------------- main
def markdown(res: dict[str, Any]) -> str:
    threads = f"{res['threads']} ({res['threads_rule']})"
    out = [f"Machine: {res['machine']}; llama.cpp threads: {threads} (both sides); context {res['context']}; "
           f"load average before/after: {res['load_before']} / {res['load_after']}"
           + (f"; node environment {res['server_env']}" if res.get("server_env") else "") + ".", "",
           "| measure | in process | through the node | ratio / delta | target |", "|---|---|---|---|---|"]
    c = res.get("chat")
    if c:
        out.append(f"| chat decode, tok/s (median of {c['rounds']}, {c['tokens']:.0f} tokens) | {c['base_tps']:.1f} | "
                   f"{c['http_tps']:.1f} | **{c['decode_ratio']:.3f}x** (per-round median {c['decode_ratio_rounds']:.3f}x)"
                   " | >= 0.95x |")
        out.append(f"| chat time to first token, ms | {c['base_ttft_ms']:.1f} | {c['http_ttft_ms']:.1f} | "
                   f"**{c['ttft_delta_ms']:+.1f} ms** | <= +10 ms |")
    e = res.get("embed")
    if e:
        out.append(f"| embeddings, sentences/s ({e['clients']} clients, 1 sentence/request, base64) | "
                   f"{e['base_per_s']:.0f} | {e['http_b64_per_s']:.0f} | **{e['ratio_b64']:.2f}x** | >= 0.5x |")
        out.append(f"| embeddings, same with encoding_format float | {e['base_per_s']:.0f} | "
                   f"{e['http_float_per_s']:.0f} | {e['ratio_float']:.2f}x | |")
    out.append(f"| node start → /health 200 (both models loaded), s | | {res['start_to_health_s']:.1f} | | |")
    out.append(f"| node idle RSS (both models loaded), MiB | | {res['idle_rss_mb']:.0f} | | |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="chat rounds (each side once per round)")
    ap.add_argument("--embed-rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sentences", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0,
                    help="llama.cpp threads, both sides (0: TARS_THREADS, else the node's default rule: the "
                         "physical cores this process may use, distributed.cpus.physical_cores)")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--models-dir", type=Path, default=ROOT / ".test-cache" / "models")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the node only (e.g. OMP_NUM_THREADS=1); repeatable")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--overhead", action="store_true",
                    help="only the node's own cost per streamed token and per embedding request, in process "
                         "with the fake backends (no models, no sockets)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the nodes (timeout, kill)
    if args.overhead:
        print(json.dumps({k: round(v, 1) for k, v in asyncio.run(_overhead()).items()}))
        return

    # The same threads rule on both sides, explicitly: --threads / TARS_THREADS for both, else
    # the node runs at its default (TARS_THREADS unset) and the in-process side gets what that
    # default computes, distributed.cpus.physical_cores() (same machine, same CPU set).
    explicit = args.threads or int(os.environ.get("TARS_THREADS", "0") or 0)
    threads = explicit or default_threads()
    rule = f"TARS_THREADS={explicit}" if explicit else "the node's default, physical cores of its CPU set"
    gguf = embedded_gguf(args.models_dir)
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    node = node_process(args.models_dir, explicit, args.context, server_env)
    print(f"starting the node on {HOST} (llama.cpp threads on both sides: {threads}, {rule}) ...", flush=True)
    try:
        node.start(timeout=300)
    except ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    startup = time.perf_counter() - node.started_at
    port = node.port
    try:
        time.sleep(2.0)
        res: dict[str, Any] = {"start_to_health_s": startup, "idle_rss_mb": rss_mb(node.pid, children=False),
                               "load_before": round(os.getloadavg()[0], 2), "server_env": server_env,
                               "threads": threads, "threads_rule": rule, "context": args.context,
                               "machine": f"{os.cpu_count()} CPUs, {os.uname().machine}, Python {sys.version.split()[0]}"}
        print(f"  start → /health 200: {startup:.1f} s; idle RSS {res['idle_rss_mb']:.0f} MiB", flush=True)
        if not args.skip_chat:
            res["chat"] = bench_chat(port, gguf, args.rounds, args.tokens, threads, args.context)
        if not args.skip_embed:
            res["embed"] = bench_embed(port, args.sentences, args.clients, args.embed_rounds)
        res["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        node.stop()
    print(json.dumps(res, indent=2))
    print()
    print(markdown(res))


if __name__ == "__main__":
    main()
