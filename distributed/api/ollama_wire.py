"""Ollama's requests on the wire: the request models of /api/chat, /api/generate, /api/embed,
/api/embeddings, /api/show, /api/delete and /api/pull, and their translation into the
domain requests every dialect shares (``GenerateRequest`` / ``EmbedRequest``).

Routes: ``ollama.py``; the options table, names, ``keep_alive``, ``think``, ``format``:
``ollama_options.py``; answers and chunks: ``ollama_answers.py``; model rows for
tags/ps/show: ``ollama_models.py``. The rule of the other dialects holds here too: a field
is honoured, or refused with a 400 naming it (docs/OLLAMA.md lists each). Messages end in
the OpenAI-shaped dicts ``chat_messages.check`` holds every dialect's to.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..domain import EmbedRequest, GenerateRequest
from ..errors import ValidationFailed
from ..requests import TopLogprobs
from ..vision import with_images
from . import chat_messages
from .chat_surface import Tool, check_schema
from .ollama_options import Options, keep_alive_s, model_id, response_format, thinking

OLLAMA_VERSION = "0.12.0"  # the version of Ollama's API these routes follow (/api/version)


# =========================================================================== requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    index: int | None = None
    name: str = Field(min_length=1)
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None  # an earlier answer's thinking (→ its reasoning_content)
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v  # Ollama takes "User" too


class _Generating(_Strict):
    """Fields /api/chat and /api/generate share."""

    model: str = Field(min_length=1)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    truncate: bool | None = None
    shift: bool | None = None

    def common(self, default_max_tokens: int) -> tuple[dict[str, Any], Options]:
        """The GenerateRequest fields every generating request has, and its checked options."""
        if self.truncate:
            raise ValidationFailed("'truncate': true is not honoured: a prompt is never cut here; one longer than "
                                   "the context gets a 400 saying the limit (send false or leave it out)",
                                   field="truncate")
        if self.shift:
            raise ValidationFailed("'shift': true is not honoured: the context is never shifted; the answer stops "
                                   "at the end of the context (send false or leave it out)", field="shift")
        if self.top_logprobs and not self.logprobs:
            raise ValidationFailed("'top_logprobs' needs 'logprobs': true", field="top_logprobs")
        keep_alive_s(self.keep_alive)
        opts = Options(self.options)
        out: dict[str, Any] = {"model": model_id(self.model), "stream": self.stream, "max_tokens": default_max_tokens,
                               "response_format": response_format(self.format), "logprobs": bool(self.logprobs),
                               "top_logprobs": self.top_logprobs or 0, **thinking(self.think), **opts.generate}
        return out, opts


class ChatRequest(_Generating):
    """POST /api/chat."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    def image_sources(self) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
        """Where images are, as sent (``vision.check_images``'s messages and images)."""
        return [{"images": m.images} if m.images else {} for m in self.messages], None

    def empty(self) -> bool:
        return not self.messages

    def to_domain(self, default_max_tokens: int) -> tuple[GenerateRequest, Options]:
        fields, opts = self.common(default_max_tokens)
        tools = self._tools()
        messages = domain_messages(self.messages)
        if messages:  # none: a request that loads the model (the route answers it)
            messages = chat_messages.check(messages)  # the shapes every dialect's messages are held to
        return _request(fields, opts, messages=messages, tools=tools, tool_choice="auto" if tools else None), opts

    def _tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValidationFailed("tool names must be unique", field="tools")
        for i, t in enumerate(self.tools):
            if t.function.parameters is not None:
                check_schema(t.function.parameters, f"tools[{i}].function.parameters")
        return [t.model_dump(exclude_none=True) for t in self.tools]


class GenerateBody(_Generating):
    """POST /api/generate."""

    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None

    def image_sources(self) -> tuple[list[dict[str, Any]] | None, list[str] | None]:
        return None, self.images

    def empty(self) -> bool:
        return not self.prompt and not self.images

    def to_domain(self, default_max_tokens: int) -> tuple[GenerateRequest, Options]:
        for name, why in (("suffix", "fill-in-the-middle ('suffix') is not offered by the models served here"),
                          ("template", "Ollama's Go templates are not rendered here: send the formatted prompt with "
                                       "'raw': true, or leave 'template' out for the model's own chat template"),
                          ("context", "'context' (token ids of an earlier answer) is not offered: send the "
                                      "conversation to /api/chat instead")):
            if getattr(self, name):
                raise ValidationFailed(why, field=name)
        fields, opts = self.common(default_max_tokens)
        if self.raw:
            if self.images:
                raise ValidationFailed("'images' need the model's chat template, which a raw prompt skips: drop 'raw' "
                                       "to send images", field="images")
            if self.system:
                raise ValidationFailed("'system' has no place in a raw prompt: put it in 'prompt' or drop 'raw'",
                                       field="system")
            return _request(fields, opts, prompt=self.prompt), opts
        messages = [{"role": "system", "content": self.system}] if self.system else []
        user = {"role": "user", "content": with_images(self.prompt, self.images)}  # images: vision.py
        return _request(fields, opts, messages=[*messages, user]), opts


def _request(fields: dict[str, Any], opts: Options, **more: Any) -> GenerateRequest:
    return GenerateRequest(**fields, **more, sampling=opts.samplers)


def domain_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama messages → the domain's (OpenAI's) messages: tool calls get ids and JSON-text
    arguments; a tool answer names the call it answers (its ``tool_call_id``, else the
    earliest unanswered call of its ``tool_name``, else the earliest unanswered call)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for i, m in enumerate(messages):
        if m.images and m.role != "user":
            raise ValidationFailed(f"messages[{i}].images: only a user message carries images",
                                   field=f"messages[{i}].images")
        msg: dict[str, Any] = {"role": m.role, "content": with_images(m.content or "", m.images)}  # vision.py
        if m.thinking:
            if m.role != "assistant":
                raise ValidationFailed(f"messages[{i}].thinking: only an assistant message carries thinking",
                                       field=f"messages[{i}].thinking")
            msg["reasoning_content"] = m.thinking
        if m.tool_calls:
            if m.role != "assistant":
                raise ValidationFailed(f"messages[{i}].tool_calls: only assistant messages carry tool calls",
                                       field=f"messages[{i}].tool_calls")
            calls = []
            for j, c in enumerate(m.tool_calls):
                cid = c.id or f"call_{i}_{j}"
                calls.append({"id": cid, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments, i, j)}})
                open_calls.append((cid, c.function.name))
            msg["tool_calls"] = calls
        if m.role == "tool":
            if m.tool_name:
                msg["name"] = m.tool_name
            msg["tool_call_id"] = _answers(m, open_calls, i)
        elif m.tool_name or m.tool_call_id:
            which = "tool_name" if m.tool_name else "tool_call_id"
            raise ValidationFailed(f"messages[{i}].{which}: only tool messages carry it", field=f"messages[{i}].{which}")
        out.append(msg)
    return out


def _arguments(args: dict[str, Any] | str, i: int, j: int) -> str:
    if isinstance(args, dict):
        return orjson.dumps(args).decode()
    try:
        parsed = orjson.loads(args) if args.strip() else {}
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        field = f"messages[{i}].tool_calls[{j}].function.arguments"
        raise ValidationFailed(f"'{field}' must be a JSON object", field=field)
    return orjson.dumps(parsed).decode()


def _answers(m: Message, open_calls: list[tuple[str, str]], i: int) -> str:
    if m.tool_call_id:
        for k, (cid, _) in enumerate(open_calls):
            if cid == m.tool_call_id:
                del open_calls[k]
                break
        return m.tool_call_id
    for k, (cid, name) in enumerate(open_calls):
        if m.tool_name is None or name == m.tool_name:
            del open_calls[k]
            return cid
    which = f"no earlier assistant message calls '{m.tool_name}'" if m.tool_name else "no tool call is unanswered"
    raise ValidationFailed(f"messages[{i}]: a tool result answers a tool call, and {which}",
                           field=f"messages[{i}].tool_name" if m.tool_name else f"messages[{i}]")


class EmbedBody(_Strict):
    """POST /api/embed."""

    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None

    def to_domain(self, max_inputs: int) -> tuple[EmbedRequest, Options]:
        if self.truncate is False:
            raise ValidationFailed("'truncate': false is not honoured: inputs longer than the model's sequence "
                                   "length are always truncated (send true or leave it out)", field="truncate")
        keep_alive_s(self.keep_alive)
        opts = Options(self.options, embed=True)
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not texts:
            raise ValidationFailed("'input' is empty; send a string or a non-empty list of strings", field="input")
        if len(texts) > max_inputs:
            raise ValidationFailed(f"'input' has {len(texts)} texts; this node embeds at most {max_inputs} per "
                                   "request (TARS_EMBED_MAX_INPUTS): split it", field="input", limit=max_inputs)
        for i, t in enumerate(texts):
            if not t.strip():
                field = "input" if isinstance(self.input, str) else f"input[{i}]"
                raise ValidationFailed(f"'{field}' is empty", field=field)
        return EmbedRequest(model=model_id(self.model), input=texts, normalize=True), opts


class EmbeddingsBody(_Strict):
    """POST /api/embeddings (the older endpoint: one prompt, vectors not normalised, as Ollama's)."""

    model: str = Field(min_length=1)
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class ModelBody(_Strict):
    """/api/delete: a model name (``name`` is the older spelling)."""

    model: str | None = None
    name: str | None = None

    def id(self) -> str:
        name = self.model or self.name
        if not name:
            raise ValidationFailed("field 'model' is required", field="model")
        return model_id(name) or name


class ShowBody(ModelBody):
    """/api/show."""

    verbose: bool = False
    system: str | None = None  # accepted empty, as older clients send it
    template: str | None = None
    options: dict[str, Any] | None = None

    def id(self) -> str:
        for name in ("system", "template", "options"):
            if getattr(self, name):
                raise ValidationFailed(f"'{name}' is not offered: /api/show describes the model as it is served",
                                       field=name)
        if self.verbose:
            raise ValidationFailed("'verbose': true is not offered: the GGUF's token lists are not returned (they are "
                                   "left empty, as Ollama does without it)", field="verbose")
        return super().id()


class PullBody(_Strict):
    """POST /api/pull."""

    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None  # ignored by Ollama itself (deprecated); nothing is fetched insecurely here
    username: str | None = None
    password: str | None = None

    def id(self) -> str:
        if self.username or self.password:
            raise ValidationFailed("'username'/'password' are not used: models come from the catalog",
                                   field="username" if self.username else "password")
        return ModelBody(model=self.model, name=self.name).id()
