"""tars bench's concurrent chat levels: aggregate tokens/s over the wall time, TTFT percentiles, errors."""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from distributed.cli import ops
from distributed.cli.bench_chat import chat_level, render_levels

pytestmark = pytest.mark.anyio


async def test_a_level_runs_its_streams_at_once_and_sums_tokens_over_the_wall_time():
    running = 0
    peak = 0
    prompts: list[str] = []

    async def once(client, model, prompt, max_tokens):  # noqa: ANN001, ANN202
        nonlocal running, peak
        prompts.append(prompt)
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        if "Client 3, request 2" in prompt:
            raise RuntimeError("429 queue full")
        return {"tokens": 10, "ttft_ms": 5.0 + len(prompts), "decode_tokens_per_s": 100.0}

    lv = await chat_level(None, "m", 4, once=once, per_client=2, max_tokens=10, prompt="Hi", tag="L4. ")
    assert peak == 4 and len(prompts) == len(set(prompts)) == 8
    assert lv["requests"] == 8 and lv["ok"] == 7 and lv["errors"] == 1 and "429" in lv["first_error"]
    assert lv["tokens"] == 70 and 70 / lv["wall_s"] * 0.9 <= lv["aggregate_tokens_per_s"] <= 70 / 0.1
    assert lv["ttft_ms_p50"] <= lv["ttft_ms_p95"] and lv["decode_tokens_per_s_median"] == 100.0

    console = Console(record=True, width=120)
    render_levels([lv], "Chat, concurrent streams", ops._table, ops._num, console)
    text = console.export_text()
    assert "Aggregate tok/s" in text and "TTFT p95 ms" in text and "4 streams: 1 errors" in text


def test_the_cli_option_takes_stream_counts():
    assert ops._levels("1,4,8", "--chat-concurrency") == (1, 4, 8)
    import typer

    with pytest.raises(typer.BadParameter) as exc:
        ops._levels("0", "--chat-concurrency")
    assert exc.value.param_hint == "--chat-concurrency"
