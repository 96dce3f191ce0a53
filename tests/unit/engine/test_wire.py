"""wire.py: requests to llama-server JSON, its answers and stream chunks back, refusals to our errors."""

from __future__ import annotations

from distributed.domain import GenerateRequest
from distributed.engine import wire
from distributed.errors import InputTooLong, ModelFailed, ModelLoading, ValidationFailed


def test_chat_and_prompt_payloads():
    path, body = wire.payload(GenerateRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=7,
                                              temperature=0.1, top_p=0.5, stop=["x"], seed=3, stream=True), "m")
    assert path == "/v1/chat/completions"
    assert body == {"model": "m", "max_tokens": 7, "temperature": 0.1, "top_p": 0.5, "stream": True, "stop": ["x"],
                    "seed": 3, "messages": [{"role": "user", "content": "hi"}],
                    "stream_options": {"include_usage": True}}
    path, body = wire.payload(GenerateRequest(prompt="once"), "m")
    assert path == "/v1/completions" and body["prompt"] == "once"
    assert "seed" not in body and "stop" not in body and "stream_options" not in body


def test_openai_extras_are_forwarded_when_not_at_their_defaults():
    req = GenerateRequest(messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"},
                          tools=[{"type": "function", "function": {"name": "f"}}], logprobs=True, top_logprobs=2,
                          frequency_penalty=0.5, n=3)
    _, body = wire.payload(req, "m")
    assert body["response_format"] == {"type": "json_object"} and body["logprobs"] is True
    assert body["top_logprobs"] == 2 and body["frequency_penalty"] == 0.5
    assert body["tools"][0]["function"]["name"] == "f"
    assert "presence_penalty" not in body and "n" not in body and "parallel_tool_calls" not in body
    _, body = wire.payload(GenerateRequest(prompt="x", top_logprobs=3, parallel_tool_calls=False), "m")
    assert "top_logprobs" not in body and body["parallel_tool_calls"] is False


def test_whole_answer_mapping():
    text, finish, usage, timings, _ = wire.answer({
        "choices": [{"message": {"role": "assistant", "content": "Hello"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "timings": {"predicted_per_second": 50.0}})
    assert (text, finish, usage["completion_tokens"], timings["predicted_per_second"]) == ("Hello", "length", 2, 50.0)
    text, finish, *_ = wire.answer({"choices": [{"text": "abc", "finish_reason": "stop"}]})
    assert (text, finish) == ("abc", "stop")


def test_stream_chunks_fold_text_tool_calls_usage_and_timings():
    st = wire.StreamState()
    assert st.feed({"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}) is None
    assert st.feed({"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]}).text == "Hel"
    assert st.feed({"choices": [{"text": "lo", "finish_reason": None}]}).text == "lo"
    st.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get", "arguments": "{\"a\""}}]}}]})
    st.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]})
    st.feed({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    st.feed({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "timings": {"predicted_n": 4}})
    assert st.finish_reason == "tool_calls" and st.usage["completion_tokens"] == 4 and st.timings["predicted_n"] == 4
    assert st.tool_calls == [{"id": "c1", "type": "function", "function": {"name": "get", "arguments": "{\"a\": 1}"}}]
    piece = st.tool_chunk()
    assert piece.text == "" and piece.tool_calls == st.tool_calls and piece.tokens == 2
    assert st.extras()["tool_calls"] == st.tool_calls


def test_logprobs_are_the_content_list():
    lp = [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]
    *_, extra = wire.answer({"choices": [{"message": {"content": "a"}, "logprobs": {"content": lp}}]})
    assert extra["logprobs"] == lp
    st = wire.StreamState()
    piece = st.feed({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": lp}}]})
    assert piece.logprobs == lp and st.extras()["logprobs"] == lp


def test_refusals_map_to_our_errors():
    e = wire.engine_error(400, {"error": {"code": 400, "type": "exceed_context_size_error", "message": "too long",
                                          "n_prompt_tokens": 900, "n_ctx": 512}}, "m", "n1", messages=True)
    assert isinstance(e, InputTooLong) and e.limit == 512 and e.got == 900 and e.details["field"] == "messages"
    assert "512" in e.message
    e = wire.engine_error(400, {"error": {"message": "failed to parse grammar"}}, "m", "n1", messages=True)
    assert isinstance(e, ValidationFailed) and e.field == "response_format" and "failed to parse grammar" in e.message
    e = wire.engine_error(400, {"error": {"message": "tools param requires --jinja flag"}}, "m", "n1", messages=True)
    assert e.field == "tools"
    assert isinstance(wire.engine_error(503, {"error": {"message": "Loading model"}}, "m", "n1", messages=False),
                      ModelLoading)
    # the engine answered: a request it cannot parse or render is a 400 (llama-server says 500 for
    # a template that raises), never a 503 that tells the client to retry the same request
    e = wire.engine_error(500, {"error": {"code": 500, "message": "Conversation roles must alternate",
                                          "type": "server_error"}}, "m", "n1", messages=True)
    assert isinstance(e, ValidationFailed) and e.field == "messages" and e.http_status == 400
    for status in (413, 422):
        assert isinstance(wire.engine_error(status, "no", "m", "n1", messages=False), ValidationFailed)
    # our own wiring (its key, a path) or a broken gateway is not the request's fault
    for status in (401, 404, 502):
        e = wire.engine_error(status, "boom", "m", "n1", messages=False)
        assert isinstance(e, ModelFailed) and f"HTTP {status}" in e.message and "boom" in e.message


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]
HERMES = wire.template_caps({"supports_tool_calls": True}, {"chat_template": "{{ '<tool_call>\\n' }}"})


def test_template_caps_recognise_the_hermes_call_format():
    assert HERMES["tool_call_start"] == "<tool_call>\n" and HERMES["supports_tool_calls"] is True
    xml = wire.template_caps({"supports_tool_calls": True}, {"chat_template": "<tool_call><function=x>"})
    assert xml["tool_call_start"] is None
    assert wire.template_caps({"supports_tool_calls": False}, {"chat_template": "<tool_call>"})["tool_call_start"] is None


def test_a_forced_call_is_prefilled_and_a_named_one_sent_alone():
    msgs = [{"role": "user", "content": "x"}]
    _, body = wire.payload(GenerateRequest(messages=msgs, tools=TOOLS, tool_choice="required"), "m", HERMES)
    assert body["tool_choice"] == "required" and body["tools"] == TOOLS
    assert body["messages"] == [*msgs, {"role": "assistant", "content": "<tool_call>\n"}]
    named = {"type": "function", "function": {"name": "g"}}
    _, body = wire.payload(GenerateRequest(messages=msgs, tools=TOOLS, tool_choice=named), "m", HERMES)
    assert body["tool_choice"] == "required" and body["tools"] == [TOOLS[1]] and body["messages"][-1]["role"] == "assistant"
    # another call format: no prefill (llama-server's own grammar), the named tool still alone
    _, body = wire.payload(GenerateRequest(messages=msgs, tools=TOOLS, tool_choice=named), "m", None)
    assert body["tool_choice"] == "required" and body["tools"] == [TOOLS[1]] and body["messages"] == msgs
    # auto is the model's choice: nothing added; a conversation that ends with the assistant is not prefilled twice
    _, body = wire.payload(GenerateRequest(messages=msgs, tools=TOOLS, tool_choice="auto"), "m", HERMES)
    assert body["messages"] == msgs and body["tool_choice"] == "auto"
    ends = [*msgs, {"role": "assistant", "content": "Sure"}]
    _, body = wire.payload(GenerateRequest(messages=ends, tools=TOOLS, tool_choice="required"), "m", HERMES)
    assert body["messages"] == ends


def test_a_call_cut_off_by_max_tokens_is_dropped():
    whole = {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    cut = {"id": "b", "type": "function", "function": {"name": "f", "arguments": '{"x":'}}
    assert wire.whole_calls([whole, cut], "length") == [whole]
    assert wire.whole_calls([whole, cut], "stop") == [whole, cut]  # the engine said it ended: its parse stands
    *_, extra = wire.answer({"choices": [{"message": {"tool_calls": [whole, cut]}, "finish_reason": "length"}]})
    assert extra["tool_calls"] == [whole]
    state = wire.StreamState()
    for delta in ({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": '{"x": 1}'}}]},
                  {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "f", "arguments": '{"x":'}}]}):
        state.feed({"choices": [{"delta": delta}]})
    state.feed({"choices": [{"delta": {}, "finish_reason": "length"}]})
    piece = state.tool_chunk()
    assert piece is not None and [c["id"] for c in piece.tool_calls] == ["a"] and state.extras()["tool_calls"] == [whole]


def test_parallel_tool_calls_false_keeps_the_first_call():
    a = {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    b = {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
    one = GenerateRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS, parallel_tool_calls=False)
    body = {"choices": [{"message": {"tool_calls": [a, b]}, "finish_reason": "tool_calls"}]}
    assert wire.answer(body, one)[4]["tool_calls"] == [a] and wire.answer(body)[4]["tool_calls"] == [a, b]
    state = wire.StreamState(one)
    state.feed({"choices": [{"delta": {"tool_calls": [{"index": 0, **a}, {"index": 1, **b}]}}]})
    assert [c["id"] for c in state.tool_chunk().tool_calls] == ["a"]
