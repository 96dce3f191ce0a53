"""One set of request rules, shared by the REST schemas (``api/schemas.py``) and the
``/rpc`` methods (``rpc/server.py``): the bounds of every generation knob, and the
pydantic models of the ``/rpc`` parameters.

A request that REST refuses with 400 naming the field is refused over ``/rpc`` with
-32602 naming the same parameter (``ValidationFailed`` in both cases; ``parse_params``
turns pydantic's error into it). ``/rpc`` models are strict (a JSON ``true`` is not an
integer, ``"ten"`` is not a number) and refuse unknown parameters, except the membership
methods, which ignore them so hosts of different versions still join and beat.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .domain import EmbedRequest, GenerateRequest
from .errors import ValidationFailed
from .sampling import check as check_sampling

M = TypeVar("M", bound=BaseModel)

# --------------------------------------------------------------------------- the bounds
# One definition per knob, as a type: ``/rpc`` uses ``MaxTokens``; REST (api/schemas.py,
# api/chat_surface.py) ``MaxTokens | None = None``, so both refuse the same values.
MAX_STOPS = 8
MAX_CHOICES = 16  # n
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")  # OpenAI's reasoning_effort values
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

MaxTokens = Annotated[int, Field(ge=1, le=131072, description="Most tokens to generate (clamped to the context).")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
Choices = Annotated[int, Field(ge=1, le=MAX_CHOICES)]  # n (and best_of): completions per request

_DEFAULT = GenerateRequest()
_GENERATE_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerateRequest))


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    """Membership methods: unknown params (a newer peer's) are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


# --------------------------------------------------------------------------- /rpc methods
class GenerateParams(_Strict):
    """``inference.generate`` / ``inference.stream``: a ``domain.GenerateRequest`` on the wire."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: MaxTokens = _DEFAULT.max_tokens
    temperature: Temperature = _DEFAULT.temperature
    top_p: TopP = _DEFAULT.top_p
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    seed: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: TopLogprobs = 0
    n: Choices = 1
    choice: int = Field(0, ge=0, lt=MAX_CHOICES)
    sampling: dict[str, Any] = Field(default_factory=dict)
    reasoning_effort: ReasoningEffort | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling(cls, value: Any) -> Any:
        # raises ValidationFailed naming "sampling.<knob>" (passes through pydantic as is)
        return check_sampling(value, prefix="sampling")

    def to_domain(self, stream: bool) -> GenerateRequest:
        known = _GENERATE_FIELDS  # a test keeps the two in step; this keeps a partial upgrade working
        return GenerateRequest(**{k: v for k, v in self.model_dump().items() if k in known}, stream=stream)


class EmbedParams(_Strict):
    """``embed.encode``. ``groups``: sizes of the coalesced requests (summing to len(input))."""

    input: list[str] = Field(min_length=1)
    model: str | None = None
    normalize: bool = True
    encoding: Literal["float", "base64"] = "float"
    groups: list[Annotated[int, Field(ge=1)]] | None = Field(None, min_length=1)

    def to_domain(self) -> EmbedRequest:
        return EmbedRequest(model=self.model, input=self.input, normalize=self.normalize)


class ModelsListParams(_Strict):
    local: bool = False


class JoinParams(_Lenient):
    name: str
    url: str
    profile: dict[str, Any]
    role: str = "worker"
    version: str = ""
    models: list[dict[str, Any]] = Field(default_factory=list)
    fingerprint: str = ""  # SHA-256 of its TLS certificate when it serves https (tls.py pins it)
    gpus: list[dict[str, Any]] | None = None  # its live GPU figures (checked against the profile's claims)
    llama_cpp: str = ""  # its llama.cpp (the llama-cpp-python release): a split needs one version on both hosts
    ctl: dict[str, Any] | None = None  # the control plane's signed envelope (cluster_state.py)


class HeartbeatParams(_Lenient):
    name: str
    url: str = ""
    models: list[dict[str, Any]] = Field(default_factory=list)
    plan_id: str = ""
    sent_at: float = 0.0
    # the sender's live figures (optional: an older peer sends none)
    gpus: list[dict[str, Any]] | None = None
    totals: dict[str, Any] | None = None
    ram: dict[str, Any] | None = None
    ctl: dict[str, Any] | None = None  # the control plane's signed envelope (cluster_state.py)


class LeaveParams(_Lenient):
    name: str


class NoParams(_Strict):
    pass


# --------------------------------------------------------------------------- parsing
def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "dict[str,any]", "function-after", "constrained-int") or "[" in str(part):
            continue  # union branch names pydantic adds to the location
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_params(model: type[M], method: str, params: Any) -> M:
    """Validate JSON-RPC ``params`` (an object, or absent) as ``model``, or raise
    ValidationFailed (-32602) naming the parameter and what it must be."""
    if isinstance(params, list):
        if params:
            raise ValidationFailed(f"{method}: params must be an object of named parameters "
                                   f"({', '.join(model.model_fields) or 'none'}), not an array", field="params")
        params = {}
    try:
        return model.model_validate(params or {})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False)[0]
        field = _where(first["loc"]) or "params"
        if first["type"] == "missing":
            msg = f"{method}: missing required parameter '{field}'"
        elif first["type"] == "extra_forbidden":
            msg = f"{method}: unknown parameter '{field}'; accepted: {', '.join(model.model_fields) or 'none'}"
        else:
            got = first.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
            msg = f"{method}: parameter '{field}': {first['msg'][0].lower()}{first['msg'][1:]} (got {shown})"
        raise ValidationFailed(msg, field=field) from None
