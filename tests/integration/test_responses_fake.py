"""OpenAI's Responses API over the fake engine (fast): the official ``openai`` SDK reads our
responses and events; stateless (store false; previous_response_id a 400 naming it); input
items and tools translated to the one domain request."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from distributed.api import responses_wire as rw
from distributed.api import schemas
from distributed.errors import ValidationFailed
from tests.integration.test_anthropic_fake import CHAT, KEY, serve

pytestmark = pytest.mark.anyio


def _events(text: str) -> list[dict[str, Any]]:
    out = []
    for block in text.strip().split("\n\n"):
        data = next(line[6:] for line in block.split("\n") if line.startswith("data: "))
        out.append(orjson.loads(data))
    return out


async def test_the_openai_sdk_reads_responses_and_streams(tmp_path):
    openai = pytest.importorskip("openai")
    async with serve(tmp_path, reply_tokens=4) as (c, node):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=c.app))  # type: ignore[attr-defined]
        client = openai.AsyncOpenAI(base_url="http://pc1/v1", api_key=KEY, http_client=http, max_retries=0)
        r = await client.responses.create(model=CHAT, input="Name three colours.", instructions="Be brief.",
                                          store=False, max_output_tokens=32)
        assert r.object == "response" and r.status == "completed" and len(r.output_text.split()) == 4
        assert r.usage.output_tokens == 4 and r.usage.input_tokens > 0 and r.store is False
        events = [e async for e in await client.responses.create(model=CHAT, input="Hi", stream=True)]
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == \
            events[-1].response.output_text
        assert [e.sequence_number for e in events] == list(range(len(events)))
        async with client.responses.stream(model=CHAT, input="Hi") as stream:
            final = await stream.get_final_response()
        assert final.output_text and final.status == "completed"
        short = await client.responses.create(model=CHAT, input="Hi", max_output_tokens=2)
        assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
        with pytest.raises(openai.BadRequestError) as err:
            await client.responses.create(model=CHAT, input="Hi", previous_response_id="resp_1")
        assert err.value.param == "previous_response_id"
        with pytest.raises(openai.BadRequestError) as err:
            await client.responses.create(model=CHAT, input="Hi", store=True)
        assert err.value.param == "store"
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="nope", input="Hi")
        await http.aclose()


async def test_the_event_sequence_of_a_message(tmp_path):
    async with serve(tmp_path, reply_tokens=2) as (c, node):
        r = await c.post("/v1/responses", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": CHAT, "input": "hi", "stream": True})
        kinds = [e["type"] for e in _events(r.text)]
        assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
                         "response.output_text.done", "response.content_part.done", "response.output_item.done",
                         "response.completed"]


def _parse(body: dict[str, Any]) -> rw.ResponsesRequest:
    return schemas.parse(rw.ResponsesRequest, orjson.dumps(body))


def test_translation_of_items_tools_and_formats():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = _parse({"instructions": "Be brief.", "store": False, "include": ["reasoning.encrypted_content"],
                  "input": [{"role": "developer", "content": "Use tools."},
                            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Add 1+2"}]},
                            {"type": "reasoning", "id": "rs_1", "summary": []},
                            {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 1}'},
                            {"type": "function_call", "call_id": "call_2", "name": "add", "arguments": '{"a": 2}'},
                            {"type": "function_call_output", "call_id": "call_1", "output": "1"},
                            {"type": "function_call_output", "call_id": "call_2", "output": "2"}],
                  "tools": [{"type": "function", "name": "add", "parameters": schema, "strict": True}],
                  "tool_choice": {"type": "function", "name": "add"}, "parallel_tool_calls": False,
                  "text": {"format": {"type": "json_schema", "name": "sum", "schema": schema}},
                  "reasoning": {"effort": "low", "summary": "auto"}, "max_output_tokens": 50}).to_domain()
    assert [m["role"] for m in req.messages] == ["system", "system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in req.messages[3]["tool_calls"]] == ["call_1", "call_2"]
    assert req.tools == [{"type": "function", "function": {"name": "add", "parameters": schema, "strict": True}}]
    assert req.tool_choice == {"type": "function", "function": {"name": "add"}} and not req.parallel_tool_calls
    assert req.response_format == {"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}}
    assert req.reasoning_effort == "low" and req.max_tokens == 50


@pytest.mark.parametrize("body,field", [
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "background": True}, "background"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0].file_id"),
    ({"input": [{"role": "assistant", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]}, "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0]"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "1"}]}, "input[0].tool_call_id"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "s"}}}, "text.format.schema"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(ValidationFailed) as err:
        _parse(body).to_domain()
    assert err.value.field == field
