"""The Hugging Face Hub: downloads (one file resumed and verified, a GGUF with its shards and
projector, a repo file by file), a repo's file list, and ranged reads of a file's first bytes
(``RangeReader``: how ``modelref`` reads a GGUF header before any pull).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .domain import ModelSpec
from .errors import DownloadFailed, ModelGated, RefNotFound, TarsError

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
             lfs_sha256: str | None = None, meta: Any = None) -> dict[str, Any]:
    """One hub file into ``dest``: resumed from ``dest.part``, verified, then renamed.

    Verification: the catalog's sha256 (single-file models), else the hub's LFS sha256
    (the tree listing or the ETag of an LFS file), else the size the hub announced.
    ``meta``: the file's ``get_hf_file_metadata`` when the caller has it already.
    Returns what was checked, for the completion marker.
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    meta = meta or hub.get_hf_file_metadata(url, endpoint=endpoint)
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


def gguf_files(spec: ModelSpec) -> list[str]:
    """A GGUF model's files in its repo: every shard of a split model (or its one file),
    then its projector (``mmproj``) when it has one."""
    names = list(spec.shards or ([spec.file] if spec.file else []))
    if spec.mmproj and not Path(spec.mmproj).is_absolute():
        names.append(spec.mmproj)
    return names


def pull_file(hub: Any, spec: ModelSpec, folder: Path, endpoint: str | None, progress: Progress) -> dict[str, Any]:
    """A GGUF model (``spec.file``; every shard of a split one and its projector with it) into
    ``folder`` (each file at its path in the repo), at ``spec.revision`` when it is pinned;
    files already there whole are kept. Progress is one count over all the files."""
    assert spec.repo and spec.file
    names = gguf_files(spec)
    urls = [hub.hf_hub_url(spec.repo, n, revision=spec.revision, endpoint=endpoint) for n in names]
    metas = [hub.get_hf_file_metadata(u, endpoint=endpoint) for u in urls]
    total = sum(int(m.size or 0) for m in metas)
    offset, checked, commit, first_sha = 0, [], None, None
    for name, url, meta in zip(names, urls, metas):
        dest = folder / name
        size = int(meta.size or 0)
        if dest.is_file() and meta.size is not None and dest.stat().st_size == meta.size:
            checked.append("kept")
            if callable(progress):
                progress(offset + size, total)
        else:
            one = spec.sha256 if name == spec.file and len(names) == 1 else None  # the catalog's hash: one file
            info = download(hub, spec, url, dest, endpoint=endpoint, label=name, progress=progress, offset=offset,
                            grand_total=total if len(names) > 1 else None, lfs_sha256=one, meta=meta)
            checked.append(info["verified"])
            first_sha = first_sha or (info["sha256"] if name == spec.file else None)
        commit = commit or meta.commit_hash
        offset += size
    verified = "sha256" if all(c in ("sha256", "kept") for c in checked) else "size"
    return {"commit": commit, "sha256": first_sha, "size": total, "files": names, "verified": verified}


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
    commit = api.repo_info(spec.repo, revision=spec.revision or "main").sha or "main"
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


@dataclass(frozen=True)
class RepoEntry:
    """One file of a hub repo as its tree lists it."""

    path: str
    size: int
    sha256: str | None = None  # the LFS sha256 the hub lists (large files)


def repo_files(hub: Any, repo: str, endpoint: str | None, revision: str = "main") -> tuple[str, list[RepoEntry]]:
    """The commit ``revision`` points at, and every file of ``repo`` at that commit (repo info,
    then one recursive tree listing). huggingface_hub's errors pass through (``translate_for``)."""
    from huggingface_hub.hf_api import RepoFile

    api = hub.HfApi(endpoint=endpoint)
    commit = api.model_info(repo, revision=revision).sha or revision
    files = [RepoEntry(f.path, int(f.size or 0), getattr(f.lfs, "sha256", None) if f.lfs is not None else None)
             for f in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)]
    return commit, sorted(files, key=lambda f: f.path)


class RangeReader:
    """Ranged reads of one hub file through huggingface_hub's HTTP session (its headers, token,
    ``HF_ENDPOINT``, redirects): ``reader(offset, length) -> bytes``. ``bytes_read`` and
    ``requests`` count what it fetched; a server that ignores ``Range`` is read only as far
    as asked, then the connection is dropped."""

    def __init__(self, hub: Any, repo: str, filename: str, *, revision: str, endpoint: str | None) -> None:
        url = hub.hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
        self.meta = hub.get_hf_file_metadata(url, endpoint=endpoint)
        self.size: int | None = self.meta.size
        self.bytes_read = 0
        self.requests = 0

    def __call__(self, offset: int, length: int) -> bytes:
        if self.size is not None:
            length = max(0, min(length, self.size - offset))
        out = bytearray()
        for attempt in range(self.ATTEMPTS):  # a dropped connection: ask again for what is missing
            try:
                self._read(offset + len(out), length - len(out), out)
                break
            except Exception as exc:  # noqa: BLE001 - only network failures are retried
                if _network_cause(exc) is None or attempt == self.ATTEMPTS - 1:
                    raise
        return bytes(out[:length])

    ATTEMPTS = 3

    def _read(self, offset: int, length: int, out: bytearray) -> None:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if length <= 0:
            return
        headers = {**build_hf_headers(), "Range": f"bytes={offset}-{offset + length - 1}",
                   "Accept-Encoding": "identity"}
        want = len(out) + length
        self.requests += 1
        with get_session().stream("GET", self.meta.location, headers=headers, timeout=60) as r:
            if r.status_code == 416:
                return
            hf_raise_for_status(r)
            skip = offset if r.status_code == 200 else 0  # Range ignored: the whole file from byte 0
            for chunk in r.iter_bytes():
                self.bytes_read += len(chunk)
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                out += chunk
                if len(out) >= want:
                    break


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
    what = f"'{spec.repo}'" + (f" file '{spec.file}'" if spec.file else "")
    return translate_for(exc, what, spec.id, endpoint)


def _reason(exc: Exception) -> str:
    """The hub's own words for a refusal (X-Error-Message / the body's "error"), else the first line."""
    said = (getattr(exc, "server_message", None) or "").strip()
    return said.splitlines()[0] if said else str(exc).splitlines()[0]


def translate_for(exc: Exception, what: str, model: str, endpoint: str = "https://huggingface.co",
                  ref: bool = False) -> TarsError:
    """``translate`` for ``what`` (a quoted repo, maybe with a file). ``ref``: a hub reference a user
    gave — a missing repo is then a 404 (``RefNotFound``) and a gated one a 403 (``ModelGated``),
    each with the hub's reason."""
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.OfflineModeIsEnabled):
        return DownloadFailed(f"cannot reach {what}: offline mode is on (HF_HUB_OFFLINE=1)", model=model)
    if isinstance(exc, hf.GatedRepoError):
        msg = f"{what} is gated: {_reason(exc)} (accept its licence on the hub and set HF_TOKEN)"
        return ModelGated(msg, model=model) if ref else DownloadFailed(msg, model=model)
    if isinstance(exc, hf.RepositoryNotFoundError):
        msg = f"repository {what} not found on the hub: {_reason(exc)}"
        return RefNotFound(msg, model) if ref else DownloadFailed(msg + " (check the catalog entry)", model=model)
    if isinstance(exc, hf.RevisionNotFoundError):
        return DownloadFailed(f"{what}: revision not found on the hub", model=model)
    net = _network_cause(exc)
    if net is not None or isinstance(exc, hf.LocalEntryNotFoundError):
        why = f"{type(net).__name__}: {net}" if net is not None else str(exc).splitlines()[0]
        return DownloadFailed(
            f"cannot reach the model hub at {endpoint} for {what} ({why}). Check this machine's network "
            "connection (and HF_ENDPOINT or HTTPS_PROXY if you set them), then run the same command again: "
            "a download resumes where it stopped", model=model, endpoint=endpoint)
    if isinstance(exc, hf.EntryNotFoundError):
        return DownloadFailed(f"{what} not found on the hub (check the catalog entry)", model=model)
    if isinstance(exc, hf.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        return DownloadFailed(f"the hub refused {what} (HTTP {status}: {_reason(exc)})", model=model, status=status)
    if isinstance(exc, OSError) and "Consistency check failed" not in str(exc):
        if getattr(exc, "errno", None) is not None:
            return DownloadFailed(f"cannot write {what} into the models folder: {exc}", model=model)
    return DownloadFailed(f"pulling {what} failed: {type(exc).__name__}: {exc}", model=model)
