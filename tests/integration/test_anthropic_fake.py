"""Anthropic's Messages API over the fake engine (fast): the official ``anthropic`` SDK
reads our messages, streams and errors; x-api-key auth; the translation of blocks, tools
and tool results to the one domain request; errors in Anthropic's shape."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from distributed.api import anthropic_wire as aw
from distributed.api import schemas
from distributed.errors import ValidationFailed
from tests.integration.test_chat_surface_fake import serve as _serve

pytestmark = pytest.mark.anyio
CHAT = "gemma-3-270m"  # the fake engine's chat model (test_chat_surface_fake)
KEY = "anthropic-test-key"


def serve(tmp_path: Any, **extra: Any) -> Any:
    """The fake-engine node of test_chat_surface_fake, with an API key."""
    return _serve(tmp_path, {"api_key": KEY}, **extra)


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], orjson.loads(lines["data"])))
    return out


async def test_the_anthropic_sdk_reads_messages_and_streams(tmp_path):
    anthropic = pytest.importorskip("anthropic")
    async with serve(tmp_path, reply_tokens=5) as (c, node):
        httpx2 = pytest.importorskip("httpx2")  # the transport library of the anthropic SDK
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=c.app))  # type: ignore[attr-defined]
        client = anthropic.AsyncAnthropic(base_url="http://pc1", api_key=KEY, http_client=http, max_retries=0)
        msg = await client.messages.create(model=CHAT, max_tokens=16, system="Be brief.",
                                           messages=[{"role": "user", "content": "Name three colours."}])
        assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
        assert msg.content[0].type == "text" and len(msg.content[0].text.split()) == 5
        assert msg.usage.output_tokens == 5 and msg.usage.input_tokens > 0
        async with client.messages.stream(model=CHAT, max_tokens=3, messages=[{"role": "user", "content": "Hi"}]) as s:
            text = "".join([t async for t in s.text_stream])
            final = await s.get_final_message()
        assert len(text.split()) == 3 and final.stop_reason == "max_tokens" and final.usage.output_tokens == 3
        count = await client.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "a b c"}])
        assert count.input_tokens > 0
        with pytest.raises(anthropic.NotFoundError) as err:
            await client.messages.create(model="nope", max_tokens=4, messages=[{"role": "user", "content": "x"}])
        assert err.value.body["error"]["type"] == "not_found_error"
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(model=CHAT, max_tokens=4, messages=[{"role": "user", "content": "x"}],
                                         extra_body={"temperature": 1.5})  # older clients send it: 0-1
        assert bad.value.body["type"] == "error" and "temperature" in bad.value.body["error"]["message"]
        wrong = anthropic.AsyncAnthropic(base_url="http://pc1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            await wrong.messages.create(model=CHAT, max_tokens=4, messages=[{"role": "user", "content": "x"}])
        await http.aclose()


async def test_the_event_sequence(tmp_path):
    async with serve(tmp_path, reply_tokens=2) as (c, node):
        r = await c.post("/v1/messages", headers={"x-api-key": KEY}, json={
            "model": CHAT, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [name for name, _ in _events(r.text)]
        assert names == ["message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
                         "content_block_stop", "message_delta", "message_stop"]
        delta = _events(r.text)[-2][1]
        assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 2


async def test_errors_are_in_anthropics_shape(tmp_path):
    async with serve(tmp_path) as (c, node):
        h = {"x-api-key": KEY}
        r = await c.post("/v1/messages", headers=h, json={"model": CHAT, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in r.json()["error"]["message"]
        r = await c.post("/v1/messages", json={"model": CHAT, "max_tokens": 4, "messages": []})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # the fake engine refuses tools by name: still in Anthropic's shape
        r = await c.post("/v1/messages", headers=h, json={
            "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"},
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        # the OpenAI routes keep OpenAI's shape
        r = await c.post("/v1/chat/completions", headers=h, json={"messages": []})
        assert r.status_code == 400 and "param" in r.json()["error"]


def _parse(body: dict[str, Any]) -> aw.MessagesRequest:
    return schemas.parse(aw.MessagesRequest, orjson.dumps({"max_tokens": 64, **body}))


def test_translation_of_blocks_tools_and_results():
    r = _parse({"system": [{"type": "text", "text": "Be brief."}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather?", "cache_control": {}}]},
                             {"role": "assistant", "content": [
                                 {"type": "thinking", "thinking": "use the tool", "signature": "s"},
                                 {"type": "text", "text": "Let me look."},
                                 {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}}]},
                             {"role": "user", "content": [
                                 {"type": "tool_result", "tool_use_id": "toolu_1", "content": "snow"},
                                 {"type": "text", "text": "Thanks"}]}],
                "tools": [{"name": "weather", "description": "d", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
                "top_k": 20, "stop_sequences": ["END"], "thinking": {"type": "disabled"}})
    req = r.to_domain()
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant", "tool", "user"]
    assert req.messages[2]["tool_calls"][0] == {"id": "toolu_1", "type": "function",
                                                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    assert req.messages[2]["reasoning_content"] == "use the tool" and req.messages[3]["content"] == "snow"
    assert req.tools == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"},
                                                           "description": "d"}}]
    assert req.tool_choice == {"type": "function", "function": {"name": "weather"}} and not req.parallel_tool_calls
    assert req.sampling == {"top_k": 20} and req.stop == ["END"] and req.reasoning_effort == "none"
    assert req.temperature == 1.0  # Anthropic's default


@pytest.mark.parametrize("body,field", [
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "not base64!"}}]}]}, "messages[0].content[0].source.data"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "w"}]},
     "tools[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": 3}]},
     "tools[0].input_schema"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "any"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nope", "content": "r"}]}]},
     "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]},
     "messages[0].content[0].input"),
    ({"messages": [{"role": "user", "content": "x"}], "thinking": {"type": "enabled", "budget_tokens": 10}},
     "thinking.budget_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "mcp_servers": [{"url": "x"}]}, "mcp_servers"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(ValidationFailed) as err:
        _parse(body).to_domain()
    assert err.value.field == field


def test_output_config_and_the_newer_fields():
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    req = _parse({"messages": [{"role": "user", "content": "x"}], "cache_control": {"type": "ephemeral"},
                  "output_config": {"effort": "max", "format": {"type": "json_schema", "schema": schema}},
                  "diagnostics": {"previous_message_id": None}, "inference_geo": "global", "speed": "standard",
                  "thinking": {"type": "adaptive", "display": "summarized"}}).to_domain()
    assert req.reasoning_effort == "xhigh" and req.chat_template_kwargs == {"enable_thinking": True}
    assert req.response_format == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    for body, field in (({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
                        ({"output_config": {"effort": "huge"}}, "output_config.effort"),
                        ({"speed": "fast"}, "speed")):
        with pytest.raises(ValidationFailed) as err:
            _parse({"messages": [{"role": "user", "content": "x"}], **body}).to_domain()
        assert err.value.field == field
