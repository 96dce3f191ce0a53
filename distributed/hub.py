"""Downloads from the Hugging Face Hub: one file resumed and verified, a repo file by file.

Every file goes through huggingface_hub's ``http_get`` into ``<name>.part``, so an
interrupted pull — even a killed process — resumes where it stopped (``hf_hub_download``
and ``snapshot_download`` in huggingface_hub 2.x delete partial files), and is verified
before it takes its final name: sha256 against the catalog, else the hub's own LFS
sha256, else the size the hub announced. ``translate`` turns huggingface_hub and network
errors into ``DownloadFailed`` naming the repo and file. ``store.ModelStore.pull`` is
the entry point; ``hub`` arguments are the imported ``huggingface_hub`` module.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .domain import ModelSpec
from .errors import DownloadFailed, TarsError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# What a transformers / sentence-transformers repo needs; skips duplicate weights (.bin,
# .h5, .onnx, openvino) that would triple the download.
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
Progress = bool | Callable[[int, int | None], None]


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def download(hub: Any, spec: ModelSpec, url: str, dest: Path, *, endpoint: str | None, label: str,
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
        got = sha256(part)
        if got != expected_sha:
            part.unlink(missing_ok=True)
            raise DownloadFailed(f"'{spec.repo}/{label}' failed verification: sha256 {got} != expected "
                                 f"{expected_sha}; the download was removed", model=spec.id)
    part.replace(dest)
    return {"commit": meta.commit_hash, "sha256": expected_sha, "size": got_size,
            "verified": "sha256" if expected_sha else "size"}


def pull_file(hub: Any, spec: ModelSpec, dest: Path, endpoint: str | None, progress: Progress) -> dict[str, Any]:
    """A single-file model (``spec.file``, a GGUF) into ``dest``; returns what was checked."""
    assert spec.repo and spec.file
    url = hub.hf_hub_url(spec.repo, spec.file, endpoint=endpoint)
    return download(hub, spec, url, dest, endpoint=endpoint, label=spec.file, progress=progress,
                    lfs_sha256=spec.sha256)


def pull_snapshot(hub: Any, spec: ModelSpec, dest: Path, endpoint: str | None, progress: Progress) -> dict[str, Any]:
    """A transformers / sentence-transformers repo into the folder ``dest``, file by file,
    each resumable and verified; returns what was checked.

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
    total = sum(int(f.size or 0) for f in files)
    offset, sha_checked = 0, 0
    for f in files:
        target = dest / f.path
        lfs_sha = getattr(f.lfs, "sha256", None) if f.lfs is not None else None
        if not (target.is_file() and target.stat().st_size == f.size):
            url = hub.hf_hub_url(spec.repo, f.path, revision=commit, endpoint=endpoint)
            info = download(hub, spec, url, target, endpoint=endpoint, label=f.path, progress=progress,
                            offset=offset, grand_total=total, lfs_sha256=lfs_sha)
            sha_checked += info["verified"] == "sha256"
        elif callable(progress):
            progress(offset + int(f.size or 0), total)
        offset += int(f.size or 0)
    return {"commit": commit, "sha256": None, "size": dir_size(dest), "files": len(files),
            "verified": "sha256+size" if sha_checked else "size"}


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


def translate(exc: Exception, spec: ModelSpec, endpoint: str = "https://huggingface.co") -> TarsError:
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
