"""LocalTarget: background load states, context checks, counters, embed path (fake backends)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from distributed.backends.base import BackendOptions
from distributed.backends.fake import FakeChatBackend, FakeEmbedBackend
from distributed.domain import Assignment, Completion, EmbedRequest, GenerateRequest, ModelSpec, TokenChunk
from distributed.errors import InputTooLong, ModelFailed, ModelLoading, ValidationFailed
from distributed.metrics import Metrics
from distributed.targets import LocalTarget, Rate

pytestmark = pytest.mark.anyio


CHAT = ModelSpec(id="chat-m", kind="chat", backend="fake", params_b=0.1, quant="Q4_K_M", context=4096)
EMBED = ModelSpec(id="emb-m", kind="embed", backend="fake", params_b=0.02, quant="fp32", context=256, dim=16)


def _assign(spec: ModelSpec) -> Assignment:
    return Assignment(model=spec.id, kind=spec.kind, node="n1", device="cpu", quant=spec.quant,
                      n_gpu_layers=0, vram_mb=0, reason="test", backend="fake")


def _target(spec: ModelSpec, context: int = 64, metrics: Metrics | None = None, **extra) -> LocalTarget:
    cls = FakeChatBackend if spec.kind == "chat" else FakeEmbedBackend
    opts = BackendOptions(context=context, extra=extra)
    return LocalTarget(spec, _assign(spec), lambda: cls(spec, _assign(spec), opts), node="n1",
                       queue_size=4, timeout_s=10, metrics=metrics)


async def _ready(spec: ModelSpec, **kw) -> LocalTarget:
    t = _target(spec, **kw)
    t.start()
    assert await t.wait_loaded(5) == "ready"
    return t


async def test_loads_in_the_background_loading_then_ready():
    gate = threading.Event()
    t = _target(CHAT, load_event=gate)
    t.start()
    assert t.state == "loading"
    assert await t.wait_loaded(0.05) == "loading"  # a timeout returns the state, loading or not
    with pytest.raises(ModelLoading, match="still loading"):
        await t.generate(GenerateRequest(prompt="hi"))
    gate.set()
    assert await t.wait_loaded(5) == "ready"
    assert t.info()["state"] == "ready" and t.info()["load_s"] is not None


async def test_failed_load_keeps_the_error_text():
    t = _target(CHAT, fail_models=["chat-m"])
    t.start()
    assert await t.wait_loaded(5) == "failed"
    assert "fake load failure" in t.error
    info = t.info()
    assert info["state"] == "failed" and "fake load failure" in info["error"]
    with pytest.raises(ModelFailed, match="failed to load"):
        await t.generate(GenerateRequest(prompt="hi"))


async def test_stream_yields_chunks_then_one_completion_with_stats():
    t = await _ready(CHAT, reply_tokens=6)
    items = [x async for x in t.stream(GenerateRequest(prompt="one two three", max_tokens=10))]
    chunks, final = items[:-1], items[-1]
    assert all(isinstance(c, TokenChunk) and c.text for c in chunks) and len(chunks) == 6
    assert isinstance(final, Completion) and final.text == ""
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 6
    assert final.finish_reason == "stop" and final.node == "n1"
    assert final.timings.total_ms >= final.timings.ttft_ms > 0
    assert final.timings.tokens_per_s > 0


async def test_generate_joins_the_text_and_counts_requests_and_tokens():
    m = Metrics("n1")
    t = await _ready(CHAT, metrics=m, reply_tokens=4)
    c = await t.generate(GenerateRequest(prompt="hello there", max_tokens=10, seed=1))
    again = await t.generate(GenerateRequest(prompt="hello there", max_tokens=10, seed=1))
    assert c.text == again.text and len(c.text.split()) == 4  # deterministic
    info = t.info()
    assert info["requests"] == 2 and info["tokens_generated"] == 8
    assert info["last_tokens_per_s"] > 0 and info["queue_depth"] == 0
    assert info["context"] == 64 and info["backend"] == "fake" and info["node"] == "n1"
    assert t.tokens_per_s() > 0
    text = m.render().decode()
    assert 'tars_tokens_generated_total{model="chat-m"} 8.0' in text
    assert 'tars_time_to_first_token_seconds_count{model="chat-m"} 2.0' in text


async def test_prompt_as_long_as_the_context_is_refused_with_the_limit():
    t = await _ready(CHAT, context=16)
    with pytest.raises(InputTooLong) as ei:
        await t.generate(GenerateRequest(prompt=" ".join(["w"] * 16), max_tokens=1))
    assert ei.value.limit == 16 and ei.value.got == 16
    assert "16 tokens" in ei.value.message and ei.value.http_status == 400
    assert t.info()["requests"] == 0  # refused before it queued


async def test_max_tokens_beyond_the_context_is_clamped_with_a_note():
    t = await _ready(CHAT, context=16, reply_tokens=100)
    c = await t.generate(GenerateRequest(prompt=" ".join(["w"] * 10), max_tokens=50))
    assert c.usage.completion_tokens == 6 and c.finish_reason == "length"
    assert len(c.notes) == 1 and "clamped from 50 to 6" in c.notes[0] and "16 tokens" in c.notes[0]


async def test_empty_prompt_and_wrong_kind_are_validation_errors():
    t = await _ready(CHAT)
    with pytest.raises(ValidationFailed) as ei:
        await t.generate(GenerateRequest(prompt="   "))
    assert ei.value.field == "prompt"
    with pytest.raises(ValidationFailed, match="cannot embed"):
        await t.embed(EmbedRequest(input=["x"]))


async def test_embed_returns_vectors_counts_and_records_metrics():
    m = Metrics("n1")
    t = await _ready(EMBED, metrics=m)
    e = await t.embed(EmbedRequest(input=["a b c", "d"]))
    assert isinstance(e.vectors, np.ndarray) and e.vectors.shape == (2, 16) and e.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(e.vectors, axis=1), 1.0)
    assert e.prompt_tokens == 4 and e.node == "n1" and e.dim == 16
    again = await t.embed(EmbedRequest(input=["d"]))
    assert np.allclose(again.vectors[0], e.vectors[1])  # same text, same vector, whatever the batch
    assert t.info()["embeddings"] == 3 and t.info()["dim"] == 16
    assert 'tars_embeddings_total{model="emb-m"} 3.0' in m.render().decode()
    with pytest.raises(ValidationFailed) as ei:
        await t.embed(EmbedRequest(input=[]))
    assert ei.value.field == "input"


async def test_queue_depth_counts_waiting_and_running():
    t = await _ready(CHAT, reply_tokens=30, token_delay_s=0.01)
    tasks = [asyncio.create_task(t.generate(GenerateRequest(prompt=f"p{i}", max_tokens=30))) for i in range(3)]
    for _ in range(500):
        if t.queue_depth == 3:
            break
        await asyncio.sleep(0.002)
    assert t.queue_depth == 3 and t.info()["queue_depth"] == 3
    await asyncio.gather(*tasks)
    assert t.queue_depth == 0


async def test_close_unloads_and_marks_unavailable():
    t = await _ready(CHAT)
    backend = t.backend
    await t.close()
    assert t.state == "unavailable" and backend is not None and backend.loaded is False
    with pytest.raises(ModelFailed):
        await t.generate(GenerateRequest(prompt="x"))


def test_rate_is_a_sliding_window():
    now = [100.0]
    r = Rate(window_s=10, clock=lambda: now[0])
    r.add(50)
    now[0] += 6
    r.add(50)
    assert r.per_s() == 10.0
    now[0] += 5  # the first event is now 11 s old: out of the window
    assert r.per_s() == 5.0
    now[0] += 10
    assert r.per_s() == 0.0


async def test_wait_loaded_wakes_every_waiter_when_the_load_ends():
    gate = threading.Event()
    t = _target(CHAT, load_event=gate)
    t.start()
    waiters = [asyncio.ensure_future(t.wait_loaded()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    gate.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == ["ready"] * 3
    assert await t.wait_loaded() == "ready"  # already loaded: at once
