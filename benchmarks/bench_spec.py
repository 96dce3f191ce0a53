"""Speculative decoding through the node: ``TARS_SPECULATIVE`` settings side by side (issue 18.2).

Starts one ``python -m distributed serve`` per setting (``--settings``, default ``off,ngram,auto``)
on 127.0.0.2, each with a models folder of its own (a deployment one makes is not another's), each
serving only the embedded SmolLM2-135M-Instruct (read in place from its wheel) with llama-server
(``TARS_CHAT_ENGINE=server``, the same ``TARS_PARALLEL``/``TARS_CONTEXT``/``TARS_THREADS``), then
alternates, round by round (the order of the nodes rotates each round), the same load on each:

* **copy**: rewrite a given block with one change (a Python class, a CSS sheet or an HTML menu,
  its names and values drawn per request, so no two requests copy the same text and no node's
  n-gram pool has seen the answer before);
* **free**: free-form chat (a short story or an explanation, a topic per request);

each at 1 stream and at ``--streams`` concurrent streams (default 4), ``--per-client`` requests
per stream, temperature 0, streamed ``/v1/chat/completions`` through the node. Only one node is
busy at a time. Per request: decode tokens/s as the client sees it ((completion tokens − 1) /
(last content − first content)); per level: the median over its requests and the aggregate
tokens/s; draft tokens and accepted ones from the node's ``GET /models`` (``speculative``,
summed from llama-server's ``timings.draft_n`` / ``draft_n_accepted``). Reported: medians over
rounds, ratios against ``off`` (of the medians, and the median of each round's ratio: the
same prompts a few seconds apart), how many answers equal ``off``'s word for word, and the
load average of each round (this CPU is shared). Because a busy machine swings wall times by
±40 %, each level also reads the CPU time of the node's llama-server child per generated
token: the work speculation saves or adds, which the load does not inflate; with a 1-thread
engine, off's CPU per token over a setting's is the speed-up an otherwise idle machine shows.

The ``draft`` setting runs SmolLM2 with itself as its draft model (``POST /models {"model",
"draft"}`` once the node is up): the one pair of embedded GGUFs that share a vocabulary. A
model drafting for itself costs as much per guess as it saves, so it shows the path works and
what acceptance it reaches, not a speed-up; a real pair (a 0.5B drafting for a 7B of its
family) needs a download.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_spec                           # ~20 min on 2 busy cores
    .venv/bin/python -m benchmarks.bench_spec --rounds 2 --per-client 1   # quick
    .venv/bin/python -m benchmarks.bench_spec --parallel 1 --streams 1    # 1-slot engines (auto = n-gram)
    .venv/bin/python -m benchmarks.bench_spec --settings off,ngram,draft   # + the draft-model path
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
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

from benchmarks.bench_engine import free_port, stop, wait_health
from benchmarks.cli import THREADS_HELP, json_option, numbers, report

ROOT = Path(__file__).resolve().parent.parent
CHAT = "smollm2-135m-instruct"

NAMES = ["Point", "Vector", "Ticket", "Sensor", "Order", "Parcel", "Invoice", "Window", "Track", "Sample",
         "Engine", "Budget", "Garden", "Packet", "Signal", "Rocket"]
FIELDS = [("x", "y"), ("left", "right"), ("width", "height"), ("start", "end"), ("low", "high"), ("north", "south"),
          ("first", "second"), ("min_value", "max_value")]
BLOCKS = ["header", "content", "footer", "sidebar", "banner", "card", "panel", "toolbar", "notice", "gallery"]
PAGES = ["Home", "About us", "Products", "Services", "Blog", "Careers", "Contact", "Pricing", "Partners", "News",
         "Events", "Support", "Downloads", "Community", "Customers", "Press", "Team", "Shop", "Gallery", "Jobs"]
WHO = ["lighthouse keeper", "baker", "young fox", "retired pilot", "street musician", "lonely robot", "gardener",
       "ship's cat", "night nurse", "mountain guide", "clockmaker", "beekeeper"]
WHAT = ["finds a map in an old book", "loses a key on a stormy night", "meets a stranger at a train station",
        "builds a boat in the backyard", "hears a strange song in the forest", "wins a prize by accident",
        "gets lost in a big city", "learns to paint", "opens a small shop", "saves a bird from the rain",
        "writes a letter to the future", "climbs the tallest tree in town"]
TOPICS = ["a rainbow", "a bicycle", "a refrigerator", "a tide mill", "a compass", "a bread oven", "a solar panel",
          "a volcano", "a vaccine", "a thermostat", "an airplane wing", "a battery"]


def copy_prompt(i: int) -> str:
    """A block to rewrite with one change; names and values drawn from ``i`` (never the same text twice)."""
    r = random.Random(i)
    kind = i % 3
    if kind == 0:
        name, (a, b) = r.choice(NAMES) + r.choice(["", "2D", "Item", "Record"]), r.choice(FIELDS)
        code = (f"class {name}:\n    def __init__(self, {a}, {b}):\n        self.{a} = {a}\n        self.{b} = {b}\n\n"
                f"    def move(self, d{a}, d{b}):\n        self.{a} = self.{a} + d{a}\n        self.{b} = self.{b} + d{b}\n\n"
                f"    def span(self, other):\n        return ((self.{a} - other.{a}) ** 2 + (self.{b} - other.{b}) ** 2) ** 0.5\n\n"
                f"    def __repr__(self):\n        return f\"{name}({{self.{a}}}, {{self.{b}}})\"\n")
        new = r.choice(NAMES) + "Ex"
        return f"Rename the class {name} to {new} in this code. Reply with the whole code.\n\n```python\n{code}```"
    if kind == 1:
        blocks = r.sample(BLOCKS, 4)

        def color() -> str:
            return "#%06x" % r.randrange(0x1000000)

        css = "".join(f".{b} {{\n  background: {color()};\n  color: {color()};\n  padding: {r.choice([8, 12, 16, 24])}px "
                      f"{r.choice([16, 24, 32])}px;\n}}\n" for b in blocks)
        return (f"Change the {blocks[0]} background to {color()} in this CSS. Reply with the whole CSS.\n\n"
                f"```css\n{css}```")
    pages = r.sample(PAGES, 7)
    html = ('<nav>\n<ul class="menu">\n' + "".join(f'  <li><a href="/{p.lower().replace(" ", "-")}">{p}</a></li>\n'
                                                 for p in pages)
            + f"</ul>\n</nav>\n<footer>\n  <p>Copyright {r.randrange(1990, 2030)} {r.choice(NAMES)} Inc. All rights "
              "reserved.</p>\n</footer>\n")
    extra = r.choice([p for p in PAGES if p not in pages])
    return (f"Add a link to /{extra.lower().replace(' ', '-')} named {extra} at the end of this HTML menu and "
            f"repeat the whole HTML.\n\n```html\n{html}```")


def free_prompt(i: int) -> str:
    """Free-form chat; a topic per ``i``."""
    if i % 2 == 0:
        return f"Write a short story about a {WHO[i // 2 % len(WHO)]} who {WHAT[i // 2 * 5 % len(WHAT)]}."
    return f"Explain how {TOPICS[i // 2 % len(TOPICS)]} works, in a few paragraphs."


# --------------------------------------------------------------------------- client
async def chat_stream(host: str, port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion over a fresh connection (a minimal HTTP/1.1 reader: it shares
    the CPU with the nodes). Decode = (completion tokens − 1) / (last content − first content)."""
    body = orjson.dumps({"model": CHAT, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                         "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}})
    reader, writer = await asyncio.open_connection(host, port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise SystemExit(f"chat request failed: {status!r} {(await reader.read(2000))[-500:]!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers (the body is chunked)
    first = last = None
    text: list[str] = []
    tokens = 0
    buf = b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event[6:] == b"[DONE]":
                continue
            chunk = orjson.loads(event[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"].get("completion_tokens") or 0)
            ch = chunk.get("choices") or []
            piece = (ch[0].get("delta") or {}).get("content") if ch else None
            if piece:
                last = time.perf_counter()
                first = first or last
                text.append(piece)
    writer.close()
    if first is None or last is None:
        raise SystemExit("no content streamed")
    return {"text": "".join(text), "tokens": tokens,
            "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0}


def self_draft(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    """Deploy the chat model with itself as its draft, and wait until its engine runs with it."""
    r = httpx.post(url + "/models", json={"model": CHAT, "draft": CHAT}, timeout=120)
    if r.status_code not in (200, 202):
        raise SystemExit(f"POST /models with a draft failed: {r.status_code} {r.text}")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        rows = httpx.get(url + "/models", timeout=10).json()["models"]
        row = next((m for m in rows if m["id"] == CHAT), {})
        if row.get("state") == "ready" and (row.get("speculative") or {}).get("kind") == "draft":
            return
        if proc.poll() is not None or row.get("state") == "failed":
            break
        time.sleep(0.5)
    raise SystemExit(f"{CHAT} never ran with its draft: {row}\n{log.read_text(errors='replace')[-2000:]}")


def engine_cpu(node_pid: int) -> float:
    """CPU seconds used so far by the node's llama-server child(ren): the work, which a busy
    machine does not inflate the way it inflates wall time."""
    import psutil

    total = 0.0
    for child in psutil.Process(node_pid).children(recursive=True):
        try:
            if "llama-server" in child.name():
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def draft_counts(url: str) -> tuple[int, int]:
    rows = httpx.get(url + "/models", timeout=10).json()["models"]
    spec = next((m.get("speculative") or {} for m in rows if m["id"] == CHAT), {})
    return int(spec.get("draft_tokens") or 0), int(spec.get("accepted_tokens") or 0)


async def level(host: str, port: int, workload: str, streams: int, per_client: int, max_tokens: int,
                first_id: int) -> dict[str, Any]:
    make = copy_prompt if workload == "copy" else free_prompt
    runs: dict[int, dict[str, Any]] = {}

    async def client(c: int) -> None:
        for i in range(per_client):
            pid = first_id + c * per_client + i
            runs[pid] = await chat_stream(host, port, make(pid), max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(streams)))
    wall = time.perf_counter() - t0
    return {"decode_tps": statistics.median(r["decode_tps"] for r in runs.values()),
            "aggregate_tps": sum(r["tokens"] for r in runs.values()) / wall,
            "tokens": sum(r["tokens"] for r in runs.values()),
            "texts": {pid: r["text"] for pid, r in runs.items()}}


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="off,ngram,auto", help="TARS_SPECULATIVE values, one node each")
    numbers(ap, parallel=(4, "TARS_PARALLEL of every node"), context=2048, threads=(0, THREADS_HELP), streams=4,
            per_client=2, max_tokens=256, rounds=3)
    json_option(ap)
    args = ap.parse_args()
    sides = [s.strip() for s in args.settings.split(",") if s.strip()]
    if "off" not in sides:
        sides.insert(0, "off")  # the baseline of every ratio
    from distributed.cpus import physical_cores
    from distributed.engine.binary import locate
    from distributed.engine.supervisor import _die_with_parent

    binary = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if binary is None:
        raise SystemExit("no llama-server built: bash scripts/build_engine.sh")
    threads = args.threads or physical_cores()
    logs = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_") or k == "TARS_ENGINE_BIN"}
    env.update({"HF_HUB_OFFLINE": "1", "TARS_MODELS": CHAT, "TARS_CHAT_ENGINE": "server", "TARS_LOG_LEVEL": "warning",
                "TARS_PARALLEL": str(args.parallel), "TARS_CONTEXT": str(args.context), "TARS_THREADS": str(threads),
                "TARS_QUEUE_SIZE": "64", "TARS_QUEUE_MAX_WAIT_S": "0", "PYTHONPATH": str(ROOT)})
    host = "127.0.0.2"
    print(f"llama-server: {binary.describe()}\nthreads {threads}, -np {args.parallel}, context {args.context}/slot, "
          f"1 and {args.streams} streams × {args.per_client} requests × ≤{args.max_tokens} tokens, {args.rounds} "
          f"rounds, settings {', '.join(sides)}; logs in {logs}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    die = _die_with_parent(os.getpid())
    procs: dict[str, tuple[int, subprocess.Popen[bytes], Path]] = {}
    try:
        for side in sides:
            port, log = free_port(host), logs / f"node-{side}.log"
            with log.open("wb") as sink:
                procs[side] = (port, subprocess.Popen(
                    [sys.executable, "-m", "distributed", "serve", "--host", host, "--port", str(port), "--name",
                     f"spec-{side}", "--models-dir", str(logs / f"models-{side}")], cwd=ROOT, stdout=sink,
                    stderr=subprocess.STDOUT, env={**env, "TARS_SPECULATIVE": side}, start_new_session=True,
                    preexec_fn=die), log)
        kinds: dict[str, Any] = {}
        for side, (port, proc, log) in procs.items():
            wait_health(f"http://{host}:{port}", proc, log)
            if side == "draft":
                self_draft(f"http://{host}:{port}", proc, log)
            rows = httpx.get(f"http://{host}:{port}/models", timeout=10).json()["models"]
            kinds[side] = next(m.get("speculative") for m in rows if m["id"] == CHAT)
            asyncio.run(level(host, port, "free", 1, 1, 8, 10**6))  # warm: connections, model pages
        print("speculation: " + "; ".join(f"{s} → {k['kind']} ({k['reason']})" for s, k in kinds.items()), flush=True)
        levels = [(w, n) for w in ("copy", "free") for n in (1, args.streams)]
        res: dict[str, dict[str, list[dict[str, Any]]]] = {s: {f"{w}/{n}": [] for w, n in levels} for s in sides}
        loads = []
        for r in range(args.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for w, n in levels:
                first_id = 1000 * r + 100 * n + (0 if w == "copy" else 50)
                for side in order:
                    port = procs[side][0]
                    url = f"http://{host}:{port}"
                    d0, a0 = draft_counts(url)
                    c0 = engine_cpu(procs[side][1].pid)
                    out = asyncio.run(level(host, port, w, n, args.per_client, args.max_tokens, first_id))
                    c1 = engine_cpu(procs[side][1].pid)
                    d1, a1 = draft_counts(url)
                    out.update(drafted=d1 - d0, accepted=a1 - a0, cpu_ms_per_token=1000 * (c1 - c0) / out["tokens"])
                    res[side][f"{w}/{n}"].append(out)
                    print(f"  round {r + 1} {side:5} {w} {n} stream(s): decode {out['decode_tps']:6.1f} tok/s/stream, "
                          f"aggregate {out['aggregate_tps']:6.1f} tok/s, engine CPU {out['cpu_ms_per_token']:5.2f} "
                          f"ms/token, drafts {out['drafted']} accepted {out['accepted']}", flush=True)
            loads.append(round(os.getloadavg()[0], 2))
            print(f"  round {r + 1} done, load average {loads[-1]}", flush=True)
    finally:
        for _port, proc, _log in procs.values():
            stop(proc)

    summary: dict[str, Any] = {}
    for side in sides:
        summary[side] = {}
        for key, runs in res[side].items():
            base = res["off"][key]
            drafted = sum(x["drafted"] for x in runs)
            same = sum(x["texts"][pid] == b["texts"][pid] for x, b in zip(runs, base) for pid in x["texts"])
            summary[side][key] = {
                "decode_tps": round(statistics.median(x["decode_tps"] for x in runs), 2),
                "aggregate_tps": round(statistics.median(x["aggregate_tps"] for x in runs), 2),
                "decode_vs_off": round(statistics.median(x["decode_tps"] for x in runs)
                                       / statistics.median(x["decode_tps"] for x in base), 3),
                "decode_vs_off_paired": round(statistics.median(x["decode_tps"] / b["decode_tps"]
                                                                for x, b in zip(runs, base)), 3),
                "aggregate_vs_off": round(statistics.median(x["aggregate_tps"] for x in runs)
                                          / statistics.median(x["aggregate_tps"] for x in base), 3),
                "engine_cpu_ms_per_token": round(statistics.median(x["cpu_ms_per_token"] for x in runs), 3),
                # off's engine CPU per token / this side's: the speed-up a machine with nothing else to
                # run would see at these threads (wall time = CPU time for a 1-thread engine)
                "cpu_speedup_vs_off": round(statistics.median(b["cpu_ms_per_token"] / x["cpu_ms_per_token"]
                                                              for x, b in zip(runs, base)), 3),
                "acceptance": round(sum(x["accepted"] for x in runs) / drafted, 3) if drafted else None,
                "draft_tokens": drafted,
                "same_text_as_off": f"{same}/{sum(len(x['texts']) for x in runs)}"}
    out = {"binary": binary.to_dict(), "threads": threads, "parallel": args.parallel, "context": args.context,
           "streams": args.streams, "per_client": args.per_client, "max_tokens": args.max_tokens,
           "rounds": args.rounds, "speculation": kinds, "load_average_per_round": loads, "results": summary}
    report(out, args.json)


if __name__ == "__main__":
    main()
