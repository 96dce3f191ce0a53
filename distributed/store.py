"""Models on disk: where each one lives, getting it there, and what is there.

Layout under ``models_dir`` (``TARS_MODELS_DIR``)::

    gemma-3-270m-q4_k_m.gguf          the embedded GGUF, assembled once from its PyPI package
    <id>/<file>.gguf                  a pulled single-file GGUF (<file>.gguf.part while downloading)
    <id>/config.json ...              a pulled transformers / sentence-transformers repo
    <id>/.tars-pull.json              written last, after verification: "this pull is complete"
    catalog.toml                      optional user catalog (see catalog.py)

Pulls go through ``huggingface_hub`` (its HTTP stack, token handling, ``HF_ENDPOINT``,
progress bars). A single GGUF is downloaded into ``<file>.part`` with huggingface_hub's
``http_get`` so that an interrupted pull — even a killed process — resumes where it
stopped (``hf_hub_download`` in huggingface_hub 2.x deletes partial files), and it is
verified before it takes its final name: sha256 against the catalog, else against the
hub's own LFS sha256 (the ETag), else the size. huggingface_hub errors are translated into
``TarsError`` subclasses here, at the boundary, with the repo and file named.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .catalog import Catalog, load_catalog
from .domain import ModelSpec
from .errors import ConfigError, DownloadFailed, ModelNotDownloaded, TarsError
from .optional import require

MARKER = ".tars-pull.json"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What a transformers / sentence-transformers repo needs; skips duplicate weights (.bin,
# .h5, .onnx, openvino) that would triple the download.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
Progress = bool | Callable[[int, int | None], None]
_LOCK = threading.Lock()


def _dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


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
    def _hub_path(self, spec: ModelSpec) -> Path:
        base = self.models_dir / spec.id
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
        if spec.embedded and spec.package:
            if spec.backend == "llama_cpp":
                _, target, expected = self._package_gguf(spec)
                return target if target.is_file() and target.stat().st_size == expected else None
            pkg = require(spec.package, spec.package.replace("_", "-"), f"the embedded model '{spec.id}'")
            folder = Path(pkg.get_model_path())
            return folder if (folder / "config.json").is_file() else None
        if spec.repo:
            p = self._hub_path(spec)
            if spec.file:
                return p if p.is_file() else None
            return p if (p / MARKER).is_file() else None
        return None

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
        is called with (bytes done, bytes total) as data arrives.
        """
        if spec.embedded or spec.path:
            return self.ensure(spec)
        existing = self.path_for(spec)
        if existing is not None:
            return existing
        if not spec.repo:
            raise ConfigError(f"model '{spec.id}' has no hub repo in the catalog: nothing to pull")
        hub = require("huggingface_hub", "huggingface_hub", "pulling models")
        if hub.constants.is_offline_mode():
            raise DownloadFailed(f"cannot pull '{spec.id}': offline mode is on (HF_HUB_OFFLINE=1); unset it to download",
                                 model=spec.id)
        endpoint = os.environ.get("HF_ENDPOINT") or None
        try:
            if spec.file:
                return self._pull_file(hub, spec, endpoint, progress)
            return self._pull_snapshot(hub, spec, endpoint, progress)
        except TarsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every hub/network error is translated
            raise _translate(exc, spec) from None

    def _pull_file(self, hub: Any, spec: ModelSpec, endpoint: str | None, progress: Progress) -> Path:
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        assert spec.repo and spec.file
        url = hub.hf_hub_url(spec.repo, spec.file, endpoint=endpoint)
        meta = hub.get_hf_file_metadata(url, endpoint=endpoint)
        dest = self._hub_path(spec)
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        size = meta.size
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done > size:  # a different file was there: start over
            part.unlink()
            done = 0
        with part.open("ab") as fh:
            http_get(meta.location, fh, resume_size=done, headers=build_hf_headers(), expected_size=size,
                     displayed_filename=spec.file, tqdm_class=_tqdm_class(progress))
        expected_sha = spec.sha256 or (meta.etag if meta.etag and SHA256_RE.match(meta.etag) else None)
        got_size = part.stat().st_size
        if size is not None and got_size != size:
            part.unlink(missing_ok=True)
            raise DownloadFailed(f"'{spec.repo}/{spec.file}': got {got_size} bytes, the hub says {size}; "
                                 "partial download removed, run the pull again", model=spec.id)
        if expected_sha:
            got = _sha256(part)
            if got != expected_sha:
                part.unlink(missing_ok=True)
                raise DownloadFailed(f"'{spec.repo}/{spec.file}' failed verification: sha256 {got} != expected "
                                     f"{expected_sha}; the download was removed", model=spec.id)
        part.replace(dest)
        self._write_marker(dest.parent, spec, commit=meta.commit_hash, sha256=expected_sha, size=got_size,
                           verified="sha256" if expected_sha else "size")
        return dest

    def _pull_snapshot(self, hub: Any, spec: ModelSpec, endpoint: str | None, progress: Progress) -> Path:
        assert spec.repo
        dest = self._hub_path(spec)
        folder = hub.snapshot_download(spec.repo, local_dir=dest, endpoint=endpoint,
                                       allow_patterns=SNAPSHOT_PATTERNS, tqdm_class=_tqdm_class(progress))
        dest = Path(folder)
        if not (dest / "config.json").is_file() and not (dest / "modules.json").is_file():
            raise DownloadFailed(f"'{spec.repo}' downloaded but has no config.json: not a transformers repo",
                                 model=spec.id)
        # huggingface_hub checked each file's size against the hub while downloading
        self._write_marker(dest, spec, commit=None, sha256=None, size=_dir_size(dest), verified="size")
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
            rows.append({
                "id": spec.id, "kind": spec.kind, "backend": spec.backend, "on_disk": path is not None,
                "path": str(path) if path else None,
                "size_mb": round(_dir_size(path) / 2**20) if path else spec.size_mb,
                "source": _source(spec), "embedded": spec.embedded,
            })
        if self.models_dir.is_dir():
            for f in sorted(self.models_dir.rglob("*.gguf")):
                if f.resolve() not in known and ".cache" not in f.parts:
                    rows.append({"id": f.stem, "kind": "chat", "backend": "llama_cpp", "on_disk": True,
                                 "path": str(f), "size_mb": round(f.stat().st_size / 2**20),
                                 "source": "local (not in the catalog)", "embedded": False})
        return rows


def _source(spec: ModelSpec) -> str:
    if spec.path:
        return f"local:{spec.path}"
    if spec.embedded and spec.package:
        return f"package:{spec.package}"
    if spec.repo:
        return f"hub:{spec.repo}" + (f"/{spec.file}" if spec.file else "")
    return "unknown"


def _tqdm_class(progress: Progress) -> Any:
    """huggingface_hub's own bar (True), none (False), or a bar that reports to a callback."""
    if progress is True:
        return None
    from tqdm.auto import tqdm

    callback = progress if callable(progress) else None

    class _Reporter(tqdm):  # type: ignore[misc, valid-type]
        """Silent bar; byte bars report to ``callback`` (snapshot_download also makes a
        file-count bar and a network-transfer bar: those are ignored)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            desc = str(kwargs.get("desc") or "")
            self._report = callback is not None and kwargs.get("unit") == "B" and not desc.startswith("Downloading bytes")

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self._report:
                total = getattr(self, "total", None)
                callback(self._done, int(total) if total else None)  # type: ignore[misc]
            return None

    return _Reporter


def _translate(exc: Exception, spec: ModelSpec) -> TarsError:
    """A huggingface_hub / network exception → a TarsError naming the repo and file."""
    from huggingface_hub import errors as hf

    what = f"'{spec.repo}'" + (f" file '{spec.file}'" if spec.file else "")
    if isinstance(exc, hf.GatedRepoError):
        return DownloadFailed(f"{what} is gated: accept its licence on the hub and set HF_TOKEN", model=spec.id)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return DownloadFailed(f"repository {what} not found on the hub (check the catalog entry)", model=spec.id)
    if isinstance(exc, hf.RevisionNotFoundError):
        return DownloadFailed(f"{what}: revision not found on the hub", model=spec.id)
    if isinstance(exc, hf.EntryNotFoundError):
        return DownloadFailed(f"{what} not found on the hub (check the catalog entry)", model=spec.id)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return DownloadFailed(f"the hub refused {what} (HTTP {status})", model=spec.id, status=status)
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return DownloadFailed(f"cannot pull {what}: offline mode is on (HF_HUB_OFFLINE=1)", model=spec.id)
    if isinstance(exc, OSError) and "Consistency check failed" not in str(exc):
        if getattr(exc, "errno", None) is not None:
            return DownloadFailed(f"cannot write {what} into the models folder: {exc}", model=spec.id)
    return DownloadFailed(f"pulling {what} failed: {type(exc).__name__}: {exc}", model=spec.id)
