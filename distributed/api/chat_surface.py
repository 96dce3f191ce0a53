"""The OpenAI chat surface: request models of /v1/chat/completions and /v1/completions,
which parameters are honoured and which are refused, and the answer shapes.

The rule: every parameter a client sends is either honoured or refused with a 400 naming
it (OpenAI's error shape, ``param`` set) — none is silently dropped. Each OpenAI request
field is listed here: a model field (honoured; an engine that cannot do one refuses it by
name, ``backends.base.ChatBackend.check_request``), a conditional one (``store``,
``modalities``, ``service_tier``, ``best_of``, ``echo``, ``suffix``: their no-op values
are accepted), or an entry of ``REFUSED``. llama.cpp's sampler extras (``top_k``,
``min_p``, ``dry_*``, …) are fields too (``sampling.Knobs``, bounds there) and travel as
``GenerateRequest.sampling``; ``reasoning_effort`` and ``chat_template_kwargs`` reach the
chat template. A field OpenAI does not know is refused as unknown, as OpenAI does
("Unrecognized request argument"). ``LABELS`` (``user``, ``safety_identifier``,
``metadata``, ``prompt_cache_key``) only label a request, and we record them in the node's
log. Message shapes are checked by ``chat_messages.check``.

Answers: ``tool_calls`` (finish_reason "tool_calls"), ``logprobs`` ({"content": [...]}
for chat; the legacy tokens/token_logprobs/top_logprobs/text_offset shape for
completions), n choices, and in streams a usage chunk when ``stream_options.include_usage``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from .. import sampling
from ..domain import Completion, GenerateRequest
from ..errors import ValidationFailed
from ..requests import MAX_CHOICES, Choices, MaxTokens, Penalty, ReasoningEffort, Temperature, TopLogprobs, TopP
from . import chat_messages
from .schemas import ChatMessage, domain_messages, stop_list, usage

MAX_N = MAX_CHOICES

# Known OpenAI parameters we do not serve, each with the reason the 400 gives.
REFUSED: dict[str, str] = {
    "audio": "audio output is not supported",
    "functions": "the deprecated 'functions' is not supported; send 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; send 'tool_choice'",
    "logit_bias": "'logit_bias' is not supported (token ids differ between the models served here)",
    "prediction": "predicted outputs ('prediction') are not supported",
    "verbosity": "'verbosity' is not supported",
    "web_search_options": "web search is not supported",
    "prompt_cache_retention": "'prompt_cache_retention' is not supported (llama.cpp keeps a shared prompt prefix "
                              "by itself, for as long as its slot holds it)",
}
# Fields that only label a request: recorded in the node's log, nothing else.
LABELS = ("user", "safety_identifier", "metadata", "prompt_cache_key")
# Template variables llama-server sets itself: a chat_template_kwargs key may not replace them.
RESERVED_TEMPLATE_KEYS = frozenset({"messages", "tools", "tool_choice", "add_generation_prompt", "bos_token",
                                    "eos_token", "raise_exception"})
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


def check_schema(schema: Any, field: str) -> None:
    """A JSON schema must be an object and valid JSON Schema (with ``jsonschema`` installed)."""
    if not isinstance(schema, dict):
        raise ValidationFailed(f"'{field}' must be a JSON Schema object", field=field)
    try:
        import jsonschema
    except ImportError:  # the engine's grammar conversion still checks what it uses
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise ValidationFailed(f"'{field}' is not a valid JSON Schema{f' at {where}' if where else ''}: "
                               f"{exc.message}", field=field) from None


class _Request(BaseModel):
    # "allow": the extras are inspected by _refuse_extras (refused or unknown, each by name)
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def _refuse_extras(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED:
                if value in (None, {}, [], ""):
                    continue  # an explicit "nothing" asks for nothing
                raise ValidationFailed(REFUSED[name], field=name)
            accepted = ", ".join(n for n in type(self).model_fields if not n.endswith("_"))
            raise ValidationFailed(f"unknown field '{name}'; accepted fields: {accepted}", field=name)

    def _common(self) -> None:
        self._refuse_extras()
        store = getattr(self, "store", None)
        if store:
            raise ValidationFailed("stored completions ('store': true) are not supported", field="store")
        tier = getattr(self, "service_tier", None)
        if tier not in (None, "auto", "default"):
            raise ValidationFailed(f"service_tier '{tier}' is not offered; there is one tier ('auto'/'default')",
                                   field="service_tier")
        if self.stream_options is not None and not self.stream:
            raise ValidationFailed("'stream_options' is only allowed with 'stream': true", field="stream_options")

    def _domain(self, prompt: str | None, messages: list[dict[str, Any]] | None, max_tokens: int,
                **extra: Any) -> GenerateRequest:
        d = GenerateRequest()
        r: Any = self
        return GenerateRequest(
            model=r.model or None, prompt=prompt, messages=messages,
            max_tokens=r.max_tokens if r.max_tokens is not None else max_tokens,
            temperature=r.temperature if r.temperature is not None else d.temperature,
            top_p=r.top_p if r.top_p is not None else d.top_p, stop=stop_list(r.stop), seed=r.seed,
            stream=bool(r.stream), presence_penalty=r.presence_penalty or 0.0,
            frequency_penalty=r.frequency_penalty or 0.0, n=r.n or 1, sampling=sampling.picked(self), **extra)


class ChatCompletionRequest(_Request, sampling.Knobs):
    """POST /v1/chat/completions (see the module docstring for what is honoured)."""

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    user: str | None = None
    safety_identifier: str | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    store: bool | None = None
    modalities: list[Literal["text"]] | None = None
    service_tier: str | None = None
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def to_domain(self) -> GenerateRequest:
        self._common()
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs and not self.logprobs:
            raise ValidationFailed("'top_logprobs' needs 'logprobs': true", field="top_logprobs")
        fmt = self._response_format()
        tools, choice = self._tools()
        for i, m in enumerate(self.messages):
            if m.refusal is not None and m.role != "assistant":
                raise ValidationFailed(f"'messages[{i}].refusal': only an assistant message carries a refusal",
                                       field=f"messages[{i}].refusal")
        messages = chat_messages.check(domain_messages(self.messages, images=True))  # shapes, before an engine sees them
        kwargs = self.chat_template_kwargs or None
        for key in kwargs or ():
            if key in RESERVED_TEMPLATE_KEYS:
                raise ValidationFailed(f"'chat_template_kwargs.{key}' is set by the server itself; it cannot be "
                                       "replaced", field=f"chat_template_kwargs.{key}")
        return self._domain(None, messages, 256, response_format=fmt, tools=tools,
                            tool_choice=choice, parallel_tool_calls=self.parallel_tool_calls is not False,
                            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0,
                            reasoning_effort=self.reasoning_effort, chat_template_kwargs=kwargs)

    def _response_format(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            if rf is not None and rf.json_schema is not None:
                raise ValidationFailed("'response_format.json_schema' is only allowed with type 'json_schema'",
                                       field="response_format.json_schema")
            return None
        if rf.type == "json_object":
            if rf.json_schema is not None:
                raise ValidationFailed("'response_format.json_schema' is only allowed with type 'json_schema'",
                                       field="response_format.json_schema")
            return {"type": "json_object"}
        if rf.json_schema is None:
            raise ValidationFailed("response_format type 'json_schema' needs 'response_format.json_schema' "
                                   "({\"name\": ..., \"schema\": {...}})", field="response_format.json_schema")
        if rf.json_schema.schema_ is None:
            raise ValidationFailed("'response_format.json_schema.schema' is required",
                                   field="response_format.json_schema.schema")
        check_schema(rf.json_schema.schema_, "response_format.json_schema.schema")
        return {"type": "json_schema", "json_schema": rf.json_schema.model_dump(by_alias=True, exclude_none=True)}

    def _tools(self) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
        tools, choice = self.tools, self.tool_choice
        if not tools:
            if choice not in (None, "none"):
                raise ValidationFailed("'tool_choice' needs 'tools'", field="tool_choice")
            if self.parallel_tool_calls is not None:
                raise ValidationFailed("'parallel_tool_calls' needs 'tools'", field="parallel_tool_calls")
            return None, None
        names = [t.function.name for t in tools]
        if len(set(names)) != len(names):
            raise ValidationFailed("tool names must be unique", field="tools")
        for i, t in enumerate(tools):
            if t.function.parameters is not None:
                check_schema(t.function.parameters, f"tools[{i}].function.parameters")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise ValidationFailed(f"tool_choice names '{choice.function.name}', which is not in 'tools' "
                                       f"({', '.join(names)})", field="tool_choice")
            out_choice: str | dict[str, Any] | None = choice.model_dump()
        else:
            out_choice = choice or "auto"
        return [t.model_dump(exclude_none=True) for t in tools], out_choice


# The OpenAI fields it shares with ChatCompletionRequest are declared again, not inherited:
# each class is one endpoint's schema in OpenAI's own field order (which /openapi.json shows and
# the first validation error follows). `duplicates` sees the same shape (boilerplate).
class CompletionRequest(_Request, sampling.Knobs):
    """POST /v1/completions (legacy text completion)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    best_of: Choices | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    user: str | None = None
    metadata: Metadata | None = Field(None, max_length=16)
    prompt_cache_key: str | None = Field(None, max_length=1024)

    def to_domain(self) -> GenerateRequest:
        self._common()
        if self.echo:
            raise ValidationFailed("echo=true is not supported", field="echo")
        if self.suffix:
            raise ValidationFailed("'suffix' (insertion) is not supported", field="suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValidationFailed("'best_of' is not supported (only best_of equal to n)", field="best_of")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ValidationFailed("send exactly one prompt per request", field="prompt")
        if not prompts[0].strip():
            raise ValidationFailed("'prompt' is empty; send some text", field="prompt")
        # OpenAI's default max_tokens for completions is 16
        return self._domain(prompts[0], None, 16, logprobs=self.logprobs is not None,
                            top_logprobs=self.logprobs or 0)


# =========================================================================== answers
def openai_finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def tars_fields(c: Completion) -> dict[str, Any]:
    return {"node": c.node, "via": c.via, "timings": c.timings.to_dict(), "notes": c.notes, "fallback": c.fallback}


def chat_logprobs(c: Completion | Any) -> dict[str, Any] | None:
    return {"content": c.logprobs, "refusal": None} if c.logprobs is not None else None


def legacy_logprobs(entries: list[dict[str, Any]] | None, offset: int = 0) -> dict[str, Any] | None:
    """The chat shape of logprobs as /v1/completions writes them."""
    if entries is None:
        return None
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries],
            "text_offset": offsets}


def _sum_usage(cs: list[Completion]) -> dict[str, int]:
    # n choices share one prompt: OpenAI counts it once
    return usage(cs[0].usage.prompt_tokens, sum(c.usage.completion_tokens for c in cs))


def chat_completion_body(cs: list[Completion], rid: str, created: int) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(cs):
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        if c.reasoning:
            message["reasoning_content"] = c.reasoning
        if c.tool_calls:
            message["tool_calls"] = c.tool_calls
            message["content"] = c.text or None
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(c),
                        "finish_reason": "tool_calls" if c.tool_calls else openai_finish(c.finish_reason)})
    return {"id": rid, "object": "chat.completion", "created": created, "model": cs[0].model, "choices": choices,
            "usage": _sum_usage(cs), "system_fingerprint": None, **tars_fields(cs[0])}


def completion_body(cs: list[Completion], rid: str, created: int) -> dict[str, Any]:
    choices = [{"index": i, "text": c.text, "logprobs": legacy_logprobs(c.logprobs),
                "finish_reason": openai_finish(c.finish_reason)} for i, c in enumerate(cs)]
    return {"id": rid, "object": "text_completion", "created": created, "model": cs[0].model,
            "choices": choices, "usage": _sum_usage(cs), **tars_fields(cs[0])}


class ChunkEncoder:
    """Builds the ``data: ...`` SSE lines of one choice of an OpenAI stream. The envelope is
    fixed per stream, so a plain token costs one orjson call on the text alone."""

    def __init__(self, kind: Literal["chat", "completion"], model: str, rid: str, created: int,
                 index: int = 0) -> None:
        self.kind, self.index = kind, index
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = orjson.dumps({"id": rid, "object": obj, "created": created, "model": model})[:-1]
        self._head = head + b',"choices":[{"index":' + str(index).encode() + b","
        if kind == "chat":
            self._mid = b'"delta":{"content":'
            self._tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
        else:
            self._mid = b'"text":'
            self._tail = b',"logprobs":null,"finish_reason":null}]}\n\n'
        self.rid, self.created, self.model, self.obj = rid, created, model, obj
        self._offset = 0  # text offset for legacy logprobs

    def _base(self) -> dict[str, Any]:
        return {"id": self.rid, "object": self.obj, "created": self.created, "model": self.model}

    def _choice(self, choice: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({**self._base(), "choices": [{"index": self.index, **choice}]}) + b"\n\n"

    def role(self) -> bytes:
        return (b"data: " + self._head + b'"delta":{"role":"assistant","content":""},"logprobs":null,'
                b'"finish_reason":null}]}\n\n')

    def token(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> bytes:
        if logprobs is None:
            return b"data: " + self._head + self._mid + orjson.dumps(text) + self._tail
        if self.kind == "chat":
            out = self._choice({"delta": {"content": text}, "logprobs": {"content": logprobs, "refusal": None},
                                "finish_reason": None})
        else:
            out = self._choice({"text": text, "logprobs": legacy_logprobs(logprobs, self._offset),
                                "finish_reason": None})
        self._offset += len(text)
        return out

    def reasoning(self, text: str) -> bytes:
        """A piece of a thinking model's reasoning (``delta.reasoning_content``, as llama-server and DeepSeek send it)."""
        return self._choice({"delta": {"reasoning_content": text}, "logprobs": None, "finish_reason": None})

    def piece(self, item: Any) -> bytes:
        """The SSE bytes of one TokenChunk (tool calls, reasoning, text): b"" when it carries nothing."""
        if item.tool_calls:
            return self.tool_calls(item.tool_calls)
        out = self.reasoning(item.reasoning) if getattr(item, "reasoning", None) and self.kind == "chat" else b""
        if item.text or item.logprobs:
            out += self.token(item.text, item.logprobs)
        return out

    def tool_calls(self, calls: list[dict[str, Any]]) -> bytes:
        """One delta carrying whole calls (OpenAI splits the arguments over several; a
        client that joins the pieces gets the same result from one)."""
        delta = [{"index": i, **call} for i, call in enumerate(calls)]
        return self._choice({"delta": {"tool_calls": delta}, "logprobs": None, "finish_reason": None})

    def finish(self, c: Completion) -> bytes:
        reason = "tool_calls" if c.tool_calls else openai_finish(c.finish_reason)
        choice: dict[str, Any] = {"index": self.index, "logprobs": None, "finish_reason": reason}
        if self.kind == "chat":
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return b"data: " + orjson.dumps({**self._base(), "choices": [choice], **tars_fields(c)}) + b"\n\n"

    def usage(self, cs: list[Completion]) -> bytes:
        return b"data: " + orjson.dumps({**self._base(), "choices": [], "usage": _sum_usage(cs)}) + b"\n\n"
