"""What the OpenAI chat parameters cost on the in-process engine, as ratios in one run.

Our ``LlamaCppBackend.stream`` on SmolLM2-135M-Instruct (the embedded instruct default),
greedy, the same prompt each time, alternating between:

* ``plain``    — llama-cpp-python's own ``create_completion`` loop (the default path)
* ``logprobs`` — our ``LogprobDecoder`` (log-softmax of the sampled position's logits,
  ``top_logprobs=5``): the per-token price of logprobs without ``logits_all``
* ``schema``   — ``response_format`` json_schema (llama.cpp grammar sampling)

Decode tokens/s (tokens after the first / time after the first), median over the rounds,
and each variant's ratio to ``plain``::

    python -m benchmarks.bench_surface [--rounds 5] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import tempfile
import time
from pathlib import Path
from typing import Any

from distributed.backends.base import BackendOptions
from distributed.backends.llama_cpp import LlamaCppBackend
from distributed.catalog import load_catalog
from distributed.domain import Assignment, GenerateRequest
from distributed.store import ModelStore

MODEL = "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}},
          "required": ["names"]}


def _one(backend: LlamaCppBackend, req: GenerateRequest) -> tuple[int, float]:
    backend.check_request(req)
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in backend.stream(req, threading.Event()):
        if chunk.text:
            n += chunk.tokens or 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return n, ((n - 1) / (end - first)) if first is not None and n > 1 and end > first else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    spec = load_catalog().get(MODEL)
    path = ModelStore(Path(tempfile.gettempdir()) / "tars-bench-models").ensure(spec)  # read in place
    a = Assignment(model=MODEL, kind="chat", node="bench", device="cpu", quant=spec.quant, n_gpu_layers=0,
                   vram_mb=0, reason="bench")
    backend = LlamaCppBackend(spec, a, BackendOptions(context=1024, threads=args.threads), path)
    backend.load()
    msgs = [{"role": "user", "content": "List as many animals as you can, as JSON."}]
    base = dict(model=MODEL, messages=msgs, max_tokens=args.tokens, temperature=0.0, seed=1)
    variants: dict[str, dict[str, Any]] = {
        "plain": {}, "logprobs": {"logprobs": True, "top_logprobs": 5},
        "schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, extra in variants.items():
            n, tps = _one(backend, GenerateRequest(**base, **extra))
            rates[name].append(tps)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"model": MODEL, "rounds": args.rounds, "tokens": args.tokens,
           "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
           "ratio_to_plain": {k: round(v / med["plain"], 3) for k, v in med.items()}}
    print(json.dumps(out, indent=2))
    backend.unload()


if __name__ == "__main__":
    main()
