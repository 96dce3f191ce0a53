"""``tars bench``: chat at several concurrent streams (the engine's slots at work).

At each level, ``streams`` clients each send ``per_client`` streamed chat requests back to
back, all at once; reported: aggregate tokens/s (all tokens over the level's wall time),
time to first token p50/p95 over every request, the median per-stream decode rate, and
errors (a 429 counts as an error: the queue was full).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

Once = Callable[[Any, str, str, int], Awaitable[dict[str, Any]]]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def chat_level(client: Any, model: str, streams: int, *, once: Once, per_client: int = 2, max_tokens: int = 64,
                     prompt: str = "", tag: str = "") -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker(w: int) -> None:
        for i in range(per_client):
            # a distinct start per request: llama.cpp's prompt cache must not fake the first token
            text = f"{tag}Client {w + 1}, request {i + 1} of {streams}x{per_client}. {prompt}"
            try:
                runs.append(await once(client, model, text, max_tokens))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the level goes on
                errors.append(getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(streams)))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    ttfts = [r["ttft_ms"] for r in runs if r.get("ttft_ms") is not None]
    decode = [r["decode_tokens_per_s"] for r in runs if r.get("decode_tokens_per_s")]
    return {"streams": streams, "requests": streams * per_client, "ok": len(runs), "errors": len(errors),
            "tokens": tokens, "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "ttft_ms_p50": _pct(ttfts, 0.5), "ttft_ms_p95": _pct(ttfts, 0.95),
            "decode_tokens_per_s_median": statistics.median(decode) if decode else None,
            "first_error": errors[0] if errors else None}


def render_levels(levels: list[dict[str, Any]], title: str, table: Callable[..., Any], num: Callable[..., str],
                  console: Any) -> None:
    cols = ("Streams", "Requests", "Errors", "Aggregate tok/s", "TTFT p50 ms", "TTFT p95 ms", "Decode tok/s/stream")
    t = table(title, cols, cols)
    for lv in levels:
        t.add_row(str(lv["streams"]), str(lv["requests"]), str(lv["errors"]), num(lv["aggregate_tokens_per_s"], 1),
                  num(lv["ttft_ms_p50"], 1), num(lv["ttft_ms_p95"], 1), num(lv["decode_tokens_per_s_median"], 1))
    console.print(t)
    for lv in levels:
        if lv["first_error"]:
            console.print(f"[red]{lv['streams']} streams: {lv['errors']} errors, first: {lv['first_error']}[/red]")
