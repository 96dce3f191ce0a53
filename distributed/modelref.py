"""Model references: any name a user gives a model, resolved once into a ``ModelSpec``.

A name is a catalog id (``qwen2.5-7b-instruct``) or a hub reference::

    hf.co/ORG/REPO[:QUANT]    huggingface.co/ORG/REPO[:QUANT]    ORG/REPO:QUANT

``resolve(name, catalog)`` is the one place a name becomes a spec; everything downstream
(planner, store, engine, API) sees the spec. For a reference:

1. known already (``refs.json`` under ``TARS_MODELS_DIR``, or learned from a plan) → that
   spec, no network;
2. else the hub: the repo's commit and file list; the GGUF of the quant asked for
   (case-insensitive), or without one Q4_K_M, failing that the nearest smaller quant (the
   nearest bigger when there is none smaller); the shards of a split GGUF together; an
   ``mmproj-*.gguf`` beside it as the vision projector;
3. the header of that GGUF read by ranged requests (``gguf_header.read_header``, bounded,
   cached on disk as JSON) gives the size, layers, KV heads, head size, trained context
   and parameter count: a spec whose ``id`` is the reference as given, pinned to the
   commit (``revision``), remembered by the catalog.

Errors name the reference: a repo that does not exist → ``RefNotFound`` (404) with the hub's
reason; gated → ``ModelGated`` (403) with the hub's reason; a quant it does not have →
``RefNotFound`` listing the quants it has; no hub → ``DownloadFailed`` (502).

Other modules call ``resolve`` / ``resolve_async`` (the Ollama ``/api/pull`` adapter too),
``is_ref``, ``check_name`` (a deploy's checks before it is forwarded), ``carry(plan, specs,
chat_templates)`` (what a plan carries to other hosts: ``plan_specs``, taken there with
``Catalog.learn``, and each deploy's chat template) and ``with_template``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import hub as hubio
from . import templates
from .domain import ModelSpec, Plan
from .errors import ConfigError, DownloadFailed, ModelGated, ModelNotFound, RefNotFound, TarsError, ValidationFailed
from .gguf_header import GGUFMeta, is_projector, merge_shards, numbers, read_gguf, read_header, shard_names
from .logs import fields, get_logger
from .optional import require

log = get_logger(__name__)

_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "http://hf.co/",
             "huggingface.co/", "hf.co/")
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_REPO = re.compile(rf"^{_PART}/{_PART}$")
_QUANT_ASKED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Za-z0-9]+)*|BF16|F16|FP16|F32|FP32|MXFP4(?:_MOE)?|"
                            r"TQ[12]_0)(?![A-Za-z0-9])", re.IGNORECASE)
DEFAULT_QUANT = "Q4_K_M"
# bits per weight, roughly: the order "nearest smaller quant" follows
QUANT_BITS = {
    "F32": 32, "FP32": 32, "BF16": 16, "F16": 16, "FP16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0,
    "Q5_K_M": 5.69, "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.85, "MXFP4": 4.25, "MXFP4_MOE": 4.25,
    "Q4_K_S": 4.58, "Q4_0": 4.5, "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66,
    "Q3_K_S": 3.5, "IQ3_S": 3.44, "IQ3_XS": 3.3, "IQ3_XXS": 3.06, "Q2_K": 2.96, "Q2_K_S": 2.6, "IQ2_M": 2.7,
    "IQ2_S": 2.5, "IQ2_XS": 2.31, "IQ2_XXS": 2.06, "TQ2_0": 2.06, "IQ1_M": 1.75, "TQ1_0": 1.69, "IQ1_S": 1.56,
}


@dataclass(frozen=True)
class Ref:
    """A parsed hub reference. ``text``: as given (the id the model is served under)."""

    text: str
    repo: str
    quant: str | None


def parse(text: str) -> Ref | None:
    """A hub reference, or None for a name that is not one (a catalog id). A name that looks
    like a reference but is malformed raises ValidationFailed naming the field ``model``."""
    t = text.strip() if isinstance(text, str) else ""
    low = t.lower()
    prefixed = next((p for p in _PREFIXES if low.startswith(p)), None)
    rest = t[len(prefixed):] if prefixed else t
    if "/" not in rest and not prefixed:
        return None
    repo, sep, quant = rest.partition(":")
    if not prefixed and not sep:
        return None  # ORG/REPO without a quant is not a reference (write hf.co/ORG/REPO)
    if not _REPO.match(repo) or ".." in repo:
        raise ValidationFailed(f"'{t}' is not a hub reference: the repo must be ORG/REPO (letters, digits, '.', '_', "
                               "'-'), e.g. hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", field="model")
    if sep and not _QUANT_ASKED.match(quant):
        raise ValidationFailed(f"'{t}': '{quant}' is not a quantisation name (e.g. Q4_K_M, Q8_0, IQ4_XS)",
                               field="model")
    return Ref(text=t, repo=repo, quant=quant or None)


def is_ref(name: str) -> bool:
    try:
        return parse(name) is not None
    except ValidationFailed:
        return True  # malformed, but meant as one


def check_repo_path(name: str) -> str:
    """A file path inside a repo that never leaves its folder; ValueError otherwise."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"'{name}' is not a file in a repo (a relative path without '..')")
    return name


# --------------------------------------------------------------------------- choosing the file
def quant_of(filename: str) -> str | None:
    """The quantisation a GGUF's file name states ("Qwen2.5-7B-Instruct-Q4_K_M.gguf" → "Q4_K_M")."""
    stem = Path(filename).name
    m = re.match(r"^(.*?)(?:-\d{5}-of-\d{5})?\.gguf$", stem, re.IGNORECASE)
    found = _QUANT_IN_NAME.findall(m.group(1) if m else stem)
    return found[-1].upper() if found else None


def _bits(quant: str) -> float:
    if quant in QUANT_BITS:
        return QUANT_BITS[quant]
    m = re.match(r"^I?Q(\d)", quant)
    return int(m.group(1)) + 0.5 if m else 99.0


@dataclass
class Choice:
    quant: str
    files: list[Any]  # hub.RepoEntry of each shard (one when not split), in order
    mmproj: Any = None  # hub.RepoEntry of the projector, if the repo has one


def is_projector_file(path: str) -> bool:
    return "mmproj" in Path(path).name.lower() and path.lower().endswith(".gguf")


def choose(ref: Ref, files: list[Any]) -> Choice:
    """The GGUF ``ref`` means among a repo's ``files`` (``hub.RepoEntry``); RefNotFound when none."""
    groups: dict[tuple[str, str], list[Any]] = {}
    for f in files:
        if not f.path.lower().endswith(".gguf") or is_projector_file(f.path):
            continue
        names = shard_names(f.path)
        key = (quant_of(f.path) or "", names[0])
        groups.setdefault(key, []).append(f)
    if not groups:
        raise RefNotFound(f"'{ref.repo}' has no GGUF file (only GGUF repos can be run: look for a '-GGUF' repo "
                          f"of this model)", ref.text)
    by_quant: dict[str, list[Any]] = {}
    for (quant, first), members in sorted(groups.items()):
        wanted = shard_names(first)
        have = {m.path: m for m in members}
        if all(n in have for n in wanted):  # a split GGUF with a shard missing is not a choice
            by_quant.setdefault(quant, [have[n] for n in wanted])
    quants = sorted((q for q in by_quant if q), key=lambda q: (-_bits(q), q))
    if ref.quant is not None:
        pick = next((q for q in by_quant if q.upper() == ref.quant.upper()), None)
        if pick is None:
            raise RefNotFound(f"'{ref.repo}' has no {ref.quant.upper()} GGUF; quants it has: "
                              f"{', '.join(quants) or 'none named in its file names'}", ref.text, available=quants)
    elif DEFAULT_QUANT in by_quant:
        pick = DEFAULT_QUANT
    else:
        smaller = [q for q in quants if _bits(q) < _bits(DEFAULT_QUANT)]
        bigger = [q for q in quants if _bits(q) >= _bits(DEFAULT_QUANT)]
        pick = (smaller[0] if smaller else bigger[-1]) if quants else ""
    projectors = sorted((f for f in files if is_projector_file(f.path)),
                        key=lambda f: (not re.search(r"f16", f.path, re.I), "bf16" in f.path.lower(), f.path))
    return Choice(quant=pick or "unknown", files=by_quant[pick], mmproj=projectors[0] if projectors else None)


# --------------------------------------------------------------------------- headers
def header_cache(models_dir: Path, repo: str, revision: str, file: str) -> Path:
    """Where the parsed header of ``repo@revision/file`` is cached (JSON, see gguf_header)."""
    key = hashlib.sha256(f"{repo}@{revision}/{file}".encode()).hexdigest()[:32]
    return models_dir / ".cache" / "gguf-headers" / f"{key}.json"


def remote_header(hub: Any, repo: str, revision: str, names: list[str], endpoint: str | None,
                  cache: Path | None = None) -> tuple[GGUFMeta, int]:
    """The header of a (maybe split) GGUF on the hub, by ranged reads of each shard; cached at
    ``cache``. Returns it and the bytes read over the network (0 from the cache)."""
    if cache is not None and cache.is_file():
        try:
            return read_gguf(cache), 0
        except TarsError:
            cache.unlink(missing_ok=True)
    metas, read = [], 0
    for name in names:
        reader = hubio.RangeReader(hub, repo, name, revision=revision, endpoint=endpoint)
        metas.append(read_header(reader, name=f"{repo}/{name}"))
        read += reader.bytes_read
    meta = merge_shards(metas[0], metas[1:])
    if cache is not None:
        meta.save(cache)
    return meta, read


# --------------------------------------------------------------------------- resolving
def _mb(n: int) -> int:
    return max(1, -(-n // 2**20))


def spec_from_header(ref: Ref, choice: Choice, meta: GGUFMeta, revision: str) -> ModelSpec:
    """The spec of ``ref``: its files from ``choice``, its numbers from ``meta``."""
    nums = numbers(meta)
    if meta.arch_field("pooling_type") is not None or nums["arch"] in ("bert", "nomic-bert", "jina-bert-v2"):
        raise ValidationFailed(f"'{ref.text}' is an embedding GGUF ({nums['arch']}); only chat GGUFs run by "
                               "reference", field="model")
    size = sum(int(f.size) for f in choice.files)
    first = choice.files[0]
    return ModelSpec(
        id=ref.text, kind="chat", backend="llama_cpp", params_b=nums["params_b"] or round(size * 2 / 1e9, 3),
        quant=choice.quant if choice.quant != "unknown" else (nums["file_type"] or "unknown"),
        context=nums["context"] or 4096, repo=ref.repo, file=first.path,
        shards=[f.path for f in choice.files] if len(choice.files) > 1 else None,
        sha256=first.sha256 if len(choice.files) == 1 else None, size_mb=_mb(size),
        n_layers=nums["n_layers"], n_embd=nums["n_embd"], n_head_kv=nums["n_head_kv"], head_dim=nums["head_dim"],
        revision=revision, mmproj=choice.mmproj.path if choice.mmproj is not None else None,
        mmproj_mb=_mb(int(choice.mmproj.size)) if choice.mmproj is not None else None,
        description=f"{ref.repo} {choice.quant} GGUF from the hub ({nums['arch']}"
                    + (", sees images" if choice.mmproj is not None else "")
                    + ("" if nums["has_template"] else ", no chat template in the GGUF") + ")",
    )


def _models_dir(catalog: Any) -> Path | None:
    refs = getattr(catalog, "refs_file", None)
    return Path(refs).parent if refs is not None else None


def resolve(name: str, catalog: Any, *, endpoint: str | None = None) -> ModelSpec:
    """The spec for ``name``: a catalog id or a reference already known → no network; else the
    hub (module doc). ``catalog``: a ``catalog.Catalog`` (it remembers what is resolved)."""
    ref = parse(name)
    if ref is None or ref.text in catalog:
        return catalog.get(ref.text if ref is not None else name)
    hub = require("huggingface_hub", "huggingface_hub", "resolving hub references")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    where = endpoint or "https://huggingface.co"
    folder = _models_dir(catalog)
    try:
        commit, files = hubio.repo_files(hub, ref.repo, endpoint)
        choice = choose(ref, files)
        names = [f.path for f in choice.files]
        cache = header_cache(folder, ref.repo, commit, names[0]) if folder is not None else None
        meta, read = remote_header(hub, ref.repo, commit, names, endpoint, cache)
        spec = spec_from_header(ref, choice, meta, commit)
    except TarsError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: hub / network errors, translated
        raise hubio.translate_for(exc, f"'{ref.repo}' (for {ref.text})", ref.text, where, ref=True) from None
    log.info("resolved %s: %s at %s (%s, %d layers, %d MB%s; header: %d bytes read)", ref.text,
             "+".join(names), commit[:12], spec.quant, spec.n_layers or 0, spec.size_mb or 0,
             ", projector " + spec.mmproj if spec.mmproj else "", read, extra=fields(model=ref.text, repo=ref.repo))
    return catalog.remember(spec)


async def resolve_async(name: str, catalog: Any, *, endpoint: str | None = None) -> ModelSpec:
    """``resolve`` off the event loop (the hub is asked at most once per reference)."""
    ref = parse(name)
    if ref is None or ref.text in catalog:
        return catalog.get(ref.text if ref is not None else name)
    return await asyncio.to_thread(resolve, name, catalog, endpoint=endpoint)


def resolve_all(names: list[str], catalog: Any, *, variable: str = "TARS_MODELS") -> list[ModelSpec]:
    """``resolve`` each of ``names`` (start-up: TARS_MODELS); a failure is a ConfigError naming
    ``variable`` (an unknown catalog id is one already)."""
    out = []
    for name in names:
        try:
            out.append(resolve(name, catalog))
        except ModelNotFound as exc:
            if parse(name) is None:
                raise ConfigError(f"{variable} names unknown model '{name}'; known models: "
                                  f"{', '.join(exc.available)}", variable=variable) from None
            raise ConfigError(f"{variable}: {exc.message}", variable=variable) from None
        except (DownloadFailed, ModelGated, ValidationFailed) as exc:
            raise ConfigError(f"{variable}: {exc.message}", variable=variable) from None
    return out


# --------------------------------------------------------------------------- local files
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def local_entry(file: str | Path, *, model_id: str | None = None, chat_template: str | None = None,
                mmproj: str | Path | None = None) -> dict[str, Any]:
    """The user-catalog entry of a GGUF on this disk (``tars models add``), its numbers read
    from its header: referenced in place by absolute ``path``, never copied. ``chat_template``:
    a shipped template's name or a Jinja file; ``mmproj``: a vision projector GGUF.
    ConfigError / ValidationFailed naming what is wrong."""
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"'{file}': no such file")
    meta = read_gguf(path)  # ConfigError: not a GGUF
    nums = numbers(meta)
    if is_projector(meta):
        raise ValidationFailed(f"'{path.name}' is a vision projector, not a model: give it with --mmproj beside the "
                               "model's GGUF", field="file")
    names = shard_names(path.name)
    if len(names) > 1 and names[0] != path.name:
        raise ValidationFailed(f"'{path.name}' is a later shard of a split model: add its first file, {names[0]}",
                               field="file")
    missing = [n for n in names if not path.with_name(n).is_file()]
    if missing:
        raise ConfigError(f"'{path.name}' is split in {len(names)} files; missing beside it: {', '.join(missing)}")
    ident = model_id or re.sub(r"(?i)(-00001-of-\d{5})?\.gguf$", "", path.name)
    if not _ID.match(ident) or ".." in ident:
        raise ValidationFailed(f"'{ident}' cannot be a model id (letters, digits, '.', '_', '-', ':', '+'); "
                               "choose one with --id", field="id")
    size = sum(path.with_name(n).stat().st_size for n in names)
    entry: dict[str, Any] = {
        "id": ident, "kind": "chat", "backend": "llama_cpp",
        "params_b": nums["params_b"] or round(size * 2 / 1e9, 3),
        "quant": nums["file_type"] or quant_of(path.name) or "unknown", "context": nums["context"] or 4096,
        "path": str(path), "size_mb": _mb(size), "n_layers": nums["n_layers"], "n_embd": nums["n_embd"],
        "n_head_kv": nums["n_head_kv"], "head_dim": nums["head_dim"],
        "description": f"{meta.fields.get('general.name') or path.stem} ({nums['arch']}), a local GGUF"
                       + ("" if nums["has_template"] or chat_template else " without a chat template"),
    }
    if chat_template:
        if chat_template in templates.names():
            entry["chat_template"] = chat_template
        else:
            tpl = Path(chat_template).expanduser().resolve()
            if not tpl.is_file():
                raise ValidationFailed(f"--chat-template '{chat_template}' is neither a file nor a shipped template "
                                       f"({', '.join(templates.names()) or 'none'})", field="chat_template")
            try:
                tpl.read_text(encoding="utf-8")  # a Jinja text file
            except (OSError, UnicodeDecodeError) as exc:
                raise ValidationFailed(f"--chat-template '{chat_template}' is not a readable text file ({exc})",
                                       field="chat_template") from None
            entry["chat_template"] = str(tpl)
    if mmproj:
        proj = Path(mmproj).expanduser().resolve()
        if not proj.is_file() or not is_projector(read_gguf(proj)):
            raise ValidationFailed(f"--mmproj '{mmproj}' is not a vision projector GGUF (an mmproj-*.gguf)",
                                   field="mmproj")
        entry["mmproj"], entry["mmproj_mb"] = str(proj), _mb(proj.stat().st_size)
    return entry


# --------------------------------------------------------------------------- chat templates
def check_template(name: str, field: str = "chat_template") -> str:
    """``name`` if it is a shipped template (``templates.names()``), else ValidationFailed naming
    ``field`` and listing them (over the network a template is named, never a path: nothing
    loads arbitrary files)."""
    names = templates.names()
    if name not in names:
        raise ValidationFailed(f"'{field}' must name a chat template that ships with TARS "
                               f"({', '.join(names) or 'none'}); a GGUF's own template is used when it is left out",
                               field=field, available=names)
    return name


def check_name(model: str, catalog: Any, chat_template: str | None = None) -> None:
    """What a deploy checks where it arrives, before it goes anywhere (no network): a catalog id
    is known (``ModelNotFound`` listing the catalog), a reference is well formed, a template shipped."""
    if chat_template is not None:
        check_template(chat_template)
    if parse(model) is None:
        catalog.get(model)


def with_template(spec: ModelSpec, chat_template: str | None) -> ModelSpec:
    """``spec`` as one deploy runs it: ``chat_template`` (a deploy's override) in place of its own."""
    if not chat_template or chat_template == spec.chat_template:
        return spec
    return replace(spec, chat_template=chat_template)


# --------------------------------------------------------------------------- across hosts
def planned_template(plan: Plan, model: str) -> str | None:
    """The chat template ``plan`` runs ``model`` with (a deploy's), wherever it placed it."""
    a = plan.where(model)
    return a.chat_template if a is not None else None


def carry(plan: Plan, specs: list[ModelSpec], chat_templates: dict[str, str]) -> Plan:
    """``plan`` with what other hosts need to run it as planned here: each assignment's chat
    template (``chat_templates``: a deploy's own, by model) and the specs of the resolved
    references among ``specs`` (``plan_specs``; a host takes them with ``Catalog.learn``)."""
    for a in plan.assignments:
        a.chat_template = chat_templates.get(a.model)
    plan.specs = plan_specs(specs)
    return plan


def plan_specs(specs: list[ModelSpec]) -> dict[str, dict[str, Any]]:
    """What a plan carries for other hosts: the spec of every resolved reference among ``specs``."""
    out = {}
    for s in specs:
        if is_ref(s.id) and s.repo and not s.path:
            d = s.to_dict()
            if d.get("chat_template") and d["chat_template"] not in templates.names():
                d["chat_template"] = None  # a file on the planning host: other hosts use the GGUF's own
            out[s.id] = d
    return out
