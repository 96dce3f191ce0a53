"""The chat surface's own logic over the fake engine (fast): an engine that cannot honour
a parameter refuses it by name; n choices fan out (also streamed, interleaved); streamed
usage; the openai client reads n choices."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from distributed.api.app import create_app
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.settings import load_settings

pytestmark = pytest.mark.anyio

CHAT = "gemma-3-270m"
MSG = [{"role": "user", "content": "hello there"}]


@contextlib.asynccontextmanager
async def serve(tmp_path: Any, settings_kw: dict[str, Any] | None = None,
                **extra: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    settings = load_settings(None, node_name="pc1", backend_override="fake", models_dir=tmp_path, models=[CHAT],
                             **(settings_kw or {}))
    service = build(settings, profile=HostProfile(hostname="pc1", cpu_model="cpu", cpu_cores=2, ram_total_mb=8000,
                                                  ram_free_mb=6000), backend_extra=extra or None)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pc1") as client:
            for t in node.local_targets():
                await t.wait_loaded(10)
            client.app = app  # type: ignore[attr-defined]
            yield client, node


def sse(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    events = [x for x in r.text.split("\n\n") if x]
    assert events[-1] == "data: [DONE]"
    return [orjson.loads(x[6:]) for x in events[:-1]]


@pytest.mark.parametrize("body,param", [
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
async def test_an_engine_refuses_what_it_cannot_honour_by_name(tmp_path, body, param):
    async with serve(tmp_path) as (c, node):
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={"messages": MSG, "stream": stream, **body})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == param and "fake engine" in err["message"]
        # the native /inference has no such fields: refused as unknown
        assert (await c.post("/inference", json={"prompt": "x", **body})).status_code == 400


async def test_n_choices_fan_out(tmp_path):
    async with serve(tmp_path, reply_tokens=4) as (c, node):
        r = await c.post("/v1/chat/completions", json={"messages": MSG, "n": 3, "seed": 10})
        body = r.json()
        assert r.status_code == 200 and [ch["index"] for ch in body["choices"]] == [0, 1, 2]
        texts = [ch["message"]["content"] for ch in body["choices"]]
        assert len(set(texts)) == 3  # seeds 10, 11, 12: different answers
        assert body["usage"]["completion_tokens"] == 12
        one = await c.post("/v1/chat/completions", json={"messages": MSG, "seed": 11})
        assert one.json()["choices"][0]["message"]["content"] == texts[1]
        assert node.targets[CHAT].requests == 4  # type: ignore[attr-defined]


async def test_n_choices_are_admitted_together_past_the_wait_bound(tmp_path):
    """One slot (the in-process engine), each generation ~0.4 s, TARS_QUEUE_MAX_WAIT_S 0.5:
    a lone request's third choice would wait ~0.8 s — refused on its own, it must not be
    refused as part of an n=3 request that was admitted (it would never fit: retrying cannot help)."""
    async with serve(tmp_path, {"queue_max_wait_s": 0.5}, reply_tokens=8, token_delay_s=0.05) as (c, node):
        assert (await c.post("/v1/chat/completions", json={"messages": MSG})).status_code == 200  # measured
        for stream in (False, True):
            r = await c.post("/v1/chat/completions", json={"messages": MSG, "n": 3, "seed": 1, "stream": stream})
            assert r.status_code == 200, r.text
            if not stream:
                assert [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2]
            else:
                assert sorted({ch["choices"][0]["index"] for ch in sse(r)[:-1]}) == [0, 1, 2]
        # three separate requests at once: the third would wait past the bound → 429 with Retry-After
        import asyncio

        rs = await asyncio.gather(*(c.post("/v1/chat/completions", json={"messages": MSG}) for _ in range(3)))
        assert sorted(r.status_code for r in rs) == [200, 200, 429]
        refused = next(r for r in rs if r.status_code == 429)
        assert "TARS_QUEUE_MAX_WAIT_S" in refused.json()["error"]["message"] and "retry-after" in refused.headers


async def test_n_choices_stream_interleaved_with_usage(tmp_path):
    async with serve(tmp_path, reply_tokens=5) as (c, node):
        r = await c.post("/v1/chat/completions", json={"messages": MSG, "n": 2, "seed": 1, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        chunks = sse(r)
        by = {0: "", 1: ""}
        for ch in chunks[:-1]:
            (choice,) = ch["choices"]
            by[choice["index"]] += choice.get("delta", {}).get("content") or ""
        whole = await c.post("/v1/chat/completions", json={"messages": MSG, "n": 2, "seed": 1})
        assert [by[0], by[1]] == [ch["message"]["content"] for ch in whole.json()["choices"]]
        finishes = [ch["choices"][0]["index"] for ch in chunks[:-1] if ch["choices"][0]["finish_reason"]]
        assert sorted(finishes) == [0, 1]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


async def test_one_stream_reports_usage_only_when_asked(tmp_path):
    async with serve(tmp_path, reply_tokens=3) as (c, node):
        plain = sse(await c.post("/v1/chat/completions", json={"messages": MSG, "stream": True}))
        assert all(ch["choices"] for ch in plain)
        usage = sse(await c.post("/v1/chat/completions", json={"messages": MSG, "stream": True,
                                                                "stream_options": {"include_usage": True}}))
        assert usage[-1]["usage"] == {"prompt_tokens": usage[-1]["usage"]["prompt_tokens"], "completion_tokens": 3,
                                      "total_tokens": usage[-1]["usage"]["prompt_tokens"] + 3}


async def test_openai_client_reads_n_choices_and_refusals(tmp_path):
    openai = pytest.importorskip("openai")
    async with serve(tmp_path, reply_tokens=3) as (c, node):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=c.app), base_url="http://pc1/v1")  # type: ignore[attr-defined]
        client = openai.AsyncOpenAI(base_url="http://pc1/v1", api_key="x", http_client=http, max_retries=0)
        out = await client.chat.completions.create(model=CHAT, messages=MSG, n=2)
        assert [ch.index for ch in out.choices] == [0, 1]
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model=CHAT, messages=MSG, logit_bias={"1": 5})
        assert err.value.param == "logit_bias"
        await http.aclose()
