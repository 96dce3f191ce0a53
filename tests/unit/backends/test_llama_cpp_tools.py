"""The in-process engine with the default chat model: SmolLM2's catalog names the shipped
ChatML tools template, so tools work in process too (required / named → a valid call by
grammar; auto → the model's choice, read from its <tool_call> blocks)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.catalog import load_catalog
from distributed.domain import Assignment, GenerateRequest

pytestmark = pytest.mark.slow

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                           "b": {"type": "number"}},
                                                          "required": ["a", "b"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def smol(smollm2_gguf: Path):
    spec = load_catalog().get("smollm2-135m-instruct")
    a = Assignment(model=spec.id, kind="chat", node="t", device="cpu", quant=spec.quant, n_gpu_layers=0, vram_mb=0,
                   reason="test", backend="llama_cpp")
    b = create_backend(spec, a, BackendOptions(context=2048, threads=2), smollm2_gguf)
    b.load()
    yield b
    b.unload()


def _calls(b, req: GenerateRequest):
    b.check_request(req)
    chunks = list(b.stream(req, threading.Event()))
    calls = [c for ch in chunks for c in (ch.tool_calls or [])]
    return calls, chunks[-1].finish_reason


def test_the_template_renders_the_tools(smol):
    text, stops, _ = smol.format_chat(ASK, TOOLS, "auto")
    assert "<tools>" in text and '"name": "get_weather"' in text and "<|im_end|>" in stops


@pytest.mark.parametrize("choice,name", [("required", None), ({"type": "function", "function": {"name": "add"}}, "add")])
def test_a_forced_choice_gives_a_valid_call(smol, choice, name):
    calls, finish = _calls(smol, GenerateRequest(messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80,
                                                 temperature=0.0, parallel_tool_calls=False))
    assert finish == "tool_calls" and len(calls) == 1
    fn = calls[0]["function"]
    assert fn["name"] in {"get_weather", "add"} and (name is None or fn["name"] == name)
    args = json.loads(fn["arguments"])
    required = next(t for t in TOOLS if t["function"]["name"] == fn["name"])["function"]["parameters"]["required"]
    assert set(required) <= set(args)


def test_auto_answers_or_calls(smol):
    b = smol
    req = GenerateRequest(messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=40, temperature=0.0)
    b.check_request(req)
    chunks = list(b.stream(req, threading.Event()))
    text = "".join(c.text for c in chunks)
    calls = [c for ch in chunks for c in (ch.tool_calls or [])]
    assert text.strip() or calls  # whichever the model chose, it is an answer


def test_template_inputs_reach_the_jinja_template(smol):
    req = GenerateRequest(messages=ASK, reasoning_effort="low", chat_template_kwargs={"enable_thinking": False})
    smol.check_request(req)  # a Jinja template: they reach it
    assert smol.prompt_tokens(req) > 0


def test_without_tools_the_template_writes_what_smollm2s_own_does(smol):
    """The shipped template adds tools and nothing else: a plain chat is rendered byte for
    byte as the GGUF's own template renders it (its default system prompt included)."""
    jinja2 = pytest.importorskip("jinja2")
    own = smol._llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for messages in (ASK, [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": "Sun."},
                           {"role": "user", "content": "Thanks"}]):
        text, _, _ = smol.format_chat(messages)
        assert text == env.from_string(own).render(messages=messages, add_generation_prompt=True)
