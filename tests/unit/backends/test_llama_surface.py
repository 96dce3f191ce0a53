"""llama_surface's pure parts: tool-call parsing, template messages, grammars, capability checks."""

from __future__ import annotations

import json

import pytest

from distributed.backends import llama_surface as surface
from distributed.domain import GenerateRequest
from distributed.errors import ValidationFailed

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_parse_tool_calls_reads_known_calls_and_keeps_the_rest():
    text = ('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'
            '<tool_call>{not json}</tool_call>')
    content, calls = surface.parse_tool_calls(text, {"get_weather"})
    assert len(calls) == 1 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}
    assert content.startswith("Sure.") and "unknown" in content and "{not json}" in content
    assert surface.parse_tool_calls("no calls here", {"f"}) == ("no calls here", [])


def test_template_messages_turn_argument_strings_into_objects():
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    out = surface.template_messages([{"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "user", "content": "x"}])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert call["function"]["arguments"] == '{"a": 1}'  # the request itself is untouched
    assert out[1] == {"role": "user", "content": "x"}


class _Formatter:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter (template + _environment)."""

    def __init__(self, template: str, renders_tools: bool) -> None:
        self.template, self._environment, self.renders = template, object(), renders_tools

    def __call__(self, *, messages, tools=None, **_):  # noqa: ANN001
        names = " ".join(t["function"]["name"] for t in tools or []) if self.renders else ""
        return type("R", (), {"prompt": f"{names} {messages[-1]['content']}"})()


def test_tool_support_refuses_templates_that_cannot_do_tools():
    with pytest.raises(ValidationFailed) as err:
        surface.tool_support(_Formatter("{{ messages }}", renders_tools=False), "m")
    assert err.value.field == "tools" and "does not render tools" in err.value.message
    with pytest.raises(ValidationFailed) as err:
        surface.tool_support(_Formatter("[TOOL_CALLS]", renders_tools=True), "m")
    assert "tool-call format" in err.value.message and "server engine" in err.value.message
    with pytest.raises(ValidationFailed) as err:
        surface.tool_support(lambda **kw: None, "m")  # a built-in format
    assert "built-in" in err.value.message
    surface.tool_support(_Formatter("... <tool_call> ...", renders_tools=True), "m")  # passes


def test_grammars_from_llama_cpp_python():
    llama_cpp = pytest.importorskip("llama_cpp")
    g = surface.tool_call_grammar(llama_cpp, [WEATHER], {"type": "function", "function": {"name": "get_weather"}},
                                  parallel=False)
    assert g.startswith('root ::= "<tool_call>\\n" tool-json') and "tool-json ::=" in g and "get_weather" in g
    assert "\n(" not in g.split("\n")[0]  # one call only
    many = surface.tool_call_grammar(llama_cpp, [WEATHER], "required", parallel=True)
    assert many.split("\n")[0].endswith(")*")
    assert surface.response_grammar(llama_cpp, {"type": "json_object"}) == llama_cpp.llama_grammar.JSON_GBNF
    assert surface.response_grammar(llama_cpp, None) is None
    assert "root ::=" in surface.response_grammar(
        llama_cpp, {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    with pytest.raises(ValidationFailed) as err:
        surface.response_grammar(llama_cpp, {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"$ref": "https://example.com/remote.json"}}})
    assert err.value.field == "response_format.json_schema.schema"


def test_feature_refusal_names_the_field():
    from distributed.backends.base import requested_features

    assert requested_features(GenerateRequest(prompt="x")) == {}
    assert requested_features(GenerateRequest(prompt="x", frequency_penalty=0.5)) == {"penalties": "frequency_penalty"}
    assert requested_features(GenerateRequest(prompt="x", response_format={"type": "text"})) == {}
    assert requested_features(GenerateRequest(prompt="x", top_logprobs=2)) == {"logprobs": "top_logprobs"}
    assert requested_features(GenerateRequest(prompt="x", tools=[WEATHER])) == {"tools": "tools"}
