"""Chat message shapes are checked before an engine sees them: a bad shape is a 400 naming
the field (the fuzzer's {"role": "tool", "tool_calls": [{}]} once reached llama-server and
came back as a 503 model_failed)."""

from __future__ import annotations

import pytest

from distributed.api import chat_messages, schemas
from distributed.api.chat_surface import ChatCompletionRequest
from distributed.errors import ValidationFailed

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
ASK = {"role": "user", "content": "hi"}


def _err(messages) -> str:
    with pytest.raises(ValidationFailed) as err:
        chat_messages.check(messages)
    return err.value.field


@pytest.mark.parametrize("messages,field", [
    ([{"role": "tool", "tool_calls": [{}]}], "messages[0].tool_calls"),
    ([ASK, {"role": "assistant", "tool_calls": [{}]}], "messages[1].tool_calls[0].id"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "a"}]}], "messages[1].tool_calls[0].function"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "a", "type": "web", "function": {"name": "f"}}]}],
     "messages[1].tool_calls[0].type"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "a", "function": {"arguments": "{}"}}]}],
     "messages[1].tool_calls[0].function.name"),
    ([ASK, {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": 3}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([ASK, {"role": "assistant", "tool_calls": "f"}], "messages[1].tool_calls"),
    ([ASK, {"role": "tool", "content": "r"}], "messages[1].tool_call_id"),
    ([ASK, {"role": "tool", "content": "r", "tool_call_id": "nope"}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_call_id": "a"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": "x", "colour": "red"}], "messages[0].colour"),
    ([{"role": "user", "content": "x", "reasoning_content": "hm"}], "messages[0].reasoning_content"),
    ([], "messages"),
])
def test_a_bad_shape_names_the_field(messages, field):
    assert _err(messages) == field


def test_good_shapes_are_normalised():
    out = chat_messages.check([ASK, {"role": "assistant", "content": None,
                                     "tool_calls": [{**CALL, "index": 0}, {"id": "call_2", "function": {
                                         "name": "g", "arguments": {"y": "é"}}}]},
                               {"role": "tool", "tool_call_id": "call_1", "content": "1"},
                               {"role": "tool", "tool_call_id": "call_2", "content": "2", "name": "g"}])
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [
        CALL, {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": '{"y": "é"}'}}]}
    assert out[3] == {"role": "tool", "content": "2", "name": "g", "tool_call_id": "call_2"}


def test_the_chat_surface_checks_them():
    body = b'{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "tool_calls": [{}]}]}'
    with pytest.raises(ValidationFailed) as err:
        schemas.parse(ChatCompletionRequest, body).to_domain()
    assert err.value.field == "messages[1].tool_calls"
    body = b'{"messages": [{"role": "user", "content": "x", "refusal": "no"}]}'
    with pytest.raises(ValidationFailed) as err:
        schemas.parse(ChatCompletionRequest, body).to_domain()
    assert err.value.field == "messages[0].refusal"
