"""Ollama's wire shapes ⇄ the domain requests (api/ollama_wire.py, ollama_options.py,
ollama_answers.py): pure, no app."""

from __future__ import annotations

import base64

import orjson
import pytest

from distributed.api import ollama_answers as a
from distributed.api import ollama_options as o
from distributed.api import ollama_wire as w
from distributed.api.schemas import parse
from distributed.domain import Completion, GenerateRequest, Timings, TokenChunk, Usage
from distributed.errors import TarsError, ValidationFailed


def chat(**kw) -> tuple[GenerateRequest, o.Options]:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], **kw}
    return w.ChatRequest.model_validate(body).to_domain(2048)


def refused(field: str, fn, *args, **kw) -> str:
    with pytest.raises(ValidationFailed) as exc:
        fn(*args, **kw)
    assert exc.value.field == field, (exc.value.field, exc.value.message)
    return exc.value.message


def test_names_take_the_latest_tag():
    assert o.model_id("smollm2-135m-instruct:latest") == "smollm2-135m-instruct"
    assert o.model_id("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert o.model_id("hf.co/org/repo:Q4_K_M") == "hf.co/org/repo:Q4_K_M"  # another tag is part of the id
    assert o.tagged("gemma-3-270m") == "gemma-3-270m:latest"
    assert o.tagged("hf.co/org/repo:Q4_K_M") == "hf.co/org/repo:Q4_K_M"


def test_chat_defaults_stream_true_and_fill_the_context():
    req, opts = chat()
    assert req.stream is True and req.model == "smollm2-135m-instruct" and req.max_tokens == 2048
    assert req.messages == [{"role": "user", "content": "hi"}] and req.sampling == {} and opts.num_ctx is None
    req, _ = chat(stream=False, model="smollm2-135m-instruct:latest")
    assert req.stream is False and req.model == "smollm2-135m-instruct"


def test_options_table():
    req, opts = chat(options={"num_predict": 12, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n",
                              "presence_penalty": 0.5, "frequency_penalty": -0.5, "top_k": 20, "min_p": 0.1,
                              "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32, "mirostat": 2,
                              "mirostat_tau": 4.0, "mirostat_eta": 0.2, "dry_multiplier": 0.8, "num_ctx": 1024,
                              "xtc_probability": None})
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (12, 0.0, 0.5, 7, ["\n"])
    assert (req.presence_penalty, req.frequency_penalty) == (0.5, -0.5)
    assert req.sampling == {"top_k": 20, "min_p": 0.1, "typical_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 32,
                            "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "dry_multiplier": 0.8}
    assert opts.num_ctx == 1024
    for unlimited in (-1, -2):
        assert chat(options={"num_predict": unlimited})[0].max_tokens == 2048


@pytest.mark.parametrize("name", sorted(o.REFUSED_OPTIONS))
def test_options_that_cannot_be_honoured_are_refused_by_name(name):
    assert "cannot be honoured" in refused(f"options.{name}", chat, options={name: 1})


@pytest.mark.parametrize("options,field", [
    ({"temperature": 3}, "options.temperature"), ({"top_p": 0}, "options.top_p"),
    ({"num_predict": 0}, "options.num_predict"), ({"num_predict": 1.5}, "options.num_predict"),
    ({"seed": "x"}, "options.seed"), ({"stop": [1]}, "options.stop"), ({"stop": ["a"] * 9}, "options.stop"),
    ({"top_k": -1}, "options.top_k"), ({"mirostat": 3}, "options.mirostat"), ({"num_ctx": 0}, "options.num_ctx"),
    ({"presence_penalty": True}, "options.presence_penalty"), ({"what": 1}, "options.what"),
])
def test_bad_options_name_the_field(options, field):
    refused(field, chat, options=options)


def test_format_json_and_schema():
    assert chat(format="json")[0].response_format == {"type": "json_object"}
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    rf = chat(format=schema)[0].response_format
    assert rf == {"type": "json_schema", "json_schema": {"name": "format", "schema": schema, "strict": True}}
    assert chat(format="")[0].response_format is None
    refused("format", chat, format="yaml")
    refused("format", chat, format={"type": "nonsense-type"})


def test_tools_and_tool_calls_in_ollamas_shape():
    tool = {"type": "function", "function": {"name": "get_weather", "description": "weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    messages = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "abc", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "content": "21 C", "tool_name": "get_weather"},
        {"role": "tool", "content": "25 C", "tool_call_id": "abc"},
    ]
    req, _ = chat(messages=messages, tools=[tool])
    assert req.tools == [tool] and req.tool_choice == "auto"
    calls = req.messages[1]["tool_calls"]
    assert calls[0] == {"id": "call_1_0", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
    assert calls[1]["id"] == "abc" and orjson.loads(calls[1]["function"]["arguments"]) == {"city": "Rome"}
    assert req.messages[2] == {"role": "tool", "content": "21 C", "name": "get_weather", "tool_call_id": "call_1_0"}
    assert req.messages[3]["tool_call_id"] == "abc"
    assert chat()[0].tools is None and chat()[0].tool_choice is None
    refused("tools", chat, tools=[tool, tool])
    refused("messages[0].tool_calls", chat, messages=[{"role": "user", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": {}}}]}])
    refused("messages[0].tool_calls[0].function.arguments", chat, messages=[{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}])
    refused("messages[0].tool_name", chat, messages=[{"role": "user", "content": "x", "tool_name": "f"}])
    refused("messages[1].tool_name", chat, messages=[{"role": "user", "content": "x"},
                                                     {"role": "tool", "content": "21 C", "tool_name": "f"}])
    refused("messages[1]", chat, messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "21 C"}])
    refused("messages[2].tool_call_id", chat, messages=[  # the shapes every dialect is held to (chat_messages)
        {"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
        {"role": "tool", "content": "1", "tool_call_id": "elsewhere"}])


def test_roles_are_case_insensitive_and_thinking_is_the_answers_reasoning():
    req, _ = chat(messages=[{"role": "System", "content": "be brief"},
                            {"role": "ASSISTANT", "content": "ok", "thinking": "hmm"}, {"role": "user", "content": "?"}])
    assert req.messages == [{"role": "system", "content": "be brief"},
                            {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
                            {"role": "user", "content": "?"}]
    refused("messages[0].thinking", chat, messages=[{"role": "user", "content": "x", "thinking": "y"}])


def test_generate_maps_to_chat_or_to_a_raw_prompt():
    def gen(**kw):
        return w.GenerateBody.model_validate({"model": "m", **kw}).to_domain(512)[0]

    assert gen(prompt="hi", system="be brief").messages == [{"role": "system", "content": "be brief"},
                                                             {"role": "user", "content": "hi"}]
    raw = gen(prompt="<|im_start|>user\nhi", raw=True)
    assert raw.prompt == "<|im_start|>user\nhi" and raw.messages is None and raw.max_tokens == 512
    for field, value in (("suffix", "x"), ("template", "{{ .Prompt }}"), ("context", [1])):
        refused(field, gen, prompt="hi", **{field: value})
    refused("system", gen, prompt="hi", raw=True, system="s")
    assert w.GenerateBody(model="m").empty() and not w.GenerateBody(model="m", prompt="x").empty()
    assert w.GenerateBody(model="m", images=["aGk="]).image_sources() == (None, ["aGk="])
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 8).decode()
    seen = gen(prompt="what is it?", images=[png]).messages
    assert seen == [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                                                 {"type": "text", "text": "what is it?"}]}]
    refused("images", gen, prompt="x", raw=True, images=[png])


def test_images_on_chat_messages_become_image_url_parts():
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0" + b"0" * 8).decode()
    req, _ = chat(messages=[{"role": "user", "content": "and this?", "images": [jpeg]}])
    part = req.messages[0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg}"}}
    assert w.ChatRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "x", "images": [jpeg]}]}).image_sources() == ([{"images": [jpeg]}], None)
    refused("messages[0].images", chat, messages=[{"role": "assistant", "content": "x", "images": [jpeg]}])


def test_think_reaches_the_chat_template():
    assert (chat()[0].reasoning_effort, chat()[0].chat_template_kwargs) == (None, None)
    assert chat(think=False)[0].reasoning_effort == "none"
    on = chat(think=True)[0]
    assert on.chat_template_kwargs == {"enable_thinking": True} and on.reasoning_effort is None
    high = chat(think="high")[0]
    assert high.reasoning_effort == "high" and high.chat_template_kwargs == {"enable_thinking": True}
    assert chat(think="max")[0].reasoning_effort == "xhigh"
    body = orjson.dumps({"model": "m", "messages": [], "think": "extreme"})
    refused("think", parse, w.ChatRequest, body)


def test_truncate_shift_keep_alive_logprobs():
    refused("truncate", chat, truncate=True)
    refused("shift", chat, shift=True)
    assert chat(truncate=False, shift=False)[0].stream
    refused("top_logprobs", chat, top_logprobs=3)
    req, _ = chat(logprobs=True, top_logprobs=3)
    assert req.logprobs and req.top_logprobs == 3
    for ok in ("5m", "1h30m", "-1", -1, 300, "10s", "250ms", "2.5h"):
        o.keep_alive_s(ok)
    assert o.keep_alive_s("1h30m") == 5400 and o.keep_alive_s(-1) == -1
    for bad in (0, "0", "0s", "soon", "5 minutes", True):
        refused("keep_alive", o.keep_alive_s, bad)


def test_embed_body():
    req, opts = w.EmbedBody(model="all-MiniLM-L6-v2:latest", input="hello").to_domain(10)
    assert req.model == "all-MiniLM-L6-v2" and req.input == ["hello"] and req.normalize
    refused("input", w.EmbedBody(model="m", input=[]).to_domain, 10)
    refused("input[1]", w.EmbedBody(model="m", input=["a", " "]).to_domain, 10)
    refused("input", w.EmbedBody(model="m", input=["a"] * 11).to_domain, 10)
    refused("truncate", w.EmbedBody(model="m", input="a", truncate=False).to_domain, 10)
    refused("options.top_k", w.EmbedBody(model="m", input="a", options={"top_k": 1}).to_domain, 10)
    assert w.EmbedBody(model="m", input="a", options={"num_ctx": 128}).to_domain(10)[1].num_ctx == 128


def completion(**kw) -> Completion:
    base = dict(model="m", node="pc1", text="hello", finish_reason="stop", usage=Usage(10, 4),
                timings=Timings(ttft_ms=20.0, total_ms=120.0, tokens_per_s=40.0))
    return Completion(**{**base, **kw})


def test_answers_carry_ollamas_counts_in_nanoseconds():
    body = a.chat_body("m:latest", completion(), 200_000_000)
    assert body["message"] == {"role": "assistant", "content": "hello"} and body["done"] is True
    assert body["model"] == "m:latest" and body["done_reason"] == "stop"
    assert (body["prompt_eval_count"], body["eval_count"]) == (10, 4)
    assert body["prompt_eval_duration"] == 20_000_000 and body["eval_duration"] == 100_000_000  # 4 / 40 tok/s
    assert body["total_duration"] == 200_000_000 and body["load_duration"] == 0
    assert a.generate_body("m", completion(finish_reason="length"), 1)["done_reason"] == "length"
    assert a.generate_body("m", completion(), 1)["total_duration"] >= 120_000_000  # never below its parts


def test_tool_calls_out_have_arguments_as_objects():
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
             {"id": "", "type": "function", "function": {"name": "g", "arguments": ""}},
             {"id": "c3", "type": "function", "function": {"name": "h", "arguments": "not json"}}]
    out = a.tool_calls(calls)
    assert out[0] == {"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}
    assert out[1]["id"] == "call_1" and out[1]["function"]["arguments"] == {}
    assert out[2]["function"]["arguments"] == {"_raw": "not json"}
    body = a.chat_body("m", completion(text="", tool_calls=calls[:1], finish_reason="tool_calls"), 1)
    assert body["message"]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and body["done_reason"] == "stop"
    thought = a.chat_body("m", completion(reasoning="because"), 1)
    assert thought["message"]["thinking"] == "because" and "notes" not in thought
    assert a.generate_body("m", completion(reasoning="because", notes=["n"]), 1)["thinking"] == "because"


def test_chunks_are_one_json_object_a_line():
    clock = iter([1_000, 5_000]).__next__
    enc = a.Chunks("m:latest", True, 0, clock)
    line = enc.token(TokenChunk("Hi \"there\""))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) | {"created_at": ""} == {"model": "m:latest", "created_at": "", "done": False,
                                                     "message": {"role": "assistant", "content": "Hi \"there\""}}
    assert enc.token(TokenChunk("")) == b""
    call = orjson.loads(enc.token(TokenChunk("", tool_calls=[{"id": "c", "type": "function", "function": {
        "name": "f", "arguments": "{}"}}])))
    assert call["message"]["tool_calls"][0]["function"] == {"index": 0, "name": "f", "arguments": {}}
    thought = orjson.loads(enc.token(TokenChunk("", reasoning="hmm")))
    assert thought["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    done = orjson.loads(enc.done(completion(tool_calls=[{"id": "c"}], reasoning="hmm")))
    assert done["done"] and done["message"] == {"role": "assistant", "content": ""} and done["total_duration"] > 0
    noted = a.Chunks("m", False, 0, iter([1, 2]).__next__, on_done=lambda c: c.notes.append("tools dropped (x)"))
    assert orjson.loads(noted.done(completion()))["notes"] == ["tools dropped (x)"]
    gen = a.Chunks("m", False, 0, clock)
    assert orjson.loads(gen.token(TokenChunk("", reasoning="r"))) | {"created_at": ""} == {
        "model": "m", "created_at": "", "response": "", "done": False, "thinking": "r"}
    assert orjson.loads(gen.token(TokenChunk("x")))["response"] == "x"
    lp = [{"token": "x", "logprob": -0.1, "bytes": [120], "top_logprobs": []}]
    assert orjson.loads(gen.token(TokenChunk("x", logprobs=lp)))["logprobs"] == lp
    assert orjson.loads(gen.error(ValidationFailed("bad", field="x"))) == {"error": "bad"}
    assert "internal" in orjson.loads(gen.error(None))["error"]
    assert orjson.loads(a.error_json(TarsError("boom"))) == {"error": "boom"}


def test_show_and_delete_bodies():
    assert w.ShowBody(model="m:latest").id() == "m" and w.ModelBody(name="m").id() == "m"
    refused("model", w.ModelBody().id)
    refused("verbose", w.ShowBody(model="m", verbose=True).id)
    refused("system", w.ShowBody(model="m", system="be brief").id)
    assert w.ShowBody(model="m", system="", options={}).id() == "m"  # empty: asks for nothing
    refused("username", w.PullBody(model="m", username="u").id)


def test_streamed_lines_carry_rfc3339_times():
    from datetime import datetime, timezone

    stamps = a.Stamps()
    first, second = stamps.now().decode(), stamps.now().decode()
    for stamp in (first, second):
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert stamp.endswith("Z") and abs((datetime.now(timezone.utc) - when).total_seconds()) < 5
    assert second >= first
