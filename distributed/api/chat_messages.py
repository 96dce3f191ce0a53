"""The shapes of chat messages, checked before an engine sees them.

Every dialect (OpenAI chat, Anthropic Messages, Responses, Ollama) ends in the same list of
OpenAI-shaped message dicts (``GenerateRequest.messages``); ``check`` holds that list to the
shapes the chat templates and llama-server expect, and refuses anything else with a 400
naming the field (``messages[1].tool_calls[0].id``) instead of letting the engine fail on it
(a schema fuzzer's ``{"role": "tool", "tool_calls": [{}]}`` passed our validation and came
back from llama-server as an HTTP 500).

- ``tool_calls`` only on an assistant message; each item ``{"id": str, "type": "function",
  "function": {"name": str, "arguments": str}}`` (OpenAI's shape: arguments is a JSON
  string; an object is accepted and written as JSON). Other keys (a streamed ``index``)
  are dropped.
- ``tool_call_id`` only on a tool message, and a tool message needs one naming a call of
  an earlier assistant message (what OpenAI requires; templates break on stray results).
- ``content``: a string after the dialect's translation (text parts joined), or, on a user
  message carrying images, a list of ``text`` and ``image_url`` parts (OpenAI's shape, which
  llama-server reads; whether the model sees images is ``vision.check_images``'s, called by
  every dialect before this list reaches a node).

API::

    check(messages, where="messages") -> list[dict]   # normalised copies; ValidationFailed naming the field
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ValidationFailed

ROLES = ("system", "user", "assistant", "tool")
_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationFailed(f"'{field}' must be a string", field=field)
    return value


def _content(value: Any, role: str, field: str) -> str | list[dict[str, Any]]:
    if not isinstance(value, list):
        return _text(value, field)
    if role != "user":
        raise ValidationFailed(f"'{field}': only a user message carries images (this one is '{role}')", field=field)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(value):
        at = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
                and isinstance(part["image_url"].get("url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]["url"]}})
        else:
            raise ValidationFailed(f"'{at}' must be a text part or an image_url part {{\"url\": \"data:...\"}}",
                                   field=at)
    return parts


def has_content(message: dict[str, Any]) -> bool:
    """Whether a domain message says something: text, an image, or tool calls."""
    content = message.get("content")
    if isinstance(content, list):
        return any(p.get("type") != "text" or p.get("text", "").strip() for p in content)
    return bool((content or "").strip() or message.get("tool_calls"))


def _call(call: Any, field: str) -> dict[str, Any]:
    if not isinstance(call, dict):
        raise ValidationFailed(f"'{field}' must be an object {{\"id\", \"type\": \"function\", \"function\"}}",
                               field=field)
    ident = call.get("id")
    if not isinstance(ident, str) or not ident:
        raise ValidationFailed(f"'{field}.id' is required: the id a tool message answers with 'tool_call_id'",
                               field=f"{field}.id")
    if call.get("type", "function") != "function":
        raise ValidationFailed(f"'{field}.type' must be 'function'", field=f"{field}.type")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise ValidationFailed(f"'{field}.function' is required: {{\"name\", \"arguments\"}}", field=f"{field}.function")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValidationFailed(f"'{field}.function.name' is required", field=f"{field}.function.name")
    args = fn.get("arguments", "")
    if isinstance(args, dict):
        args = json.dumps(args, ensure_ascii=False)
    elif not isinstance(args, str):
        raise ValidationFailed(f"'{field}.function.arguments' must be a JSON string", field=f"{field}.function.arguments")
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": args}}


def check(messages: list[dict[str, Any]], where: str = "messages") -> list[dict[str, Any]]:
    """Normalised copies of ``messages``, or ValidationFailed naming the first bad field."""
    if not messages:
        raise ValidationFailed(f"'{where}' is empty; send at least one message", field=where)
    out: list[dict[str, Any]] = []
    call_ids: set[str] = set()
    for i, m in enumerate(messages):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise ValidationFailed(f"'{at}' must be an object", field=at)
        role = m.get("role")
        if role not in ROLES:
            raise ValidationFailed(f"'{at}.role' must be one of {', '.join(ROLES)}", field=f"{at}.role")
        unknown = sorted(set(m) - _KEYS)
        if unknown:
            raise ValidationFailed(f"'{at}.{unknown[0]}' is not a field of a chat message", field=f"{at}.{unknown[0]}")
        msg: dict[str, Any] = {"role": role, "content": _content(m.get("content") or "", role, f"{at}.content")}
        if m.get("name") is not None:
            msg["name"] = _text(m["name"], f"{at}.name")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValidationFailed(f"'{at}.tool_calls': only an assistant message carries tool calls "
                                       f"(this one is '{role}')", field=f"{at}.tool_calls")
            if not isinstance(calls, list):
                raise ValidationFailed(f"'{at}.tool_calls' must be a list", field=f"{at}.tool_calls")
            if calls:
                msg["tool_calls"] = [_call(c, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls)]
                call_ids.update(c["id"] for c in msg["tool_calls"])
        answered = m.get("tool_call_id")
        if role == "tool":
            if not isinstance(answered, str) or not answered:
                raise ValidationFailed(f"'{at}.tool_call_id' is required: the id of the tool call this result answers",
                                       field=f"{at}.tool_call_id")
            if answered not in call_ids:
                raise ValidationFailed(f"'{at}.tool_call_id' is '{answered}', which no earlier assistant message's "
                                       "tool_calls has", field=f"{at}.tool_call_id")
            msg["tool_call_id"] = answered
        elif answered is not None:
            raise ValidationFailed(f"'{at}.tool_call_id': only a tool message answers a tool call (this one is "
                                   f"'{role}')", field=f"{at}.tool_call_id")
        reasoning = m.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise ValidationFailed(f"'{at}.reasoning_content': only an assistant message carries reasoning",
                                       field=f"{at}.reasoning_content")
            msg["reasoning_content"] = _text(reasoning, f"{at}.reasoning_content")
        out.append(msg)
    if not any(has_content(m) for m in out):
        raise ValidationFailed(f"every message in '{where}' is empty", field=where)
    return out
