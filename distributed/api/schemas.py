"""Every wire shape of the HTTP API, in one module.

Requests are pydantic models parsed straight from the body bytes
(``model_validate_json``: one pass, no intermediate dict), then turned into the
domain dataclasses the node understands. Responses on the hot paths are built
as plain dicts / bytes by the ``*_body`` functions here and serialised with
orjson (the pydantic response models document the same shapes and let tests
check them). Native errors: ``{"error": {"type", "message", "details"}}``;
OpenAI errors: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any, Literal, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..domain import Completion, EmbedRequest, Embeddings, GenerateRequest
from ..errors import TarsError, ValidationFailed
from ..requests import MAX_STOPS, MaxTokens, Temperature, TopP

M = TypeVar("M", bound=BaseModel)
NUMPY = orjson.OPT_SERIALIZE_NUMPY


# =========================================================================== parsing
def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "bool", "float", "dict") or "[" in part or "(" in part or part[:1].isupper():
            continue  # union branch names pydantic adds to the location (str, list[str], literal[..], a model)
        else:
            out += ("." if out else "") + str(part)
    return out


def parse(model: type[M], body: bytes) -> M:
    """Validate ``body`` as ``model`` or raise ValidationFailed naming the field."""
    if not body:
        raise ValidationFailed("the request body is empty; send a JSON object", field="body")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        first = errors[0]
        kind = first["type"]
        field = _loc(first["loc"])
        if kind == "json_invalid":
            raise ValidationFailed(f"the request body is not valid JSON: {first['msg']}", field="body") from None
        if kind == "model_type" and not first["loc"]:
            raise ValidationFailed("the request body must be a JSON object", field="body") from None
        if kind == "missing":
            msg = f"field '{field}' is required"
        elif kind == "extra_forbidden":
            accepted = ", ".join(model.model_fields)
            msg = (f"unknown field '{field}'; accepted fields: {accepted}" if len(first["loc"]) == 1
                   else f"unknown field '{field}'")
        else:
            got = first.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            msg = f"field '{field}': {first['msg'][0].lower()}{first['msg'][1:]} (got {shown})"
        problems = [{"field": _loc(e["loc"]), "message": e["msg"]} for e in errors[:10]]
        raise ValidationFailed(msg, field=field, problems=problems) from None


# =========================================================================== requests
class _Native(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _OpenAI(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send many optional knobs we do not use


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    refusal: str | None = None  # an assistant turn's refusal text (used as its content when that is empty)

    def text(self, index: int, images: bool = False) -> str | list[dict[str, Any]]:
        """The content as text (text parts joined); with ``images``, a user message's content
        that has ``image_url`` parts stays a list of parts (checked by vision.py)."""
        c = self.content
        if c is None:
            return ""
        if isinstance(c, str):
            return c
        if images and self.role == "user" and any(p.get("type") == "image_url" for p in c):
            return c
        parts = []
        for j, part in enumerate(c):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                what = "text parts ({\"type\": \"text\", \"text\": ...}) and, on user messages, image_url parts" \
                    if images else "text parts ({\"type\": \"text\", \"text\": ...})"
                raise ValidationFailed(f"messages[{index}].content[{j}]: only {what} are supported",
                                       field=f"messages[{index}].content[{j}]")
            parts.append(part["text"])
        return "".join(parts)


def domain_messages(messages: list[ChatMessage], images: bool = False) -> list[dict[str, Any]]:
    """The request's messages as domain dicts (400 naming what is empty or unsupported).
    ``images``: user messages may keep ``image_url`` parts (/v1/chat/completions)."""
    if not messages:
        raise ValidationFailed("'messages' is empty; send at least one message", field="messages")
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                               "content": m.text(i, images) or (m.refusal or "")}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(m, key)
            if value is not None:
                msg[key] = value
        out.append(msg)
    if not any((isinstance(m["content"], list) and m["content"]) or m["content"].strip() or m.get("tool_calls")
               for m in out):
        raise ValidationFailed("every message in 'messages' is empty", field="messages")
    return out


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as a list (400 past ``MAX_STOPS``); empty strings dropped."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise ValidationFailed(f"'stop' takes at most {MAX_STOPS} strings", field="stop")
    return [s for s in stops if s]


# The bounds are the types of distributed/requests.py: /rpc enforces the same ones (-32602 where REST says 400).


class InferenceRequest(_Native):
    """POST /inference."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def to_domain(self) -> GenerateRequest:
        if self.prompt is not None and self.messages is not None:
            raise ValidationFailed("send either 'prompt' or 'messages', not both", field="prompt")
        if self.messages is not None:
            messages, prompt = domain_messages(self.messages), None
        elif self.prompt is None:
            raise ValidationFailed("field 'prompt' (or 'messages') is required", field="prompt")
        elif not self.prompt.strip():
            raise ValidationFailed("'prompt' is empty; send some text", field="prompt")
        else:
            messages, prompt = None, self.prompt
        return _generate(self, prompt, messages, 256)


def _generate(r: Any, prompt: str | None, messages: list[dict[str, Any]] | None, max_tokens: int) -> GenerateRequest:
    d = GenerateRequest()
    return GenerateRequest(model=r.model or None, prompt=prompt, messages=messages,
                           max_tokens=r.max_tokens if r.max_tokens is not None else max_tokens,
                           temperature=r.temperature if r.temperature is not None else d.temperature,
                           top_p=r.top_p if r.top_p is not None else d.top_p,
                           stop=stop_list(r.stop), seed=r.seed, stream=r.stream)


class EmbedBody(_Native):
    """POST /embed."""

    model: str | None = None
    input: str | list[str]
    normalize: bool = True

    def to_domain(self, max_inputs: int = 0) -> EmbedRequest:
        return EmbedRequest(model=self.model or None, input=_inputs(self.input, max_inputs), normalize=self.normalize)


def _inputs(value: Any, max_inputs: int = 0) -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise ValidationFailed("'input' is empty; send a string or a non-empty list of strings", field="input")
    if max_inputs and len(texts) > max_inputs:
        raise ValidationFailed(f"'input' has {len(texts)} texts; this node embeds at most {max_inputs} per request "
                               "(TARS_EMBED_MAX_INPUTS): split it", field="input", limit=max_inputs, got=len(texts))
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValidationFailed(f"input[{i}] is not a string: token-id input is not supported, send text",
                                   field=f"input[{i}]")
        if not t.strip():
            raise ValidationFailed("'input' is empty" if isinstance(value, str) else f"input[{i}] is empty",
                                   field="input" if isinstance(value, str) else f"input[{i}]")
    return texts


class EmbeddingsRequest(_OpenAI):
    """POST /v1/embeddings."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    def to_domain(self, max_inputs: int = 0) -> EmbedRequest:
        return EmbedRequest(model=self.model or None, input=_inputs(self.input, max_inputs), normalize=True)


# =========================================================================== responses
class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TimingsBody(BaseModel):
    ttft_ms: float = 0.0
    total_ms: float
    tokens_per_s: float = 0.0


class InferenceResponse(BaseModel):
    model: str
    node: str
    via: str
    text: str
    finish_reason: str
    usage: UsageBody
    timings: TimingsBody
    fallback: bool = False
    notes: list[str] = []


class EmbedResponse(BaseModel):
    model: str
    node: str
    via: str
    dim: int
    embeddings: list[list[float]]
    usage: UsageBody
    timings: TimingsBody


class ErrorDetail(BaseModel):
    type: str
    message: str
    details: dict[str, Any] = {}


class ErrorResponse(BaseModel):
    error: ErrorDetail
    node: str
    via: str


def usage(prompt: int, completion: int = 0) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def inference_body(c: Completion) -> dict[str, Any]:
    return {"model": c.model, "node": c.node, "via": c.via, "text": c.text, "finish_reason": c.finish_reason,
            "usage": usage(c.usage.prompt_tokens, c.usage.completion_tokens), "timings": c.timings.to_dict(),
            "fallback": c.fallback, "notes": c.notes}


def embed_json(e: Embeddings) -> bytes:
    vectors = e.vectors if isinstance(e.vectors, np.ndarray) else np.asarray(e.vectors, dtype=np.float32)
    return orjson.dumps({"model": e.model, "node": e.node, "via": e.via, "dim": int(vectors.shape[1]),
                         "embeddings": vectors, "usage": usage(e.prompt_tokens), "timings": e.timings.to_dict(),
                         "fallback": e.fallback}, option=NUMPY)


# --------------------------------------------------------------------------- OpenAI
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def embeddings_json(e: Embeddings, encoding_format: str) -> bytes:
    vectors = e.vectors if isinstance(e.vectors, np.ndarray) else np.asarray(e.vectors, dtype=np.float32)
    if encoding_format == "base64":
        v = vectors.astype("<f4", copy=False)
        data: list[dict[str, Any]] = [{"object": "embedding", "index": i,
                                       "embedding": base64.b64encode(v[i].tobytes()).decode("ascii")}
                                      for i in range(v.shape[0])]
    else:
        data = [{"object": "embedding", "index": i, "embedding": vectors[i]} for i in range(vectors.shape[0])]
    return orjson.dumps({"object": "list", "data": data, "model": e.model, "usage": usage(e.prompt_tokens),
                         "node": e.node, "via": e.via}, option=NUMPY)


def models_list_body(models: list[dict[str, Any]], node: str) -> dict[str, Any]:
    return {"object": "list", "node": node, "via": node,
            "data": [{"id": m["id"], "object": "model", "created": 0, "owned_by": m.get("node", node),
                      "kind": m.get("kind"), "state": m.get("state"), "vision": bool(m.get("vision"))}
                     for m in models]}


# --------------------------------------------------------------------------- errors
def native_error(exc: TarsError, node: str) -> dict[str, Any]:
    return {"error": {"type": exc.kind, "message": exc.message, "details": exc.details}, "node": node, "via": node}


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def openai_error(exc: TarsError, node: str) -> dict[str, Any]:
    param = exc.details.get("field")
    if param is None and exc.kind == "model_not_found":
        param = "model"
    return {"error": {"message": exc.message, "type": _OPENAI_TYPES.get(exc.http_status, "server_error"),
                      "param": param, "code": exc.kind}, "node": node, "via": node}


def error_json(exc: TarsError, node: str, openai: bool) -> bytes:
    return orjson.dumps(openai_error(exc, node) if openai else native_error(exc, node), default=str)


def now() -> int:
    return int(time.time())
