"""Anthropic's Messages API on the wire: the request models, their translation to the one
domain request (``GenerateRequest``: OpenAI-shaped messages, tools and tool choice), and the
answer shapes — a ``message`` object, or the event stream ``message_start``,
``content_block_start`` / ``_delta`` / ``_stop`` per block, ``message_delta``, ``message_stop``.

Translation (what Claude Code and the ``anthropic`` SDK send):

- ``system`` (text or text blocks) → a system message first.
- user ``tool_result`` blocks → tool messages (``tool_call_id`` = ``tool_use_id``), then the
  user's text; assistant ``tool_use`` blocks → ``tool_calls`` (``input`` as JSON arguments),
  ``thinking`` blocks → the assistant's ``reasoning_content``; ``redacted_thinking`` is dropped
  (nothing here can read it); ``cache_control`` is accepted and has nothing to do (llama.cpp
  keeps a shared prompt prefix by itself). ``image`` blocks with a base64 source → OpenAI
  ``image_url`` parts (data: URLs) for a model that sees images (``vision.py``; the route checks
  it); a ``url`` source → 400 (the node fetches nothing for a client). Documents → 400.
- ``tools`` (custom: ``input_schema``) → function tools; Anthropic's server tools (a ``type``
  such as ``web_search_20250305``) → 400 naming ``tools[i].type``. ``tool_choice`` auto / any
  / tool / none → auto / required / the named tool / none; ``disable_parallel_tool_use`` →
  one call at most.
- ``thinking`` enabled → the template's ``enable_thinking``; disabled → ``reasoning_effort``
  "none"; ``budget_tokens`` is checked (≥ 1024, < ``max_tokens``) and bounded by
  ``max_tokens`` only.
- ``temperature`` 0…1 (Anthropic's range, default 1), ``top_p``, ``top_k``, ``stop_sequences``;
  ``metadata.user_id`` labels the request (logged). Known fields this server cannot serve
  (``container``, ``mcp_servers``, ``context_management``) → 400 naming them; unknown → 400.

Answers: ``stop_reason`` end_turn / max_tokens / tool_use (a stop sequence ends the turn
as "end_turn": the engine does not say which stop string matched), ``usage`` input_tokens
and output_tokens.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from .. import vision
from ..domain import Completion, GenerateRequest, TokenChunk
from ..errors import TarsError, ValidationFailed
from ..requests import MAX_STOPS, MaxTokens
from . import chat_messages
from .chat_surface import check_schema
from .error_shapes import anthropic_error

REFUSED = {"container": "containers (code execution) are not available here",
           "mcp_servers": "MCP servers are not available here: give the tools as 'tools'",
           "context_management": "context management is not available here"}
_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnthropicMessage(_Strict):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="Text, or blocks: text, tool_use (assistant), tool_result (user), thinking (assistant).")


class _Common(_Strict):
    model: str | None = None
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Custom tools: {name, description?, input_schema}.")
    tool_choice: dict[str, Any] | None = Field(None, description="{type: auto | any | tool (with name) | none}.")
    thinking: dict[str, Any] | None = None
    mcp_servers: list[Any] | None = None

    def _refuse(self) -> None:
        for name in REFUSED:
            if getattr(self, name, None) not in (None, [], {}):
                raise ValidationFailed(f"'{name}': {REFUSED[name]}", field=name)


def raw_messages(r: _Common) -> list[dict[str, Any]]:
    """The messages as sent (for ``vision.check_images``: a refusal names the client's field)."""
    return [{"role": m.role, "content": m.content} for m in r.messages]


class MessagesRequest(_Common):
    """POST /v1/messages."""

    max_tokens: MaxTokens
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOPS)
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 20)
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    output_config: dict[str, Any] | None = Field(None, description="{effort?, format?: {type: json_schema, schema}}.")
    speed: Literal["standard"] | None = Field(None, description="One speed here: 'standard'.")
    cache_control: dict[str, Any] | None = Field(None, description="Accepted: llama.cpp reuses a shared prompt "
                                                                   "prefix by itself.")
    diagnostics: dict[str, Any] | None = Field(None, description="Accepted; no prompt-cache report is returned.")
    inference_geo: str | None = Field(None, description="A label: everything runs on these hosts.")
    user_profile_id: str | None = None
    workspace_id: str | None = None
    container: Any = None
    context_management: Any = None

    def to_domain(self) -> GenerateRequest:
        self._refuse()
        messages, tools, choice, parallel, extra = translate(self)
        extra.update(_output_config(self.output_config))
        return GenerateRequest(
            model=self.model or None, messages=messages, max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p if self.top_p is not None else GenerateRequest().top_p,
            stop=[s for s in self.stop_sequences or () if s], stream=self.stream, tools=tools, tool_choice=choice,
            parallel_tool_calls=parallel, sampling={"top_k": self.top_k} if self.top_k is not None else {}, **extra)


class CountTokensRequest(_Common):
    """POST /v1/messages/count_tokens: the tokens the request's prompt takes."""

    def to_domain(self) -> GenerateRequest:
        self._refuse()
        messages, tools, choice, parallel, extra = translate(self)
        # one greedy token: the engine reports the prompt's tokens (chat template and tools applied)
        return GenerateRequest(model=self.model or None, messages=messages, max_tokens=1, temperature=0.0,
                               tools=tools, **extra)  # tools the model cannot take are dropped (counted without)


# =========================================================================== translation
def _text_of(blocks: Any, field: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ValidationFailed(f"'{field}' must be text or a list of text blocks", field=field)
    parts = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise ValidationFailed(f"'{field}[{j}]' must be a text block {{\"type\": \"text\", \"text\": ...}}",
                                   field=f"{field}[{j}]")
        parts.append(b["text"])
    return "\n\n".join(parts)


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An ``image`` block as an OpenAI ``image_url`` part (inline base64 only)."""
    src = block.get("source")
    kind = src.get("type") if isinstance(src, dict) else None
    if kind == "url":
        raise ValidationFailed(f"'{where}.source': image URLs are not fetched (the node fetches nothing on a client's "
                               "behalf); send the image as a base64 source", field=f"{where}.source")
    media = src.get("media_type") if isinstance(src, dict) else None
    data = src.get("data") if isinstance(src, dict) else None
    if kind != "base64" or not isinstance(media, str) or not media.startswith("image/") or not isinstance(data, str):
        raise ValidationFailed(f"'{where}.source' must be {{\"type\": \"base64\", \"media_type\": \"image/...\", "
                               "\"data\": ...}", field=f"{where}.source")
    vision.check_base64(data, f"{where}.source.data")
    return vision.image_part(vision.data_url(data, media))


def _blocks(content: Any, at: str) -> tuple[list[str], list[tuple[str, str | None, Any]]]:
    """A message's text blocks' text, and its other blocks as (where, type, block), in order."""
    texts: list[str] = []
    others: list[tuple[str, str | None, Any]] = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
        else:
            others.append((f"{at}.content[{j}]", kind, b))
    return texts, others


def _user(content: Any, at: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and image parts in order, when there is an image
    for j, b in enumerate(content):
        where = f"{at}.content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            texts.append(b["text"])
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image(b, where))
        elif kind == "tool_result":
            ident = b.get("tool_use_id")
            if not isinstance(ident, str) or not ident:
                raise ValidationFailed(f"'{where}.tool_use_id' is required", field=f"{where}.tool_use_id")
            result = _text_of(b.get("content") or "", f"{where}.content")
            out.append({"role": "tool", "tool_call_id": ident,
                        "content": f"Error: {result}" if b.get("is_error") else result})
        elif kind in ("document", "search_result"):
            raise ValidationFailed(f"'{where}': {kind} blocks are not supported: the models here read text and, "
                                   "with a vision projector, images", field=where)
        else:
            raise ValidationFailed(f"'{where}' must be a text, image or tool_result block", field=where)
    if len(parts) > len(texts):  # an image: the parts in order (vision.py)
        out.append({"role": "user", "content": parts})
    elif texts:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    return out


def _assistant(content: Any, at: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    calls, thoughts = [], []
    texts, others = _blocks(content, at)
    for where, kind, b in others:
        if kind == "tool_use":
            for key, typ in (("id", str), ("name", str), ("input", dict)):
                if not isinstance(b.get(key), typ) or (typ is str and not b[key]):
                    raise ValidationFailed(f"'{where}.{key}' is required ({'an object' if typ is dict else 'text'})",
                                           field=f"{where}.{key}")
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}})
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            thoughts.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue
        else:
            raise ValidationFailed(f"'{where}' must be a text, tool_use or thinking block", field=where)
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        msg["tool_calls"] = calls
    if thoughts:
        msg["reasoning_content"] = "\n".join(thoughts)
    return msg


def _tools(r: _Common) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    import re

    parallel = True
    tc = r.tool_choice or {}
    kind = tc.get("type", "auto") if r.tool_choice is not None else None
    if kind not in (None, "auto", "any", "tool", "none"):
        raise ValidationFailed("'tool_choice.type' must be auto, any, tool or none", field="tool_choice.type")
    if tc.get("disable_parallel_tool_use"):
        parallel = False
    if not r.tools:
        if kind in ("any", "tool"):
            raise ValidationFailed("'tool_choice' needs 'tools'", field="tool_choice")
        return None, None, parallel
    tools, names = [], []
    for i, t in enumerate(r.tools):
        if not isinstance(t, dict):
            raise ValidationFailed(f"'tools[{i}]' must be an object", field=f"tools[{i}]")
        if t.get("type") not in (None, "custom"):
            raise ValidationFailed(f"'tools[{i}].type' is '{t.get('type')}': Anthropic's server tools are not "
                                   "available here; give custom tools ({name, description, input_schema})",
                                   field=f"tools[{i}].type")
        name = t.get("name")
        if not isinstance(name, str) or not re.match(_NAME, name):
            raise ValidationFailed(f"'tools[{i}].name' must match {_NAME}", field=f"tools[{i}].name")
        schema = t.get("input_schema")
        check_schema(schema, f"tools[{i}].input_schema")
        desc = t.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValidationFailed(f"'tools[{i}].description' must be text", field=f"tools[{i}].description")
        fn: dict[str, Any] = {"name": name, "parameters": schema}
        if desc:
            fn["description"] = desc
        tools.append({"type": "function", "function": fn})
        names.append(name)
    if len(set(names)) != len(names):
        raise ValidationFailed("tool names must be unique", field="tools")
    choice: Any = {"auto": "auto", "any": "required", "none": "none", None: "auto"}.get(kind)
    if kind == "tool":
        if tc.get("name") not in names:
            raise ValidationFailed(f"'tool_choice.name' must name one of the tools ({', '.join(names)})",
                                   field="tool_choice.name")
        choice = {"type": "function", "function": {"name": tc["name"]}}
    return tools, choice, parallel


def _thinking(r: _Common) -> dict[str, Any]:
    t = r.thinking
    if t is None:
        return {}
    kind = t.get("type")
    if kind == "disabled":
        return {"reasoning_effort": "none"}
    if kind not in ("enabled", "adaptive", "between_tools"):
        raise ValidationFailed("'thinking.type' must be enabled, adaptive, between_tools or disabled",
                               field="thinking.type")
    budget = t.get("budget_tokens")
    if kind == "enabled":
        max_tokens = getattr(r, "max_tokens", None)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024 or (
                max_tokens is not None and budget >= max_tokens):
            raise ValidationFailed("'thinking.budget_tokens' must be an integer ≥ 1024 and below 'max_tokens'",
                                   field="thinking.budget_tokens")
    return {"chat_template_kwargs": {"enable_thinking": True}}


_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "xhigh"}


def _output_config(oc: dict[str, Any] | None) -> dict[str, Any]:
    """``output_config``: ``effort`` → reasoning_effort; ``format`` (a JSON schema) → the
    response format the engine holds the answer to by grammar."""
    if not oc:
        return {}
    unknown = sorted(set(oc) - {"effort", "format"})
    if unknown:
        raise ValidationFailed(f"'output_config.{unknown[0]}' is not known", field=f"output_config.{unknown[0]}")
    out: dict[str, Any] = {}
    effort = oc.get("effort")
    if effort is not None:
        if effort not in _EFFORTS:
            raise ValidationFailed(f"'output_config.effort' must be one of {', '.join(_EFFORTS)}",
                                   field="output_config.effort")
        out["reasoning_effort"] = _EFFORTS[effort]
    fmt = oc.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise ValidationFailed("'output_config.format' must be {\"type\": \"json_schema\", \"schema\": {...}}",
                                   field="output_config.format")
        check_schema(fmt.get("schema"), "output_config.format.schema")
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return out


def translate(r: _Common) -> tuple[list[dict[str, Any]], Any, Any, bool, dict[str, Any]]:
    """(messages, tools, tool_choice, parallel_tool_calls, extra domain fields) of a request."""
    messages: list[dict[str, Any]] = []
    if r.system is not None:
        system = _text_of(r.system, "system")
        if system:
            messages.append({"role": "system", "content": system})
    for i, m in enumerate(r.messages):
        at = f"messages[{i}]"
        if m.role == "user":
            messages.extend(_user(m.content, at))
        else:
            messages.append(_assistant(m.content, at))
    tools, choice, parallel = _tools(r)
    return chat_messages.check(messages), tools, choice, parallel, _thinking(r)


# =========================================================================== answers
def new_id(prefix: str = "msg") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def stop_reason(c: Completion) -> str:
    if c.tool_calls:
        return "tool_use"
    return "max_tokens" if c.finish_reason == "length" else "end_turn"


def tool_use(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = {}
    return {"type": "tool_use", "id": call.get("id") or new_id("toolu"), "name": fn.get("name", ""),
            "input": args if isinstance(args, dict) else {"value": args}}


def usage(c: Completion) -> dict[str, int]:
    return {"input_tokens": c.usage.prompt_tokens, "output_tokens": c.usage.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def message_body(c: Completion, mid: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if c.reasoning:
        content.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
    if c.text or not c.tool_calls:
        content.append({"type": "text", "text": c.text})
    content.extend(tool_use(call) for call in c.tool_calls or ())
    return {"id": mid, "type": "message", "role": "assistant", "model": c.model, "content": content,
            "stop_reason": stop_reason(c), "stop_sequence": None, "usage": usage(c),
            "node": c.node, "via": c.via}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessageStream:
    """A node stream as Anthropic's events (a ``streams.WireFormat``): one content block per
    run of reasoning (thinking) or text, one per tool call."""

    def __init__(self, mid: str, model: str) -> None:
        self.mid, self.model = mid, model
        self.index = -1
        self.open: str | None = None  # the kind of the content block open now

    def start(self) -> bytes:
        message: dict[str, Any] = {"id": self.mid, "type": "message", "role": "assistant", "model": self.model,
                                   "content": [], "stop_reason": None, "stop_sequence": None,
                                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return _event("message_start", {"type": "message_start", "message": message}) + \
            _event("ping", {"type": "ping"})

    def _block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open = kind
        return out + _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": block})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def token(self, item: TokenChunk) -> bytes:
        out = b""
        if item.reasoning:
            if self.open != "thinking":
                out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": item.reasoning})
        if item.text:
            if self.open != "text":
                out += self._block("text", {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": item.text})
        for call in item.tool_calls or ():
            block = tool_use(call)
            args = json.dumps(block["input"], ensure_ascii=False)
            out += self._block("tool_use", {**block, "input": {}})
            out += self._delta({"type": "input_json_delta", "partial_json": args}) + self._close()
        return out

    def done(self, c: Completion) -> bytes:
        out = self._block("text", {"type": "text", "text": ""}) if self.index < 0 else b""
        out += self._close()
        out += _event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": stop_reason(c), "stop_sequence": None},
                                        "usage": usage(c)})
        return out + _event("message_stop", {"type": "message_stop"})

    def error(self, exc: TarsError | None) -> bytes:
        err = exc or TarsError("internal error during generation; see the node's log")
        return self._close() + _event("error", anthropic_error(err))
