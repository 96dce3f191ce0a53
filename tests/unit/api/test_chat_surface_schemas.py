"""The OpenAI chat surface's request models: each OpenAI parameter honoured (mapped into
GenerateRequest) or refused with a 400 naming it; the answer shapes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from distributed.api import chat_surface as cs
from distributed.api import schemas as s
from distributed.domain import Completion, Usage
from distributed.errors import ValidationFailed

MSG = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def chat(**body: Any) -> Any:
    return s.parse(cs.ChatCompletionRequest, orjson.dumps({"messages": MSG, **body})).to_domain()


def completion(**body: Any) -> Any:
    return s.parse(cs.CompletionRequest, orjson.dumps({"prompt": "Once", **body})).to_domain()


def refused(fn: Any, **body: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as info:
        fn(**body)
    return info.value


def test_every_honoured_chat_parameter_reaches_the_domain_request():
    req = chat(model="m", max_completion_tokens=9, temperature=0.1, top_p=0.5, n=3, stop="END", seed=4,
               stream=True, stream_options={"include_usage": True}, presence_penalty=0.5, frequency_penalty=-0.5,
               response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                       "schema": {"type": "object"}}},
               logprobs=True, top_logprobs=3, user="u1", safety_identifier="s", store=False,
               modalities=["text"], service_tier="auto")
    assert (req.model, req.max_tokens, req.temperature, req.top_p, req.n, req.stop, req.seed, req.stream) == \
        ("m", 9, 0.1, 0.5, 3, ["END"], 4, True)
    assert (req.presence_penalty, req.frequency_penalty, req.logprobs, req.top_logprobs) == (0.5, -0.5, True, 3)
    assert req.response_format == {"type": "json_schema",
                                   "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}
    tools = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 parallel_tool_calls=False)
    assert tools.tools == [WEATHER] and tools.tool_choice["function"]["name"] == "get_weather"
    assert tools.parallel_tool_calls is False
    assert chat(tools=[WEATHER]).tool_choice == "auto"
    assert chat(response_format={"type": "json_object"}).response_format == {"type": "json_object"}
    assert chat(response_format={"type": "text"}).response_format is None


@pytest.mark.parametrize("name", sorted(cs.REFUSED))
def test_each_known_unsupported_parameter_is_refused_by_name(name):
    err = refused(chat, **{name: {"x": 1} if name != "reasoning_effort" else "high"})
    assert err.field == name and err.http_status == 400
    # an explicit null asks for nothing and passes
    assert chat(**{name: None}).messages


@pytest.mark.parametrize("body,field", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"modalities": ["text", "audio"]}, "modalities[1]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"n": cs.MAX_N + 1}, "n"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{**WEATHER, "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools[0].function.parameters"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x", "schema": {}}}},
     "response_format.json_schema"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
    ({"messages": [{"role": "user", "content": "x", "audio": {}}]}, "messages[0].audio"),
])
def test_bad_or_unsupported_values_are_400_naming_the_field(body, field):
    err = refused(chat, **body)
    assert err.field == field, err.message


def test_bad_schema_says_why():
    err = refused(chat, response_format={"type": "json_schema",
                                         "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    assert "not a valid JSON Schema" in err.message and "nonsense" in err.message


def test_completions_parameters():
    req = completion(logprobs=2, presence_penalty=0.3, n=2, best_of=2, max_tokens=5)
    assert (req.logprobs, req.top_logprobs, req.presence_penalty, req.n, req.max_tokens) == (True, 2, 0.3, 2, 5)
    assert completion().logprobs is False and completion().max_tokens == 16
    for body, field in [({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                        ({"logit_bias": {"1": 2}}, "logit_bias"), ({"logprobs": 6}, "logprobs"),
                        ({"tools": [WEATHER]}, "tools")]:
        assert refused(completion, **body).field == field


def test_tool_messages_keep_their_call_fields():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}
    req = chat(messages=[*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], tools=[WEATHER])
    assert req.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert req.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


def _completion(text: str = "hi", **kw: Any) -> Completion:
    return Completion(model="m", node="n1", text=text, finish_reason="stop", usage=Usage(5, 2), **kw)


def test_answer_bodies_carry_tool_calls_logprobs_and_n_choices():
    entry = {"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": [
        {"token": "hi", "logprob": -0.5, "bytes": [104, 105]}, {"token": "yo", "logprob": -1.5, "bytes": [121, 111]}]}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = cs.chat_completion_body([_completion(logprobs=[entry]), _completion("", tool_calls=[call])], "id", 1)
    first, second = body["choices"]
    assert first["logprobs"] == {"content": [entry], "refusal": None} and first["index"] == 0
    assert second["finish_reason"] == "tool_calls" and second["message"]["tool_calls"] == [call]
    assert second["message"]["content"] is None and second["index"] == 1
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    legacy = cs.completion_body([_completion(logprobs=[entry, {**entry, "token": "!"}])], "id", 1)
    assert legacy["choices"][0]["logprobs"] == {"tokens": ["hi", "!"], "token_logprobs": [-0.5, -0.5],
                                                "top_logprobs": [{"hi": -0.5, "yo": -1.5}] * 2,
                                                "text_offset": [0, 2]}


def test_stream_chunks_are_valid_openai_chunks():
    enc = cs.ChunkEncoder("chat", "m", "id", 1, index=2)
    lines = [enc.role(), enc.token("a"), enc.token("b", [{"token": "b", "logprob": -1.0, "bytes": [98],
                                                          "top_logprobs": []}]),
             enc.tool_calls([{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
             enc.finish(_completion(tool_calls=[{"id": "c"}])), enc.usage([_completion(), _completion()])]
    chunks = [orjson.loads(x[len(b"data: "):]) for x in lines]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert [c["choices"][0]["index"] for c in chunks[:-1]] == [2] * 5
    assert chunks[1]["choices"][0]["delta"]["content"] == "a"
    assert chunks[2]["choices"][0]["logprobs"]["content"][0]["logprob"] == -1.0
    assert chunks[3]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert chunks[4]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 4
