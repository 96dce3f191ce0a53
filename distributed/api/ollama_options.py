"""Ollama's request fields that are not messages: model names, the one table of ``options``
(each Ollama option → a ``GenerateRequest`` field, a llama.cpp sampler, or a 400 with the
reason it cannot be honoured), ``keep_alive``, ``think`` and ``format``. Used by
``ollama_wire.py`` (the request models); docs/OLLAMA.md lists every option.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .. import sampling
from ..errors import ValidationFailed
from ..requests import MAX_STOPS, MaxTokens, Penalty, Temperature, TopP
from .chat_surface import check_schema

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
# The bounds are requests.py's, the same types the /v1 request models use.
_BOUNDS: dict[str, TypeAdapter[Any]] = {"temperature": TypeAdapter(Temperature), "top_p": TypeAdapter(TopP),
                                        "presence_penalty": TypeAdapter(Penalty),
                                        "frequency_penalty": TypeAdapter(Penalty)}
_MAX_TOKENS: TypeAdapter[int] = TypeAdapter(MaxTokens)


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
            self.generate["max_tokens"] = _bounded(_MAX_TOKENS, n, field, " (or -1, -2: until the context is full)")
        elif name == "seed":
            self.generate["seed"] = _int(value, field)
        else:
            self.generate[GENERATE_OPTIONS[name]] = _bounded(_BOUNDS[name], _float(value, field), field)


def _bounded(bounds: TypeAdapter[Any], value: Any, field: str, note: str = "") -> Any:
    try:
        return bounds.validate_python(value)
    except ValidationError as exc:
        msg = exc.errors(include_url=False)[0]["msg"]
        raise ValidationFailed(f"'{field}': {msg[0].lower()}{msg[1:]}{note} (got {value!r})", field=field) from None


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


# =========================================================================== think, format
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
