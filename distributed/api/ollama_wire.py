"""Ollama's API on the wire: the request models, the one table of ``options``, the
translation into the domain requests, and the answers and NDJSON chunks.

Every dialect becomes the same ``domain.GenerateRequest`` / ``EmbedRequest`` (routes:
``ollama.py``; model rows for tags/ps/show: ``ollama_models.py``). The rule of the
other dialects holds here too: a field is honoured, or refused with a 400 naming it
(docs/OLLAMA.md lists each). Errors are ``{"error": "..."}`` (``ollama_error``; registered
for every path under ``/api/`` in api/error_shapes.py).

Names: our model ids, also with Ollama's ``:latest`` tag (``model_id``). Durations are
nanoseconds, as Ollama's. Final objects also carry ``node`` (the host that computed the
answer) and ``via`` (the host that received it), which Ollama's clients ignore. A streamed answer is one JSON object a line, the last with
``"done": true`` and the counts; a failure after the first line ends it with an
``{"error": ...}`` line, which the official client raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .. import sampling
from ..domain import Completion, EmbedRequest, GenerateRequest, TokenChunk
from ..errors import TarsError, ValidationFailed
from ..requests import MAX_STOPS, MAX_TOKENS, PENALTY, TEMPERATURE, TOP_LOGPROBS, TOP_P
from . import chat_messages
from .chat_surface import Tool, check_schema

OLLAMA_VERSION = "0.12.0"  # the version of Ollama's API these routes follow (/api/version)
LATEST = ":latest"


# =========================================================================== names
def model_id(name: str | None) -> str | None:
    """Our id for an Ollama model name: ``smollm2-135m-instruct:latest`` → ``smollm2-135m-instruct``."""
    if name and name.endswith(LATEST):
        return name[: -len(LATEST)]
    return name or None


def tagged(model: str) -> str:
    """The name Ollama's listings show: the id with ``:latest`` unless it carries a tag already."""
    return model if ":" in model.rsplit("/", 1)[-1] else model + LATEST


# =========================================================================== options
# Ollama option → GenerateRequest field (num_predict: -1 and -2 mean "until the context is full").
GENERATE_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
                    "stop": "stop", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# Ollama's sampler options (top_k, min_p, typical_p, repeat_penalty, repeat_last_n, mirostat,
# mirostat_tau, mirostat_eta) carry llama.cpp's own names, and so do the rest of its samplers
# (dry_*, xtc_*, ...): every name of distributed/sampling.py goes to GenerateRequest.sampling.
_PLACED = "the cluster's planner decides it when the model loads (tars plan explains; TARS_* settings)"
# Options no request can change here, each with the reason the 400 gives.
REFUSED_OPTIONS = {
    "num_gpu": f"GPU layers are not set per request: {_PLACED}",
    "main_gpu": f"the GPU is not chosen per request: {_PLACED}",
    "num_thread": "threads are not set per request: TARS_THREADS sets them for every model",
    "num_batch": f"the batch size is not set per request: {_PLACED}",
    "use_mmap": f"memory mapping is not set per request: {_PLACED}",
    "use_mlock": f"memory locking is not set per request: {_PLACED}",
    "numa": f"NUMA placement is not set per request: {_PLACED}",
    "low_vram": f"the VRAM budget is not set per request: {_PLACED}",
    "f16_kv": "the KV cache type is not set per request",
    "vocab_only": "a vocabulary-only load is not offered",
    "logits_all": "'logits_all' is not offered; ask for 'logprobs' instead",
    "embedding_only": "'embedding_only' is not offered; embedding models are served on /api/embed",
    "draft_num_predict": "speculative decoding (a draft model) is not offered",
    "tfs_z": "tail-free sampling ('tfs_z') was removed from llama.cpp",
    "penalize_newline": "'penalize_newline' was removed from llama.cpp",
    "num_keep": "the context is never shifted here, so there are no tokens to keep ('num_keep')",
}
_BOUNDS: dict[str, dict[str, float]] = {"temperature": TEMPERATURE, "top_p": TOP_P, "presence_penalty": PENALTY,
                                        "frequency_penalty": PENALTY}


class Options:
    """``options`` of one request, checked: what goes to the GenerateRequest, the sampler
    extras, and ``num_ctx`` (checked against the model's context by the route)."""

    def __init__(self, raw: dict[str, Any] | None, *, embed: bool = False) -> None:
        self.generate: dict[str, Any] = {}
        self.samplers: dict[str, Any] = {}
        self.num_ctx: int | None = None
        samplers: dict[str, Any] = {}
        for name, value in (raw or {}).items():
            if value is None:
                continue  # an explicit null asks for nothing
            field = f"options.{name}"
            if name in REFUSED_OPTIONS:
                raise ValidationFailed(f"'{field}' cannot be honoured: {REFUSED_OPTIONS[name]}", field=field)
            if name == "num_ctx":
                self.num_ctx = _int(value, field, 1)
            elif embed:
                raise ValidationFailed(f"'{field}' does not apply to embeddings (only 'num_ctx' does)", field=field)
            elif name in GENERATE_OPTIONS:
                self._generate(name, value, field)
            elif name in sampling.NAMES:
                samplers[name] = value
            else:
                known = ", ".join(sorted([*GENERATE_OPTIONS, *sampling.NAMES, "num_ctx"]))
                raise ValidationFailed(f"unknown option '{name}'; options honoured here: {known}", field=field)
        self.samplers = sampling.check(samplers, prefix="options")

    def _generate(self, name: str, value: Any, field: str) -> None:
        if name == "stop":
            self.generate["stop"] = stops(value, field)
        elif name == "num_predict":
            n = _int(value, field)
            if n in (-1, -2):
                return  # "until the context is full": the default the route sets
            if not MAX_TOKENS["ge"] <= n <= MAX_TOKENS["le"]:
                raise ValidationFailed(f"'{field}' must be -1, -2 or {MAX_TOKENS['ge']}..{MAX_TOKENS['le']} "
                                       f"(got {n})", field=field)
            self.generate["max_tokens"] = n
        elif name == "seed":
            self.generate["seed"] = _int(value, field)
        else:
            number = _float(value, field)
            b = _BOUNDS[name]
            low, high = b.get("ge", b.get("gt")), b["le"]
            if not (low <= number <= high) or ("gt" in b and number == low):
                raise ValidationFailed(f"'{field}' must be in {'(' if 'gt' in b else '['}{low}, {high}] (got {number})",
                                       field=field)
            self.generate[GENERATE_OPTIONS[name]] = number


def _int(value: Any, field: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValidationFailed(f"'{field}' must be an integer (got {value!r})", field=field)
    if low is not None and value < low:
        raise ValidationFailed(f"'{field}' must be at least {low} (got {value})", field=field)
    return int(value)


def _float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationFailed(f"'{field}' must be a number (got {value!r})", field=field)
    return float(value)


def stops(value: Any, field: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValidationFailed(f"'{field}' must be a string or a list of strings", field=field)
    if len(items) > MAX_STOPS:
        raise ValidationFailed(f"'{field}' takes at most {MAX_STOPS} strings", field=field)
    return [s for s in items if s]


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_s(value: Any) -> float | None:
    """``keep_alive`` in seconds (a number of seconds or a duration like "5m", "1h30m", "-1").
    Models stay loaded until the cluster removes them, which honours every value but 0
    (unload now): that one is refused (use DELETE /api/delete or ``tars stop``)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValidationFailed("'keep_alive' must be a duration such as \"5m\" or a number of seconds",
                               field="keep_alive")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        parts = re.findall(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", str(value))
        whole = _DURATION.match(str(value))
        if whole is not None and whole.group(2) is None:
            seconds = float(whole.group(1))
        elif parts and "".join(a + b for a, b in parts) == str(value).strip():
            seconds = sum(float(a) * _UNIT_S[b] for a, b in parts)
        else:
            raise ValidationFailed(f"'keep_alive' is not a duration: {value!r} (e.g. \"5m\", \"1h\", -1)",
                                   field="keep_alive")
    if seconds == 0:
        raise ValidationFailed("'keep_alive': 0 (unload now) is not honoured: models stay loaded as the cluster "
                               "placed them; remove one with DELETE /api/delete or `tars stop`", field="keep_alive")
    return seconds


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
    top_logprobs: int | None = Field(None, **TOP_LOGPROBS)
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


_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"}


def thinking(think: bool | str | None) -> dict[str, Any]:
    """``think`` → the chat template's switches (as the other dialects set them): false turns
    thinking off (``reasoning_effort`` "none"), true turns it on (``enable_thinking``), a level
    is the template's ``reasoning_effort``. A model without a thinking mode ignores them."""
    if think is None:
        return {}
    if think is False:
        return {"reasoning_effort": "none"}
    if think is True:
        return {"chat_template_kwargs": {"enable_thinking": True}}
    return {"chat_template_kwargs": {"enable_thinking": True}, "reasoning_effort": _EFFORTS[think]}


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``format``: "json" → JSON mode, a JSON schema → structured output (the /v1 machinery)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, str):
        raise ValidationFailed(f"'format' must be \"json\" or a JSON schema object (got {fmt!r})", field="format")
    check_schema(fmt, "format")
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}


class ChatRequest(_Generating):
    """POST /api/chat."""

    messages: list[Message] = Field(default_factory=list)
    tools: list[Tool] | None = None

    def images_at(self) -> str | None:
        """The field of the first image sent, if any."""
        return next((f"messages[{i}].images" for i, m in enumerate(self.messages) if m.images), None)

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

    def images_at(self) -> str | None:
        return "images" if self.images else None

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
            if self.system:
                raise ValidationFailed("'system' has no place in a raw prompt: put it in 'prompt' or drop 'raw'",
                                       field="system")
            return _request(fields, opts, prompt=self.prompt), opts
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return _request(fields, opts, messages=[*messages, {"role": "user", "content": self.prompt}]), opts


def _request(fields: dict[str, Any], opts: Options, **more: Any) -> GenerateRequest:
    return GenerateRequest(**fields, **more, sampling=opts.samplers)


def domain_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Ollama messages → the domain's (OpenAI's) messages: tool calls get ids and JSON-text
    arguments; a tool answer names the call it answers (its ``tool_call_id``, else the
    earliest unanswered call of its ``tool_name``, else the earliest unanswered call)."""
    out: list[dict[str, Any]] = []
    open_calls: list[tuple[str, str]] = []  # (id, name) of calls not answered yet
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
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
    """/api/show, /api/delete: a model name (``name`` is the older spelling)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def id(self) -> str:
        name = self.model or self.name
        if not name:
            raise ValidationFailed("field 'model' is required", field="model")
        return model_id(name) or name


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


# =========================================================================== answers
def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def done_reason(c: Completion) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def stats(c: Completion, total_ns: int) -> dict[str, int]:
    """Ollama's counts and durations (ns) of one answer. eval_count / eval_duration is the
    decode rate the computing host measured."""
    t = c.timings
    evals = c.usage.completion_tokens
    prompt_ns = int(t.ttft_ms * 1e6)
    if t.tokens_per_s > 0 and evals:
        eval_ns = int(evals / t.tokens_per_s * 1e9)
    else:
        eval_ns = max(0, int((t.total_ms - t.ttft_ms) * 1e6))
    return {"total_duration": max(total_ns, prompt_ns + eval_ns), "load_duration": 0,
            "prompt_eval_count": c.usage.prompt_tokens, "prompt_eval_duration": prompt_ns,
            "eval_count": evals, "eval_duration": eval_ns}


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's calls (arguments as JSON text) → Ollama's (arguments as an object). Text that
    is not a JSON object is kept under ``"_raw"`` (the client's model needs an object)."""
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        text = fn.get("arguments") or ""
        try:
            args = orjson.loads(text) if text.strip() else {}
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):
            args = {"_raw": text}
        out.append({"id": call.get("id") or f"call_{i}", "function": {"index": i, "name": fn.get("name", ""),
                                                                     "arguments": args}})
    return out


def chat_body(name: str, c: Completion, total_ns: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    if c.reasoning:
        message["thinking"] = c.reasoning
    if c.tool_calls:
        message["tool_calls"] = tool_calls(c.tool_calls)
    return _final({"model": name, "created_at": timestamp(), "message": message}, c, total_ns)


def generate_body(name: str, c: Completion, total_ns: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "created_at": timestamp(), "response": c.text}
    if c.reasoning:
        out["thinking"] = c.reasoning
    return _final(out, c, total_ns)


def _final(out: dict[str, Any], c: Completion, total_ns: int) -> dict[str, Any]:
    out.update(done=True, done_reason=done_reason(c), **stats(c, total_ns), node=c.node, via=c.via)
    if c.logprobs is not None:
        out["logprobs"] = c.logprobs
    if c.notes:  # e.g. the tools dropped, max_tokens clamped: clients ignore it, people read it
        out["notes"] = c.notes
    return out


def loaded_body(name: str, chat: bool) -> dict[str, Any]:
    """The answer to a request with nothing to generate (Ollama: load the model)."""
    head: dict[str, Any] = {"model": name, "created_at": timestamp()}
    body = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return {**head, **body, "done": True, "done_reason": "load"}


class Chunks:
    """One answer streamed as NDJSON (``streams.drain`` runs the loop): a line per piece,
    then the ``done`` line with the counts; a failure ends it with an ``error`` line."""

    def __init__(self, name: str, chat: bool, t0_ns: int, clock: Callable[[], int],
                 on_done: Callable[[Completion], None] | None = None) -> None:
        self.chat, self.t0, self.clock, self.on_done = chat, t0_ns, clock, on_done
        self.name = name
        head = b'{"model":' + orjson.dumps(name) + b',"created_at":"'
        self._head = head
        self._mid = b'","message":{"role":"assistant","content":' if chat else b'","response":'
        self._tail = b'},"done":false}\n' if chat else b',"done":false}\n'

    def start(self) -> bytes | None:
        return None

    def token(self, chunk: TokenChunk) -> bytes:
        if chunk.tool_calls:
            return self._line({"role": "assistant", "content": "", "tool_calls": tool_calls(chunk.tool_calls)})
        if chunk.reasoning:  # a thinking model's reasoning, apart from its answer
            if self.chat:
                return self._line({"role": "assistant", "content": "", "thinking": chunk.reasoning})
            return self._line("", thinking=chunk.reasoning)
        if chunk.logprobs:
            piece = {"role": "assistant", "content": chunk.text} if self.chat else chunk.text
            return self._line(piece, logprobs=chunk.logprobs)
        if not chunk.text:
            return b""
        return self._head + timestamp().encode() + self._mid + orjson.dumps(chunk.text) + self._tail

    def _line(self, piece: Any, **more: Any) -> bytes:
        key = "message" if self.chat else "response"
        return orjson.dumps({"model": self.name, "created_at": timestamp(), key: piece, "done": False, **more}) + b"\n"

    def done(self, c: Completion) -> bytes:
        c.text = ""  # streamed already: the done line carries the counts
        c.tool_calls = None  # sent in their own line
        c.logprobs = None
        c.reasoning = None
        if self.on_done is not None:
            self.on_done(c)  # e.g. a note that the tools were dropped
        body = chat_body(self.name, c, self.clock() - self.t0) if self.chat else \
            generate_body(self.name, c, self.clock() - self.t0)
        return orjson.dumps(body) + b"\n"

    def error(self, exc: TarsError | None) -> bytes:
        return error_json(exc or TarsError("internal error during generation; see the node's log")) + b"\n"


def ollama_error(exc: TarsError, node: str | None = None) -> dict[str, Any]:
    """Ollama's error shape: ``{"error": "<message>"}`` (api/error_shapes.py uses it for ``/api/*``)."""
    return {"error": exc.message}


def error_json(exc: TarsError) -> bytes:
    return orjson.dumps(ollama_error(exc))
