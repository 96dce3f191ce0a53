"""distributed/templates: the shipped ChatML tools template, and the catalog's chat_template
field (a shipped name; a file path only in a user catalog, resolved against it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed import templates
from distributed.catalog import _spec_from_entry, load_catalog, read_catalog_file
from distributed.errors import ConfigError

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def _render(messages, tools=None, add_generation_prompt=True) -> str:
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False}
    return env.from_string(templates.file_of("chatml-tools").read_text()).render(
        messages=messages, tools=tools, add_generation_prompt=add_generation_prompt)


def test_shipped_names_and_files():
    assert "chatml-tools" in templates.names()
    assert templates.file_of("chatml-tools").is_file()
    assert templates.is_name("chatml-tools") and not templates.is_name("x/y.jinja") and not templates.is_name("a.jinja")
    with pytest.raises(ConfigError, match="not one of the shipped"):
        templates.file_of("nope")


def test_chatml_without_tools_keeps_the_system_turn():
    text = _render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    text = _render([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    # SmolLM2's own default system prompt, as its GGUF template writes it
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                           "Face<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n")


def test_tools_calls_and_results_in_the_hermes_format():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = _render(messages, TOOLS)
    listed = text.split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    assert json.loads(listed) == TOOLS[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>' in text
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_the_default_chat_model_names_the_shipped_template():
    spec = load_catalog().get("smollm2-135m-instruct")
    assert spec.chat_template == "chatml-tools"
    assert templates.path_for(spec) == templates.file_of("chatml-tools")
    assert "<tool_call>" in (templates.source_for(spec) or "")
    assert templates.path_for(load_catalog().get("gemma-3-270m")) is None


BASE = {"id": "m", "kind": "chat", "backend": "llama_cpp", "params_b": 0.1, "quant": "Q4_0", "context": 512,
        "path": "m.gguf"}


def test_catalog_field_checks():
    assert _spec_from_entry({**BASE, "chat_template": "chatml-tools"}, "here", True).chat_template == "chatml-tools"
    with pytest.raises(ConfigError, match="not one of the shipped"):
        _spec_from_entry({**BASE, "chat_template": "chatml-nope"}, "here")
    with pytest.raises(ConfigError, match="shipped templates only"):
        _spec_from_entry({**BASE, "chat_template": "/etc/t.jinja"}, "here", True)  # the built-in catalog
    with pytest.raises(ConfigError, match="chat_template"):
        _spec_from_entry({**BASE, "chat_template": 3}, "here")


def test_a_user_catalog_may_point_at_its_own_template_file(tmp_path: Path):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "mine.jinja").write_text("{{ messages[0].content }}")
    cat = tmp_path / "catalog.toml"
    cat.write_text('[[model]]\nid = "mine"\nkind = "chat"\nbackend = "llama_cpp"\nparams_b = 0.1\nquant = "Q4_0"\n'
                   'context = 512\npath = "m.gguf"\nchat_template = "tpl/mine.jinja"\n')
    (spec,) = read_catalog_file(cat)
    assert spec.chat_template == str((tmp_path / "tpl" / "mine.jinja").resolve())
    assert templates.source_for(spec) == "{{ messages[0].content }}"
    assert load_catalog(user_file=cat).get("mine").chat_template == spec.chat_template
    cat.write_text(cat.read_text().replace("tpl/mine.jinja", "tpl/missing.jinja"))
    with pytest.raises(ConfigError, match="not found"):
        read_catalog_file(cat)
