"""OpenAI's Responses API on the wire, stateless: the request model, its translation to the
one domain request, and the answer shapes — a ``response`` object, or the event stream
(``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` … ``.done``,
``response.function_call_arguments.delta`` / ``.done``, ``response.output_item.done``,
``response.completed`` or ``response.incomplete``), each event with its ``sequence_number``.

Translation (what Codex and the ``openai`` SDK send):

- ``input``: a string, or items — messages (``role`` user / system / developer / assistant,
  ``content`` a string or ``input_text`` / ``output_text`` parts), ``function_call`` (→ the
  assistant's ``tool_calls``), ``function_call_output`` (→ a tool message), ``reasoning``
  (dropped: nothing here reads an earlier turn's reasoning). ``instructions`` → a system
  message first. ``input_image`` (a ``data:`` URL) → an ``image_url`` part, for a model that
  sees images (the route checks); files, audio, ``file_id`` → 400; items that need stored state
  (``item_reference``) or hosted tools → 400 naming ``input[i].type``.
- ``tools``: function tools (``name``, ``parameters``); hosted tools (web search, file
  search, computer, MCP, …) → 400 naming ``tools[i].type``. ``tool_choice`` auto / none /
  required / ``{"type": "function", "name"}``; ``parallel_tool_calls``.
- ``text.format`` text / json_object / json_schema → the response format (a grammar);
  ``text.verbosity`` "medium" (the default) only. ``reasoning.effort`` → reasoning_effort;
  ``reasoning.summary`` is accepted: the reasoning item carries the model's reasoning text
  itself, not a summary.
- ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``; ``metadata``, ``user``,
  ``safety_identifier``, ``prompt_cache_key`` label the request (logged). ``include`` is
  accepted (no encrypted reasoning is kept: nothing is stored).
- Stateless: ``store`` false (or absent); ``store: true``, ``previous_response_id``,
  ``conversation``, ``background``, ``prompt``, … → 400 naming them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from ..domain import Completion, GenerateRequest, TokenChunk
from .. import vision
from ..errors import TarsError, ValidationFailed
from ..requests import MaxTokens, ReasoningEffort, Temperature, TopP
from . import chat_messages
from .chat_surface import FunctionDef, JsonSchemaFormat, check_schema

REFUSED = {
    "previous_response_id": "this server keeps no responses (it is stateless): send the whole conversation as 'input'",
    "conversation": "this server keeps no conversations (it is stateless): send the whole conversation as 'input'",
    "background": "background responses are not supported",
    "prompt": "stored prompt templates are not supported",
    "max_tool_calls": "'max_tool_calls' is not supported",
    "top_logprobs": "'top_logprobs' is not supported on /v1/responses (use /v1/chat/completions)",
    "context_management": "context management is not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_options": "'prompt_cache_options' is not supported (llama.cpp keeps a shared prompt prefix by itself)",
    "prompt_cache_retention": "'prompt_cache_retention' is not supported (llama.cpp keeps a shared prompt prefix "
                              "by itself)",
}
LABELS = ("user", "safety_identifier", "metadata", "prompt_cache_key")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ReasoningConfig(_Strict):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(description="Text, or items: messages, function_call, "
                                                          "function_call_output.")
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(None, description="Function tools: {type: function, name, "
                                                                 "description?, parameters?}.")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    store: bool | None = None
    include: list[str] | None = None
    truncation: Literal["disabled"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None
    context_management: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None

    def to_domain(self) -> GenerateRequest:
        for name, why in REFUSED.items():
            if getattr(self, name) not in (None, False, 0, [], {}):
                raise ValidationFailed(f"'{name}': {why}", field=name)
        if self.store:
            raise ValidationFailed("'store': true asks to keep the response; this server is stateless (send "
                                   "'store': false)", field="store")
        messages = chat_messages.check(_messages(self), where="input")
        tools, choice = _tools(self)
        d = GenerateRequest()
        return GenerateRequest(
            model=self.model or None, messages=messages,
            max_tokens=self.max_output_tokens if self.max_output_tokens is not None else 2048,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p, stream=self.stream, tools=tools,
            tool_choice=choice, parallel_tool_calls=self.parallel_tool_calls is not False,
            response_format=_format(self.text), reasoning_effort=self.reasoning.effort if self.reasoning else None)


# =========================================================================== translation
# Alike in shape with anthropic_wire._text_of (text or a list of typed parts), not in logic:
# the part types, the refusal parts of an assistant and the errors are the Responses API's.
def _parts(content: Any, at: str, role: str) -> str | list[dict[str, Any]]:
    """A message's content: its text, or, with ``input_image`` parts, OpenAI chat parts in order
    (the route checks each image's form, and that the model sees images: ``check_images``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationFailed(f"'{at}' must be text or a list of content parts", field=at)
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and role == "assistant" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
            parts.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and role == "user":
            if part.get("file_id") is not None and part.get("image_url") is None:
                raise ValidationFailed(f"'{at}[{j}].file_id': there is no Files API here; send the image inline as "
                                       "'image_url': \"data:image/png;base64,...\"", field=f"{at}[{j}].file_id")
            parts.append(vision.image_part(part.get("image_url")))  # its form: the route's check_images
        elif kind in ("input_image", "input_file", "input_audio"):
            what = "only a user message may carry an image" if kind == "input_image" else \
                f"{kind} is not supported: the models here read text and, with a vision projector, images"
            raise ValidationFailed(f"'{at}[{j}]': {what}", field=f"{at}[{j}]")
        else:
            raise ValidationFailed(f"'{at}[{j}]' must be an input_text, input_image or output_text part",
                                   field=f"{at}[{j}]")
    return parts if len(parts) > len(texts) else "".join(texts)


def _messages(r: ResponsesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if r.instructions:
        out.append({"role": "system", "content": r.instructions})
    if isinstance(r.input, str):
        out.append({"role": "user", "content": r.input})
        return out
    for i, item in enumerate(r.input):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise ValidationFailed(f"'{at}' must be an object", field=at)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ValidationFailed(f"'{at}.role' must be user, system, developer or assistant", field=f"{at}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _parts(item.get("content", ""), f"{at}.content", role)})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise ValidationFailed(f"'{at}.{key}' is required", field=f"{at}.{key}")
            args = item.get("arguments", "")
            if not isinstance(args, str):
                raise ValidationFailed(f"'{at}.arguments' must be a JSON string", field=f"{at}.arguments")
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": args}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":  # calls of one turn join its message
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise ValidationFailed(f"'{at}.call_id' is required", field=f"{at}.call_id")
            output = item.get("output", "")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": output if isinstance(output, str) else _parts(output, f"{at}.output", "tool")})
        elif kind == "reasoning":
            continue
        else:
            raise ValidationFailed(f"'{at}.type' is {kind!r}: only messages, function_call, function_call_output "
                                   "and reasoning items are supported here (no stored items, no hosted tools)",
                                   field=f"{at}.type")
    return out


def _tools(r: ResponsesRequest) -> tuple[list[dict[str, Any]] | None, Any]:
    choice = r.tool_choice
    if isinstance(choice, str) and choice not in ("auto", "none", "required"):
        raise ValidationFailed("'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\"}",
                               field="tool_choice")
    if isinstance(choice, dict) and (choice.get("type") != "function" or not isinstance(choice.get("name"), str)):
        raise ValidationFailed("'tool_choice' must name a function: {\"type\": \"function\", \"name\": ...}",
                               field="tool_choice")
    if not r.tools:
        if choice not in (None, "none", "auto"):
            raise ValidationFailed("'tool_choice' needs 'tools'", field="tool_choice")
        return None, None
    tools, names = [], []
    for i, t in enumerate(r.tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise ValidationFailed(f"'tools[{i}].type' is {kind!r}: only function tools are available here "
                                   "(no hosted tools)", field=f"tools[{i}].type")
        spec = {k: v for k, v in t.items() if k != "type"}
        try:
            fn = FunctionDef.model_validate(spec)
        except Exception:  # noqa: BLE001 - pydantic's error: name the tool
            raise ValidationFailed(f"'tools[{i}]' must be {{type: function, name, description?, parameters?, "
                                   "strict?}} with a name of letters, digits, _ or -", field=f"tools[{i}]") from None
        if fn.parameters is not None:
            check_schema(fn.parameters, f"tools[{i}].parameters")
        tools.append({"type": "function", "function": fn.model_dump(exclude_none=True)})
        names.append(fn.name)
    if len(set(names)) != len(names):
        raise ValidationFailed("tool names must be unique", field="tools")
    if isinstance(choice, dict):
        if choice["name"] not in names:
            raise ValidationFailed(f"'tool_choice' names '{choice['name']}', which is not in 'tools'",
                                   field="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return tools, choice or "auto"


def _format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise ValidationFailed("'text.format.schema' is required with type json_schema", field="text.format.schema")
    check_schema(fmt.schema_, "text.format.schema")
    spec = JsonSchemaFormat(name=fmt.name or "output", schema=fmt.schema_, description=fmt.description,
                            strict=fmt.strict)
    return {"type": "json_schema", "json_schema": spec.model_dump(by_alias=True, exclude_none=True)}


# =========================================================================== answers
def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def usage(c: Completion) -> dict[str, Any]:
    return {"input_tokens": c.usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c.usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": c.usage.total_tokens}


def echo(r: ResponsesRequest, req: GenerateRequest) -> dict[str, Any]:
    """The request's settings as a response object repeats them."""
    fmt = r.text.format.model_dump(by_alias=True, exclude_none=True) if r.text and r.text.format else {"type": "text"}
    choice = r.tool_choice if r.tool_choice is not None else "auto"
    return {"instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "temperature": req.temperature,
            "top_p": req.top_p, "tools": r.tools or [], "tool_choice": choice,
            "parallel_tool_calls": req.parallel_tool_calls, "text": {"format": fmt, "verbosity": "medium"},
            "reasoning": {"effort": req.reasoning_effort, "summary": r.reasoning.summary if r.reasoning else None},
            "store": False, "metadata": r.metadata or {}, "user": r.user, "truncation": "disabled",
            "previous_response_id": None, "background": False, "service_tier": "default",
            "prompt_cache_key": r.prompt_cache_key, "safety_identifier": r.safety_identifier}


def _part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(mid: str, text: str | None) -> dict[str, Any]:
    """A finished message item, or (``text`` None) one being written."""
    return {"type": "message", "id": mid, "status": "in_progress" if text is None else "completed",
            "role": "assistant", "content": [] if text is None else [_part(text)]}


def _call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"type": "function_call", "id": new_id("fc"), "call_id": call.get("id") or new_id("call"),
            "name": fn.get("name", ""), "arguments": fn.get("arguments", "") if status == "completed" else "",
            "status": status}


def _reasoning_item(rid: str, text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": rid, "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def response_object(rid: str, created: int, model: str, echo: dict[str, Any], output: list[dict[str, Any]],
                    c: Completion | None) -> dict[str, Any]:
    """The ``response`` object: in progress (``c`` None) or finished."""
    status = "in_progress" if c is None else ("incomplete" if c.finish_reason == "length" and not c.tool_calls
                                              else "completed")
    out: dict[str, Any] = {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
                           "output": output, "error": None, "usage": usage(c) if c is not None else None,
                           "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                           **echo}
    if c is not None:
        out.update(completed_at=int(time.time()), node=c.node, via=c.via)
    return out


def response_body(c: Completion, rid: str, created: int, echo: dict[str, Any]) -> dict[str, Any]:
    output: list[dict[str, Any]] = []
    if c.reasoning:
        output.append(_reasoning_item(new_id("rs"), c.reasoning))
    if c.text or not c.tool_calls:
        output.append(_message_item(new_id("msg"), c.text))
    output.extend(_call_item(call) for call in c.tool_calls or ())
    return response_object(rid, created, c.model, echo, output, c)


class ResponseStream:
    """A node stream as the Responses events (a ``streams.WireFormat``): a reasoning item
    while the model thinks, a message item for its text, a function_call item per call."""

    def __init__(self, rid: str, created: int, model: str, echo: dict[str, Any]) -> None:
        self.rid, self.created, self.model, self.echo = rid, created, model, echo
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the reasoning or message item being written
        self.text = ""

    def _event(self, kind: str, **data: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _snapshot(self, c: Completion | None) -> dict[str, Any]:
        return response_object(self.rid, self.created, self.model, self.echo, self.output, c)

    def start(self) -> bytes:
        return self._event("response.created", response=self._snapshot(None)) + \
            self._event("response.in_progress", response=self._snapshot(None))

    def _open(self, kind: str) -> bytes:
        out = self._close()
        index = len(self.output)
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": []}
            self.output.append(item)
            self.open, self.text = item, ""
            return out + self._event("response.output_item.added", output_index=index, item=item)
        item = _message_item(new_id("msg"), None)
        self.output.append(item)
        self.open, self.text = item, ""
        part = _part("")
        return out + self._event("response.output_item.added", output_index=index, item=item) + \
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=part)

    def _close(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = self.output.index(item)
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": self.text}]
            return self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=self.text) + \
                self._event("response.output_item.done", output_index=index, item=item)
        part = _part(self.text)
        item.update(status="completed", content=[part])
        return self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                           text=self.text, logprobs=[]) + \
            self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=part) + \
            self._event("response.output_item.done", output_index=index, item=item)

    def token(self, chunk: TokenChunk) -> bytes:
        out = b""
        if chunk.reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                out += self._open("reasoning")
            self.text += chunk.reasoning
            out += self._event("response.reasoning_text.delta", item_id=self.open["id"],  # type: ignore[index]
                               output_index=len(self.output) - 1, content_index=0, delta=chunk.reasoning)
        if chunk.text:
            if self.open is None or self.open["type"] != "message":
                out += self._open("message")
            self.text += chunk.text
            out += self._event("response.output_text.delta", item_id=self.open["id"],  # type: ignore[index]
                               output_index=len(self.output) - 1, content_index=0, delta=chunk.text, logprobs=[])
        for call in chunk.tool_calls or ():
            out += self._close()
            index = len(self.output)
            item = _call_item(call, status="in_progress")
            self.output.append(item)
            args = (call.get("function") or {}).get("arguments", "")
            out += self._event("response.output_item.added", output_index=index, item=dict(item))
            out += self._event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                               delta=args)
            item.update(arguments=args, status="completed")
            out += self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               name=item["name"], arguments=args)
            out += self._event("response.output_item.done", output_index=index, item=item)
        return out

    def done(self, c: Completion) -> bytes:
        out = self._close()
        if not self.output:  # an empty answer is still one (empty) message
            out += self._open("message") + self._close()
        final = self._snapshot(c)
        kind = "response.completed" if final["status"] == "completed" else "response.incomplete"
        return out + self._event(kind, response=final)

    def error(self, exc: TarsError | None) -> bytes:
        err = exc or TarsError("internal error during generation; see the node's log")
        failed = self._snapshot(None)
        failed.update(status="failed", error={"code": err.kind, "message": err.message})
        return self._close() + self._event("error", code=err.kind, message=err.message,
                                           param=err.details.get("field")) + \
            self._event("response.failed", response=failed)

