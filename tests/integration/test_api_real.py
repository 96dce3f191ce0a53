"""The app in process over the real embedded models: Gemma 3 270M (llama.cpp) and
all-MiniLM-L6-v2 (sentence-transformers). Slow: loads both models once per module."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from distributed.settings import load_settings
from tests.support import serve_in_process

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHAT, EMBED = "gemma-3-270m", "all-MiniLM-L6-v2"
CONTEXT = 512


@pytest.fixture(scope="module")
async def real(gemma_gguf, minilm_dir, models_dir) -> Any:
    settings = load_settings(None, node_name="real1", models_dir=models_dir, context=CONTEXT, threads=2,
                             models=[CHAT, EMBED])
    async with serve_in_process(settings) as (client, node):
        yield client, node


async def test_health_and_models_after_loading(real):
    c, node = real
    r = await c.get("/health")
    assert r.status_code == 200 and r.json()["models"] == {CHAT: "ready", EMBED: "ready"}
    models = {m["id"]: m for m in (await c.get("/models")).json()["models"]}
    assert models[CHAT]["backend"] == "llama_cpp" and models[CHAT]["context"] == CONTEXT
    assert models[EMBED]["backend"] == "sentence" and models[EMBED]["dim"] == 384


async def test_chat_non_streamed_and_streamed_agree(real):
    c, node = real
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 24, "temperature": 0.0, "seed": 7}
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    whole = r.json()
    text = whole["choices"][0]["message"]["content"]
    assert text.strip() and whole["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < whole["usage"]["completion_tokens"] <= 24 and whole["usage"]["prompt_tokens"] > 5
    assert whole["node"] == "real1" and whole["timings"]["tokens_per_s"] > 0

    r = await c.post("/v1/chat/completions", json={**body, "stream": True})
    lines = [x for x in r.text.split("\n\n") if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(x[6:]) for x in lines[:-1]]
    streamed = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert streamed == text  # greedy decoding: the same answer either way
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


async def test_completion_and_native_stream_stats(real):
    c, node = real
    r = await c.post("/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8,
                                              "temperature": 0.0})
    comp = r.json()
    assert r.status_code == 200 and comp["object"] == "text_completion" and comp["choices"][0]["text"]
    assert comp["usage"]["completion_tokens"] <= 8

    r = await c.post("/inference", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.0,
                                         "stream": True})
    events = [e for e in r.text.split("\n\n") if e]
    tokens = [orjson.loads(e.split("\n")[1][6:]) for e in events if e.startswith("event: token")]
    done = orjson.loads(events[-1].split("\n")[1][6:])
    assert events[-1].startswith("event: done") and done["text"] == "".join(t["text"] for t in tokens)
    assert done["usage"]["completion_tokens"] == len(tokens) > 0
    assert done["timings"]["ttft_ms"] > 0 and done["timings"]["total_ms"] >= done["timings"]["ttft_ms"]


async def test_real_context_limit_and_clamp(real):
    c, node = real
    r = await c.post("/inference", json={"prompt": "hello " * 700})
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "input_too_long" and err["details"]["limit"] == CONTEXT
    r = await c.post("/inference", json={"prompt": "hello " * 450, "max_tokens": 400, "temperature": 0.0})
    body = r.json()
    assert r.status_code == 200 and body["notes"] and "clamped from 400" in body["notes"][0]
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= CONTEXT


async def test_embeddings_match_in_process_sentence_transformers(real, minilm_dir):
    c, node = real
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    r = await c.post("/v1/embeddings", json={"model": EMBED, "input": texts, "encoding_format": "float"})
    assert r.status_code == 200
    body = r.json()
    vecs = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert vecs.shape == (3, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2  # meaning, not noise
    assert body["usage"]["prompt_tokens"] > 10

    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.allclose(vecs, ref, atol=1e-4)
    native = (await c.post("/embed", json={"input": texts[0]})).json()
    assert native["dim"] == 384 and np.allclose(native["embeddings"][0], ref[0], atol=1e-4)


async def test_concurrent_embeddings_are_batched(real):
    c, node = real
    target = node.targets[EMBED]
    before = target.batcher.batches
    texts = [f"sentence number {i} about topic {i % 5}" for i in range(24)]
    rs = await asyncio.gather(*(c.post("/v1/embeddings", json={"input": t}) for t in texts))
    assert all(r.status_code == 200 for r in rs)
    assert target.batcher.batches - before < len(texts)  # merged into fewer encode calls


async def test_official_openai_client_on_real_models(real):
    openai = pytest.importorskip("openai")
    c, node = real
    http = httpx.AsyncClient(transport=c._transport, base_url="http://real1/v1", timeout=120)
    client = openai.AsyncOpenAI(base_url="http://real1/v1", api_key="unused", http_client=http)
    chat = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi!"}],
                                                max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    emb = await client.embeddings.create(model=EMBED, input="hello world")
    assert len(emb.data[0].embedding) == 384
    stream = await client.completions.create(model=CHAT, prompt="1, 2, 3,", max_tokens=6, stream=True,
                                             temperature=0)
    text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    assert text
