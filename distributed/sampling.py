"""llama.cpp's sampler extras: the one owner of their names, types and bounds.

OpenAI's API stops at ``temperature``, ``top_p`` and the two penalties (those stay plain
``GenerateRequest`` fields). llama-server honours many more samplers, and clients send
them — Open WebUI's advanced parameters, LibreChat, SillyTavern, Ollama's ``options``.
Here is each one that reaches the engine, under llama-server's own request name (its
``tools/server/server-schema.cpp``), with its type and the bounds we hold it to.

One request carries them as ``GenerateRequest.sampling`` — ``{name: value}`` of the knobs
the client set, nothing else (absent = the engine's default). They cross hosts as that
plain dict (``requests.GenerateParams`` checks it again), ``engine/wire.py`` hands them to
llama-server as-is, the in-process engine (llama-cpp-python) honours those listed in
``INPROCESS`` and refuses the rest by name, the fake engine refuses them all.

API::

    check(values, prefix="") -> dict        # validated copy; ValidationFailed naming the field
    NAMES                                    # every knob name
    INPROCESS: {name: llama-cpp-python keyword}   # what the in-process engine can honour
    Knobs                                    # the pydantic fields (a REST request model inherits them)

Bounds: where llama-server clamps a value silently (``top_k`` < 0, ``min_p`` > 1,
``mirostat`` 3) or replaces it (``dry_base`` < 1), we refuse it with a 400 naming the field
instead, so a client learns the value did not do what it asked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from .errors import ValidationFailed

COUNT = 1 << 20  # upper bound of the token counts (a context is never this long)

# llama.cpp's sampler names (common/sampling.cpp common_sampler_types_from_names): the
# canonical ones, their kebab-case and no-underscore spellings, and three aliases.
_CANONICAL = ("dry", "top_k", "top_p", "top_n_sigma", "typ_p", "min_p", "temperature", "xtc", "infill",
              "penalties", "adaptive_p")
SAMPLER_NAMES = frozenset(
    {*_CANONICAL, *(n.replace("_", "-") for n in _CANONICAL), *(n.replace("_", "") for n in _CANONICAL),
     "nucleus", "temp", "typ"})
SAMPLER_CHARS = frozenset("dkypsmtxiea")  # common_sampler_type_to_chr, one per sampler


# A table of fields, each a type with llama.cpp's bounds and a description: `duplicates` sees
# one shape repeated (boilerplate), which is what a schema is; no logic repeats.
class Knobs(BaseModel):
    """The sampler extras as optional fields (``None`` = not set: the engine's default).
    Descriptions give llama.cpp's default."""

    top_k: Annotated[int, Field(ge=0, le=COUNT)] | None = Field(
        None, description="Keep the K most probable tokens (0 = off). llama.cpp default 40.")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="Drop tokens below min_p × the top token's probability (0 = off). Default 0.05.")
    typical_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="Locally typical sampling (1 = off). Default 1.")
    repeat_penalty: Annotated[float, Field(gt=0.0, le=100.0)] | None = Field(
        None, description="Penalise repeated tokens (1 = off). Default 1.")
    repeat_last_n: Annotated[int, Field(ge=0, le=COUNT)] | None = Field(
        None, description="Tokens the repetition penalties look back over (0 = off). Default 64.")
    dry_multiplier: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="DRY repetition penalty multiplier (0 = off). Default 0.")
    dry_base: Annotated[float, Field(ge=1.0, le=100.0)] | None = Field(
        None, description="DRY penalty base (≥ 1). Default 1.75.")
    dry_allowed_length: Annotated[int, Field(ge=0, le=COUNT)] | None = Field(
        None, description="Repetitions longer than this are penalised by DRY. Default 2.")
    dry_penalty_last_n: Annotated[int, Field(ge=0, le=COUNT)] | None = Field(
        None, description="Tokens DRY scans for repetitions (0 = off). Default 64.")
    dry_sequence_breakers: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                                     Field(min_length=1, max_length=64)] | None = Field(
        None, description="Strings that end a DRY repetition. Default [\"\\n\", \":\", \"\\\"\", \"*\"].")
    xtc_probability: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="Chance that XTC removes the top tokens (0 = off). Default 0.")
    xtc_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="XTC removes tokens above this probability (> 0.5 = off). Default 0.1.")
    mirostat: Annotated[int, Field(ge=0, le=2)] | None = Field(
        None, description="Mirostat sampling: 0 off, 1 Mirostat, 2 Mirostat 2.0. Default 0.")
    mirostat_tau: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="Mirostat target entropy. Default 5.")
    mirostat_eta: Annotated[float, Field(ge=0.0, le=10.0)] | None = Field(
        None, description="Mirostat learning rate. Default 0.1.")
    top_n_sigma: Annotated[float, Field(ge=-1.0, le=100.0)] | None = Field(
        None, description="Keep tokens within n standard deviations of the top logit (-1 = off). Default -1.")
    dynatemp_range: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="Dynamic temperature: temperature ± this range (0 = off). Default 0.")
    dynatemp_exponent: Annotated[float, Field(ge=0.0, le=100.0)] | None = Field(
        None, description="Dynamic temperature exponent. Default 1.")
    adaptive_target: Annotated[float, Field(ge=-1.0, le=1.0)] | None = Field(
        None, description="Adaptive-p: pick tokens near this probability (negative = off). Default -1.")
    adaptive_decay: Annotated[float, Field(ge=0.0, le=0.99)] | None = Field(
        None, description="Adaptive-p decay. Default 0.9.")
    min_keep: Annotated[int, Field(ge=0, le=COUNT)] | None = Field(
        None, description="Samplers keep at least this many tokens (0 = off). Default 0.")
    ignore_eos: bool | None = Field(
        None, description="Keep generating past the end-of-sequence token (up to max_tokens). Default false.")
    samplers: list[str] | str | None = Field(
        None, description="The sampler chain in order: names (top_k, typ_p, top_p, min_p, temperature, dry, "
                          "xtc, penalties, top_n_sigma, adaptive_p, infill) or a string of their letters "
                          "(dkypsmtxiea).")

    @field_validator("samplers")
    @classmethod
    def _known_samplers(cls, value: Any) -> Any:
        if isinstance(value, str):
            bad = sorted({c for c in value if c not in SAMPLER_CHARS})
            if not value or bad:
                raise ValueError(f"a string of sampler letters ({''.join(sorted(SAMPLER_CHARS))}); "
                                 f"got {value!r}")
            return value
        if value is not None:
            if not value or len(value) > 32:
                raise ValueError("a list of 1 to 32 sampler names")
            for name in value:
                if name.lower() not in SAMPLER_NAMES:
                    raise ValueError(f"a list of sampler names ({', '.join(_CANONICAL)}); "
                                     f"'{name}' is not one")
        return value


NAMES: frozenset[str] = frozenset(Knobs.model_fields)

# What llama-cpp-python's sampler chain (Llama.create_completion / Llama.generate) takes:
# knob → its keyword. ``repeat_last_n`` is the model's ``last_n_tokens_size`` (set per
# request, the in-process engine runs one request at a time). The rest (DRY, XTC,
# top-n-sigma, dynamic temperature, adaptive-p, min_keep, ignore_eos, a sampler order)
# it does not offer: the in-process engine refuses them by name.
INPROCESS: dict[str, str] = {"top_k": "top_k", "min_p": "min_p", "typical_p": "typical_p",
                             "repeat_penalty": "repeat_penalty", "repeat_last_n": "last_n_tokens_size",
                             "mirostat": "mirostat_mode", "mirostat_tau": "mirostat_tau",
                             "mirostat_eta": "mirostat_eta"}


def _where(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part) in ("list[str]", "str") or "[" in str(part) or str(part).startswith("constrained"):
            continue  # union branch names pydantic adds
        else:
            out += f".{part}" if out else str(part)
    return out


def check(values: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """A validated copy of ``values`` (``None`` values dropped: null asks for the default).
    An unknown name, a wrong type or a value out of bounds → ``ValidationFailed`` naming
    the field (``prefix`` + name, e.g. ``options.top_k`` for Ollama's options)."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValidationFailed("the sampler settings must be an object of named values", field=prefix or "sampling")
    for name in values:
        if name not in NAMES:
            where = f"{prefix}.{name}" if prefix else str(name)
            raise ValidationFailed(f"unknown sampler setting '{name}'; known: {', '.join(sorted(NAMES))}",
                                   field=where)
    try:
        knobs = Knobs.model_validate(dict(values))
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_context=False)[0]
        field = _where(prefix, tuple(first["loc"]))
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        msg = first["msg"].removeprefix("Value error, ")
        raise ValidationFailed(f"'{field}': {msg[0].lower()}{msg[1:]} (got {shown})", field=field) from None
    return knobs.model_dump(exclude_none=True)


def picked(model: BaseModel) -> dict[str, Any]:
    """The knobs a request model that inherits ``Knobs`` has set (validated by pydantic already)."""
    return {name: value for name in NAMES if (value := getattr(model, name, None)) is not None}
