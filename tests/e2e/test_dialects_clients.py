"""End to end: the official clients against a real node serving the default models through
llama-server (issue 17) — the openai SDK (chat, stream, tools required / named / auto,
structured output, Responses + stream + tools), langchain-openai (``bind_tools``,
``with_structured_output``), instructor (TOOLS mode), the anthropic SDK (messages, stream,
tools, count_tokens, x-api-key), reasoning_content from a model that thinks, and the 36
tools Open WebUI sends with every chat. Skips where no llama-server is built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from distributed.engine.binary import locate
from tests.support import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

HOST = "127.0.0.4"
KEY = "dialects-e2e-key"
CHAT = "smollm2-135m-instruct"
THINKER = "smollm2-thinking"  # SmolLM2 with a template that opens a <think> block (tests/e2e/data)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}


@pytest.fixture(scope="module")
def node(smollm2_gguf: Path, tmp_path_factory):
    if locate(os.environ.get("TARS_ENGINE_BIN", "")) is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    models = tmp_path_factory.mktemp("dialects-models")
    template = Path(__file__).with_name("data") / "chatml-think.jinja"
    (models / "catalog.toml").write_text(
        f'[[model]]\nid = "{THINKER}"\nkind = "chat"\nbackend = "llama_cpp"\nparams_b = 0.135\nquant = "Q4_1"\n'
        f'context = 8192\npath = "{smollm2_gguf}"\nchat_template = "{template}"\n')
    env = {"TARS_API_KEY": KEY, "TARS_CHAT_ENGINE": "server", "TARS_PARALLEL": "2", "TARS_THREADS": "2",
           "TARS_MODELS": f"{CHAT},{THINKER}", "TARS_QUEUE_MAX_WAIT_S": "0", "TARS_REQUEST_TIMEOUT_S": "900"}
    if os.environ.get("TARS_ENGINE_BIN"):
        env["TARS_ENGINE_BIN"] = os.environ["TARS_ENGINE_BIN"]
    server = ServerProcess("dialects", HOST, ports=range(18900, 19000), env=env,
                           args=["--models-dir", str(models)], log_dir=tmp_path_factory.mktemp("dialects-e2e"))
    with server:
        server.start(timeout=300)
        yield server


@pytest.fixture(scope="module")
def oai(node):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=KEY, timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def claude(node):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=node.url, api_key=KEY, timeout=600, max_retries=0)


def _args(call) -> dict:
    args = json.loads(call.function.arguments)
    assert isinstance(args, dict)
    return args


# ---------------------------------------------------------------------------- openai chat
def test_chat_and_stream(oai):
    r = oai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Name three colours."}],
                                    max_tokens=24, temperature=0, extra_body={"top_k": 20, "min_p": 0.1})
    assert r.choices[0].message.content.strip()
    stream = oai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Say hello."}],
                                         max_tokens=12, stream=True, stream_options={"include_usage": True},
                                         metadata={"app": "e2e"}, prompt_cache_key="conv-1", user="u1")
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces).strip()


@pytest.mark.parametrize("choice,name", [("required", None), ({"type": "function", "function": {"name": "add"}},
                                                              "add")])
def test_tools_forced_give_a_valid_call(oai, choice, name):
    for stream in (False, True):
        kw = dict(model=CHAT, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice, max_tokens=80,
                  temperature=0, parallel_tool_calls=False)
        if not stream:
            r = oai.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "tool_calls"
            (call,) = r.choices[0].message.tool_calls
        else:
            calls: dict[int, dict] = {}
            finish = None
            for ch in oai.chat.completions.create(stream=True, **kw):
                if not ch.choices:
                    continue
                finish = ch.choices[0].finish_reason or finish
                for d in ch.choices[0].delta.tool_calls or ():
                    c = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    c["name"] += d.function.name or ""
                    c["arguments"] += d.function.arguments or ""
            assert finish == "tool_calls" and len(calls) == 1
            call = type("C", (), {"function": type("F", (), calls[0])})()
        assert call.function.name in ("get_weather", "add") and (name is None or call.function.name == name)
        spec = next(t for t in (WEATHER, ADD) if t["function"]["name"] == call.function.name)
        assert set(spec["function"]["parameters"]["required"]) <= set(_args(call))


def test_tools_auto_answers_or_calls(oai):
    r = oai.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], max_tokens=40, temperature=0)
    msg = r.choices[0].message
    assert (msg.content or "").strip() or msg.tool_calls


def test_the_36_tools_open_webui_sends_fit_the_default_context(node):
    tools = [{"type": "function", "function": {
        "name": f"builtin_{i}", "description": f"Open WebUI built-in tool {i}: search or update the user's memory, "
                                               "notes, calendar or knowledge base",
        "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "what to find"},
                                                        "limit": {"type": "integer", "description": "at most"}},
                       "required": ["query"]}}} for i in range(36)]
    r = httpx.post(f"{node.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=600,
                   json={"model": CHAT, "messages": [{"role": "user", "content": "Name three colours."}],
                         "tools": tools, "max_tokens": 24, "stream": True})
    assert r.status_code == 200, r.text
    assert "x-tars-tools-dropped" not in r.headers  # they fit 8,192 tokens
    assert r.text.rstrip().endswith("data: [DONE]")


def test_structured_output(oai):
    pydantic = pytest.importorskip("pydantic")

    class Colour(pydantic.BaseModel):
        name: str
        hex: str

    r = oai.chat.completions.parse(model=CHAT, messages=[{"role": "user", "content": "Give a colour."}],
                                   response_format=Colour, max_tokens=60, temperature=0)
    assert isinstance(r.choices[0].message.parsed, Colour)


# ---------------------------------------------------------------------------- langchain, instructor
def test_langchain_bind_tools_and_structured_output(node):
    lc = pytest.importorskip("langchain_openai")
    pydantic = pytest.importorskip("pydantic")
    llm = lc.ChatOpenAI(model=CHAT, base_url=f"{node.url}/v1", api_key=KEY, temperature=0, max_tokens=80,
                        timeout=600, max_retries=0)

    class GetWeather(pydantic.BaseModel):
        """Current weather in a city."""

        city: str

    msg = llm.bind_tools([GetWeather], tool_choice="required").invoke("What is the weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)
    auto = llm.bind_tools([GetWeather]).invoke("Hello!")
    assert auto.content or auto.tool_calls
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(GetWeather, method=method).invoke("Weather in Oslo?")
        assert isinstance(out, GetWeather)


def test_instructor_tools_mode(oai):
    instructor = pytest.importorskip("instructor")
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str
        age: int

    client = instructor.from_openai(oai, mode=instructor.Mode.TOOLS)
    person = client.chat.completions.create(model=CHAT, response_model=Person, max_retries=0, max_tokens=60,
                                            messages=[{"role": "user", "content": "Ann is 31 years old."}])
    assert isinstance(person, Person)


# ---------------------------------------------------------------------------- Responses
def test_responses_create_stream_and_tools(oai):
    r = oai.responses.create(model=CHAT, input="Name three colours.", instructions="Be brief.", store=False,
                             max_output_tokens=40)
    assert r.output_text.strip() and r.status in ("completed", "incomplete")
    events = list(oai.responses.create(model=CHAT, input="Say hello.", stream=True, max_output_tokens=12))
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert any(e.type == "response.output_text.delta" for e in events)
    tools = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
              "parameters": WEATHER["function"]["parameters"]}]
    r = oai.responses.create(model=CHAT, input="What is the weather in Paris?", tools=tools, tool_choice="required",
                             max_output_tokens=80, parallel_tool_calls=False)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments).get("city"), str)
    follow = oai.responses.create(model=CHAT, tools=tools, max_output_tokens=30, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}])
    assert follow.status in ("completed", "incomplete")


def test_responses_input_image_to_a_model_without_vision_is_a_400_naming_the_part(oai):
    import base64

    import openai

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(24)).decode()
    with pytest.raises(openai.BadRequestError) as err:
        oai.responses.create(model=CHAT, max_output_tokens=16, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{png}", "detail": "auto"}]}])
    assert "has no vision" in err.value.message and err.value.body["param"] == "input[0].content[1]"


# ---------------------------------------------------------------------------- Anthropic
def test_anthropic_messages_stream_tools_and_count(claude):
    msg = claude.messages.create(model=CHAT, max_tokens=30, system="Be brief.",
                                 messages=[{"role": "user", "content": "Name three colours."}])
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.usage.input_tokens > 0 and msg.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model=CHAT, max_tokens=12, messages=[{"role": "user", "content": "Say hi."}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.strip() and final.usage.output_tokens > 0
    tools = [{"name": "get_weather", "description": "Current weather in a city",
              "input_schema": WEATHER["function"]["parameters"]}]
    msg = claude.messages.create(model=CHAT, max_tokens=80, tools=tools,
                                 tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                 messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    (use,) = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and use.name == "get_weather" and isinstance(use.input.get("city"), str)
    follow = claude.messages.create(model=CHAT, max_tokens=20, tools=tools, messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}])
    assert follow.stop_reason in ("end_turn", "max_tokens", "tool_use")
    count = claude.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "Hello there"}])
    with_tools = claude.messages.count_tokens(model=CHAT, tools=tools,
                                              messages=[{"role": "user", "content": "Hello there"}])
    assert 0 < count.input_tokens < with_tools.input_tokens


# ---------------------------------------------------------------------------- reasoning
def test_reasoning_comes_back_apart_from_the_answer(oai, claude, node):
    r = oai.chat.completions.create(model=THINKER, messages=[{"role": "user", "content": "Name three colours."}],
                                    max_tokens=16, extra_body={"ignore_eos": True})
    assert getattr(r.choices[0].message, "reasoning_content", None), r
    stream = oai.chat.completions.create(model=THINKER, messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                         stream=True, extra_body={"ignore_eos": True})
    thought = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in stream if ch.choices)
    assert thought
    off = oai.chat.completions.create(model=THINKER, messages=[{"role": "user", "content": "Name three colours."}],
                                      max_tokens=16, reasoning_effort="none", extra_body={"ignore_eos": True})
    assert off.choices[0].message.content and not getattr(off.choices[0].message, "reasoning_content", None)
    msg = claude.messages.create(model=THINKER, max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
    assert msg.content and {b.type for b in msg.content} <= {"thinking", "text"}


def test_logprobs_on_a_speculating_engine_are_a_400_naming_them_and_the_model_stays_ready(node):
    h = {"Authorization": f"Bearer {KEY}"}
    # the default engine speculates (TARS_SPECULATIVE=auto: n-gram), and llama-server leaves the
    # log-probabilities of the tokens it accepted from a guess unset: refused by name, not answered wrong
    # (the engine's own refusals reaching the client as 400s: tests/integration/test_chat_surface.py)
    r = httpx.post(f"{node.url}/v1/chat/completions", headers=h, timeout=120,
                   json={"model": CHAT, "messages": ASK, "max_tokens": 4, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
    assert "TARS_SPECULATIVE=off" in r.json()["error"]["message"]
    r = httpx.post(f"{node.url}/v1/chat/completions", headers=h, timeout=120,
                   json={"model": CHAT, "messages": [{"role": "tool", "tool_calls": [{}]}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].tool_calls"
    assert httpx.get(f"{node.url}/health", timeout=10).json()["models"][CHAT] == "ready"
