"""The whole HTTP API in process (httpx ASGITransport) over the fake backends.

Every endpoint, every bad-input case of issue 3 §4, SSE formats, 429, API key,
health while loading and with a failed model, client disconnects, and the
official ``openai`` client parsing our /v1 answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from distributed.api.app import create_app
from distributed.api.schemas import EmbedResponse, ErrorResponse, InferenceResponse
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.settings import load_settings

pytestmark = pytest.mark.anyio

CHAT, EMBED = "gemma-3-270m", "all-MiniLM-L6-v2"


def _profile(name: str) -> HostProfile:
    return HostProfile(hostname=name, cpu_model="test cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000)


@contextlib.asynccontextmanager
async def serve(tmp_path, wait: bool = True, extra: dict[str, Any] | None = None,
                **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    settings = load_settings(None, **{"node_name": "pc1", "backend_override": "fake", "models_dir": tmp_path,
                                      "models": [CHAT, EMBED], **overrides})
    service = build(settings, profile=_profile("pc1"), backend_extra=extra)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pc1") as client:
            client.app = app  # type: ignore[attr-defined]
            if wait:
                for t in node.local_targets():
                    await t.wait_loaded(10)
            yield client, node


def _chat_backend(node: Node) -> Any:
    return node.targets[CHAT].backend  # type: ignore[attr-defined]


def _error(r: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    ErrorResponse.model_validate(body)
    assert body["node"] == "pc1" and body["via"] == "pc1"
    if kind:
        assert body["error"]["type"] == kind
    assert "Traceback" not in r.text
    return body["error"]


def _openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# =========================================================================== read-only endpoints
async def test_health_status_models_config(tmp_path):
    async with serve(tmp_path, api_key="sekrit", cluster_token="tok") as (c, node):
        auth = {"Authorization": "Bearer sekrit"}
        r = await c.get("/health")
        assert r.status_code == 200
        assert r.json()["status"] == "ok" and r.json()["node"] == "pc1" and r.json()["via"] == "pc1"

        r = await c.get("/models", headers=auth)
        models = {m["id"]: m for m in r.json()["models"]}
        assert set(models) == {CHAT, EMBED}
        for m in models.values():
            assert {"id", "kind", "backend", "quant", "node", "state"} <= set(m)
            assert m["node"] == "pc1" and m["state"] == "ready" and m["backend"] in ("fake", "fake_embed")
        assert models[CHAT]["kind"] == "chat" and models[EMBED]["kind"] == "embed"

        s = (await c.get("/status", headers=auth)).json()
        for key in ("node", "role", "version", "uptime_s", "healthy", "profile", "gpus", "ram", "models",
                    "totals", "peers", "plan", "via"):
            assert key in s, key
        assert s["healthy"] is True and s["peers"] == [] and s["role"] == "server"
        assert set(s["totals"]) >= {"tokens_per_s", "embeddings_per_s", "queue_depth", "requests"}
        assert {a["model"] for a in s["plan"]["assignments"]} == {CHAT, EMBED}
        m = next(x for x in s["models"] if x["id"] == CHAT)
        assert {"queue_depth", "requests", "tokens_generated", "last_tokens_per_s"} <= set(m)

        cfg = (await c.get("/config", headers=auth)).json()
        assert cfg["settings"]["api_key"] == "***" and cfg["settings"]["cluster_token"] == "***"
        assert "sekrit" not in (await c.get("/config", headers=auth)).text
        assert cfg["settings"]["node_name"] == "pc1" and cfg["node"] == "pc1"

        v1 = (await c.get("/v1/models", headers=auth)).json()
        assert v1["object"] == "list" and {d["id"] for d in v1["data"]} == {CHAT, EMBED}
        assert all(d["object"] == "model" and d["owned_by"] == "pc1" for d in v1["data"])


async def test_health_is_503_loading_until_ready(tmp_path):
    gate = threading.Event()
    async with serve(tmp_path, wait=False, extra={"load_event": gate}) as (c, node):
        r = await c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert set(r.json()["loading"]) == {CHAT, EMBED}
        r = await c.post("/inference", json={"prompt": "hi"})
        _error(r, 503, "model_loading")
        assert "still loading" in r.json()["error"]["message"]
        gate.set()
        for t in node.local_targets():
            await t.wait_loaded(5)
        assert (await c.get("/health")).status_code == 200


async def test_a_failed_model_leaves_the_node_up_and_is_named(tmp_path):
    async with serve(tmp_path, extra={"fail_models": [EMBED]}) as (c, node):
        r = await c.get("/health")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "failed" and EMBED in body["failed"] and "fake load failure" in body["failed"][EMBED]
        s = (await c.get("/status")).json()
        m = next(x for x in s["models"] if x["id"] == EMBED)
        assert m["state"] == "failed" and "fake load failure" in m["error"]
        assert s["healthy"] is False
        err = _error(await c.post("/embed", json={"input": "x"}), 503, "model_failed")
        assert EMBED in err["message"]
        assert (await c.post("/inference", json={"prompt": "still works"})).status_code == 200


# =========================================================================== generation
async def test_inference_answer_shape_and_default_model(tmp_path):
    async with serve(tmp_path) as (c, node):
        r = await c.post("/inference", json={"prompt": "hello world", "max_tokens": 5, "seed": 3})
        assert r.status_code == 200
        body = InferenceResponse.model_validate(r.json())
        assert body.model == CHAT and body.node == "pc1" and body.via == "pc1"
        assert body.usage.prompt_tokens == 2 and body.usage.completion_tokens == len(body.text.split())
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
        assert body.timings.total_ms > 0 and body.finish_reason in ("stop", "length")
        again = (await c.post("/inference", json={"model": CHAT, "prompt": "hello world", "max_tokens": 5,
                                                  "seed": 3})).json()
        assert again["text"] == body.text
        msgs = await c.post("/inference", json={"messages": [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "hi"}]})
        assert msgs.status_code == 200 and msgs.json()["usage"]["prompt_tokens"] == 5  # "system: be brief\nuser: hi"


async def test_inference_stream_sse_format(tmp_path):
    async with serve(tmp_path, extra={"reply_tokens": 4}) as (c, node):
        r = await c.post("/inference", json={"prompt": "a b c", "stream": True, "max_tokens": 10})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.text.split("\n\n") if e]
        assert len(events) == 5
        tokens = []
        for e in events[:-1]:
            name, data = e.split("\n")
            assert name == "event: token" and data.startswith("data: ")
            payload = orjson.loads(data[6:])
            assert payload["type"] == "token"
            tokens.append(payload["text"])
        name, data = events[-1].split("\n")
        assert name == "event: done"
        done = orjson.loads(data[6:])
        assert done["type"] == "done" and done["text"] == "".join(tokens)
        assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        assert set(done["timings"]) == {"ttft_ms", "total_ms", "tokens_per_s"}
        assert done["node"] == "pc1" and done["via"] == "pc1" and done["finish_reason"] == "stop"


async def test_openai_chat_and_completion_shapes_and_streams(tmp_path):
    async with serve(tmp_path, extra={"reply_tokens": 3}) as (c, node):
        r = (await c.post("/v1/chat/completions", json={"model": CHAT, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi there"}]}]})).json()
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == CHAT
        ch = r["choices"][0]
        assert ch["message"]["role"] == "assistant" and len(ch["message"]["content"].split()) == 3
        assert ch["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 3 and r["node"] == "pc1"

        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "stream": True, "stream_options": {"include_usage": True}})
        lines = [line for line in r.text.split("\n\n") if line]
        assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
        chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"] for ch in chunks)
        content = [ch["choices"][0]["delta"].get("content") for ch in chunks[1:4]]
        assert len("".join(content).split()) == 3
        assert chunks[4]["choices"][0]["finish_reason"] == "stop" and chunks[4]["choices"][0]["delta"] == {}
        assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3

        r = (await c.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 2})).json()
        assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] == "length"
        assert len(r["choices"][0]["text"].split()) == 2
        r = await c.post("/v1/completions", json={"prompt": "once upon", "stream": True})
        lines = [line for line in r.text.split("\n\n") if line]
        assert lines[-1] == "data: [DONE]"
        texts = [orjson.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
        assert len("".join(texts).split()) == 3


async def test_official_openai_client_parses_every_v1_answer(tmp_path):
    openai = pytest.importorskip("openai")
    async with serve(tmp_path, api_key="k1", extra={"reply_tokens": 5}) as (c, node):
        http = httpx.AsyncClient(transport=c._transport, base_url="http://pc1/v1")
        client = openai.AsyncOpenAI(base_url="http://pc1/v1", api_key="k1", http_client=http)
        models = await client.models.list()
        assert {m.id for m in models.data} == {CHAT, EMBED}
        chat = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8)
        assert chat.choices[0].message.content and chat.usage.completion_tokens == 5
        stream = await client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        pieces = [ch.choices[0].delta.content async for ch in stream if ch.choices and ch.choices[0].delta.content]
        assert "".join(pieces) == chat.choices[0].message.content
        comp = await client.completions.create(model=CHAT, prompt="tell me", max_tokens=3)
        assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 3
        emb = await client.embeddings.create(model=EMBED, input=["one", "two words"])  # base64 by default
        flt = await client.embeddings.create(model=EMBED, input=["one", "two words"], encoding_format="float")
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 384
        assert np.allclose(emb.data[1].embedding, flt.data[1].embedding, atol=1e-6)
        assert emb.usage.prompt_tokens == 3
        with pytest.raises(openai.NotFoundError) as ei:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert "available models" in str(ei.value)
        bad = openai.AsyncOpenAI(base_url="http://pc1/v1", api_key="wrong", http_client=http)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()


# =========================================================================== embeddings
async def test_embed_native_and_openai(tmp_path):
    async with serve(tmp_path) as (c, node):
        r = await c.post("/embed", json={"input": "just one"})
        body = EmbedResponse.model_validate(r.json())
        assert body.dim == 384 and len(body.embeddings) == 1 and body.usage.prompt_tokens == 2
        assert abs(np.linalg.norm(body.embeddings[0]) - 1) < 1e-5 and body.model == EMBED
        raw = (await c.post("/embed", json={"input": ["just one"], "normalize": False})).json()
        assert abs(np.linalg.norm(raw["embeddings"][0]) - 1) > 1e-3
        v = np.asarray(raw["embeddings"][0])
        assert np.allclose(v / np.linalg.norm(v), body.embeddings[0], atol=1e-5)

        f = (await c.post("/v1/embeddings", json={"input": ["a", "b c"], "model": EMBED})).json()
        b = (await c.post("/v1/embeddings", json={"input": ["a", "b c"], "encoding_format": "base64"})).json()
        assert f["object"] == "list" and [d["index"] for d in f["data"]] == [0, 1]
        assert f["data"][0]["object"] == "embedding" and f["usage"] == {"prompt_tokens": 3, "completion_tokens": 0,
                                                                       "total_tokens": 3}
        decoded = np.frombuffer(base64.b64decode(b["data"][1]["embedding"]), dtype="<f4")
        assert np.allclose(decoded, f["data"][1]["embedding"], atol=1e-6)
        err = _openai_error(await c.post("/v1/embeddings", json={"input": "a", "dimensions": 12}), 400)
        assert err["param"] == "dimensions" and "384" in err["message"]
        err = _openai_error(await c.post("/v1/embeddings", json={"input": [[1, 2, 3]]}), 400)
        assert "token" in err["message"]


# =========================================================================== bad input (issue 3 §4)
async def test_unknown_model_is_404_listing_the_models(tmp_path):
    async with serve(tmp_path) as (c, node):
        err = _error(await c.post("/inference", json={"model": "llama-9000", "prompt": "hi"}), 404, "model_not_found")
        assert "llama-9000" in err["message"] and CHAT in err["message"] and EMBED in err["message"]
        assert err["details"]["available"] == sorted([CHAT, EMBED])
        e = _openai_error(await c.post("/v1/chat/completions", json={
            "model": "llama-9000", "messages": [{"role": "user", "content": "x"}]}), 404)
        assert e["code"] == "model_not_found" and e["param"] == "model" and CHAT in e["message"]
        _error(await c.post("/embed", json={"model": "nope", "input": "x"}), 404, "model_not_found")


async def test_empty_prompt_messages_and_input_are_400(tmp_path):
    async with serve(tmp_path) as (c, node):
        assert _error(await c.post("/inference", json={"prompt": ""}), 400)["details"]["field"] == "prompt"
        assert _error(await c.post("/inference", json={"prompt": "   "}), 400)["details"]["field"] == "prompt"
        assert _error(await c.post("/inference", json={"messages": []}), 400)["details"]["field"] == "messages"
        assert _error(await c.post("/embed", json={"input": ""}), 400)["details"]["field"] == "input"
        assert _error(await c.post("/embed", json={"input": []}), 400)["details"]["field"] == "input"
        assert _error(await c.post("/embed", json={"input": ["ok", ""]}), 400)["details"]["field"] == "input[1]"
        assert _openai_error(await c.post("/v1/completions", json={"prompt": ""}), 400)["param"] == "prompt"
        assert _openai_error(await c.post("/v1/chat/completions", json={"messages": []}), 400)["param"] == "messages"
        assert _openai_error(await c.post("/v1/embeddings", json={"input": []}), 400)["param"] == "input"


async def test_prompt_longer_than_the_context_is_400_with_the_limit(tmp_path):
    async with serve(tmp_path, context=128) as (c, node):
        err = _error(await c.post("/inference", json={"prompt": "word " * 200}), 400, "input_too_long")
        assert err["details"]["limit"] == 128 and err["details"]["got"] == 200 and "128" in err["message"]
        e = _openai_error(await c.post("/v1/completions", json={"prompt": "word " * 300}), 400)
        assert e["code"] == "input_too_long" and "128" in e["message"]


async def test_max_tokens_beyond_the_context_is_clamped_and_said(tmp_path):
    async with serve(tmp_path, context=128, extra={"reply_tokens": 1000}) as (c, node):
        r = (await c.post("/inference", json={"prompt": "word " * 100, "max_tokens": 500})).json()
        assert r["usage"]["completion_tokens"] == 28 and r["finish_reason"] == "length"
        assert "clamped from 500 to 28" in r["notes"][0]
        r = (await c.post("/v1/completions", json={"prompt": "word " * 100, "max_tokens": 500})).json()
        assert r["usage"]["completion_tokens"] == 28 and "clamped" in r["notes"][0]
        e = _error(await c.post("/inference", json={"prompt": "x", "max_tokens": 0}), 400)
        assert e["details"]["field"] == "max_tokens"


async def test_malformed_json_missing_and_wrong_fields_are_named(tmp_path):
    async with serve(tmp_path) as (c, node):
        h = {"content-type": "application/json"}
        err = _error(await c.post("/inference", content=b'{"prompt": "x",', headers=h), 400)
        assert "not valid JSON" in err["message"] and err["details"]["field"] == "body"
        err = _error(await c.post("/inference", content=b"[1, 2]", headers=h), 400)
        assert err["details"]["field"] == "body"
        _error(await c.post("/inference", content=b"", headers=h), 400)
        err = _error(await c.post("/embed", json={"normalize": True}), 400)
        assert err["details"]["field"] == "input" and "required" in err["message"]
        err = _error(await c.post("/inference", json={"prompt": "x", "max_tokens": "lots"}), 400)
        assert err["details"]["field"] == "max_tokens" and "integer" in err["message"]
        err = _error(await c.post("/inference", json={"prompt": "x", "max_token": 5}), 400)
        assert err["details"]["field"] == "max_token" and "unknown field" in err["message"]
        err = _error(await c.post("/inference", json={"prompt": "x", "temperature": 9}), 400)
        assert err["details"]["field"] == "temperature"
        err = _error(await c.post("/inference", json={"messages": [{"role": "robot", "content": "x"}]}), 400)
        assert err["details"]["field"] == "messages[0].role"
        e = _openai_error(await c.post("/v1/chat/completions", json={"model": CHAT}), 400)
        assert e["param"] == "messages" and "required" in e["message"]
        e = _openai_error(await c.post("/v1/chat/completions", content=b"nope", headers=h), 400)
        assert e["param"] == "body"
        e = _openai_error(await c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "n": 99}), 400)  # n up to 16 is served
        assert e["param"] == "n"
        e = _openai_error(await c.post("/v1/embeddings", json={"input": "x", "model": CHAT}), 400)
        assert e["param"] == "model" and "chat model" in e["message"]


async def test_body_over_the_limit_is_413(tmp_path):
    async with serve(tmp_path, max_body_bytes=2048) as (c, node):
        err = _error(await c.post("/inference", json={"prompt": "x" * 5000}), 413, "payload_too_large")
        assert "2048" in err["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}'

        r = await c.post("/inference", content=chunked(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        _error(r, 413, "payload_too_large")
        e = _openai_error(await c.post("/v1/embeddings", json={"input": "z" * 5000}), 413)
        assert e["code"] == "payload_too_large"
        assert (await c.post("/inference", json={"prompt": "small"})).status_code == 200


async def test_full_queue_is_429_with_retry_after(tmp_path):
    # 15 tokens of 0.1 s: the running request holds the queue for 1.5 s, long enough on a busy machine
    async with serve(tmp_path, queue_size=1, extra={"token_delay_s": 0.1, "reply_tokens": 15}) as (c, node):
        body = {"prompt": "slow one", "max_tokens": 15}
        target = node.targets[CHAT]
        running = asyncio.create_task(c.post("/inference", json=body))
        for _ in range(1000):
            if target.queue_depth == 1:
                break
            await asyncio.sleep(0.002)
        waiting = asyncio.create_task(c.post("/inference", json=body))
        for _ in range(1000):
            if target.queue_depth == 2:
                break
            await asyncio.sleep(0.002)
        assert target.queue_depth == 2
        r = await c.post("/inference", json=body)
        err = _error(r, 429, "overloaded")
        assert int(r.headers["retry-after"]) >= 1 and err["details"]["retry_after"] >= 1
        r = await c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert _openai_error(r, 429)["type"] == "rate_limit_error" and "retry-after" in r.headers
        assert [x.status_code for x in await asyncio.gather(running, waiting)] == [200, 200]
        assert _chat_backend(node).max_active == 1


async def test_api_key_is_required_except_on_health_and_dashboard(tmp_path):
    async with serve(tmp_path, api_key="s3cret") as (c, node):
        assert (await c.get("/health")).status_code == 200
        assert (await c.get("/dashboard")).status_code in (200, 404)  # public either way (404: assets absent)
        assert (await c.get("/dashboard")).status_code != 401
        for path in ("/status", "/models", "/config", "/metrics"):
            r = await c.get(path)
            _error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        _error(await c.post("/inference", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
        _error(await c.get("/status", headers={"Authorization": "Basic s3cret"}), 401)
        assert _openai_error(await c.get("/v1/models"), 401)["type"] == "authentication_error"
        ok = {"Authorization": "Bearer s3cret"}
        assert (await c.get("/status", headers=ok)).status_code == 200
        assert (await c.post("/inference", json={"prompt": "x"}, headers=ok)).status_code == 200


async def test_unknown_route_and_internal_errors_keep_the_error_shape(tmp_path, monkeypatch):
    async with serve(tmp_path) as (c, node):
        _error(await c.get("/nope"), 404, "not_found")
        _error(await c.get("/inference"), 405, "method_not_allowed")

        def boom() -> dict:
            raise RuntimeError("secret internals /home/user/.ssh")

        monkeypatch.setattr(node, "status", boom)
        r = await c.get("/status")
        err = _error(r, 500)
        assert "secret" not in r.text and "internal" in err["message"]


async def test_metrics_endpoint_counts_requests_by_endpoint_and_model(tmp_path):
    async with serve(tmp_path) as (c, node):
        await c.post("/inference", json={"prompt": "count me"})
        await c.post("/v1/embeddings", json={"input": ["a", "b"]})
        await c.post("/inference", json={"model": "nope", "prompt": "x"})
        text = (await c.get("/metrics")).text
        assert f'tars_requests_total{{endpoint="/inference",model="{CHAT}",status="200"}} 1.0' in text
        assert f'tars_requests_total{{endpoint="/v1/embeddings",model="{EMBED}",status="200"}} 1.0' in text
        # a model that does not exist is counted under one label (issue 11: bounded cardinality)
        assert 'tars_requests_total{endpoint="/inference",model="unknown",status="404"} 1.0' in text
        assert f'tars_embeddings_total{{model="{EMBED}"}} 2.0' in text
        assert f'tars_tokens_generated_total{{model="{CHAT}"}}' in text
        assert f'tars_time_to_first_token_seconds_count{{model="{CHAT}"}} 1.0' in text
        assert f'tars_queue_depth{{model="{CHAT}"}} 0.0' in text


# =========================================================================== client disconnects
async def _raw(app: Any, path: str, payload: dict[str, Any], disconnect_after_chunks: int | None,
               disconnect_after_s: float | None = None) -> list[dict[str, Any]]:
    """Drive the ASGI app by hand so the client can vanish mid-answer."""
    body = orjson.dumps(payload)
    gone = asyncio.Event()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if disconnect_after_chunks is not None and len(chunks) >= disconnect_after_chunks:
            gone.set()

    if disconnect_after_s is not None:
        asyncio.get_running_loop().call_later(disconnect_after_s, gone.set)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 5000), "server": ("pc1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


async def _wait_idle(node: Node) -> Any:
    backend = _chat_backend(node)
    for _ in range(200):
        if backend.active == 0:
            break
        await asyncio.sleep(0.01)
    return backend


@pytest.mark.parametrize("path", ["/inference", "/v1/chat/completions"])
async def test_client_disconnect_stops_a_stream(tmp_path, path):
    async with serve(tmp_path, extra={"token_delay_s": 0.01, "reply_tokens": 500}) as (c, node):
        payload = {"max_tokens": 500, "stream": True}
        payload.update({"prompt": "go on"} if path == "/inference" else
                       {"messages": [{"role": "user", "content": "go on"}]})
        sent = await _raw(c.app, path, payload, disconnect_after_chunks=4)
        backend = await _wait_idle(node)
        assert backend.active == 0 and backend.cancelled == 1
        assert backend.tokens_produced < 100
        assert sent[0]["status"] == 200
        # the model is free again: a new request is served at once
        r = await c.post("/inference", json={"prompt": "next", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


async def test_client_disconnect_stops_a_non_streamed_generation(tmp_path):
    async with serve(tmp_path, extra={"token_delay_s": 0.01, "reply_tokens": 500}) as (c, node):
        await _raw(c.app, "/inference", {"prompt": "go on", "max_tokens": 500}, None, disconnect_after_s=0.1)
        backend = await _wait_idle(node)
        assert backend.cancelled == 1 and backend.tokens_produced < 100


async def test_openapi_document_is_complete(tmp_path):
    import re

    async with serve(tmp_path) as (c, node):
        r = await c.get("/openapi.json")
        assert r.status_code == 200
        doc = r.json()
        for path in ("/inference", "/embed", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            assert "requestBody" in doc["paths"][path]["post"], path
        refs = set(re.findall(r"#/components/schemas/([A-Za-z0-9_]+)", r.text))
        assert refs and refs <= set(doc["components"]["schemas"])
        assert (await c.get("/docs")).status_code == 200
