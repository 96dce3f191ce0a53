"""hub.py on its own: one file resumed from ``<name>.part`` and verified — the catalog's
sha256 first, else the hub's LFS sha256, else the size — a repo pulled file by file from
one commit, and every hub or network failure turned into ``DownloadFailed`` naming the
repo and the file.

The hub is ``HubStub`` (tests/hubstub.py), a local HTTP server on 127.0.0.1 reached
through ``HF_ENDPOINT``, and ``hub`` arguments are the real huggingface_hub module, as
``ModelStore.pull`` passes them; nothing else is reached.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from distributed import hub as hubio
from distributed.errors import DownloadFailed
from tests.hubstub import COMMIT, FILE, REPO, dead_endpoint, gguf_spec, hub, payload, snapshot_spec  # noqa: F401
from tests.hubstub import HubStub as FakeHub

DATA = payload()
SHA = hashlib.sha256(DATA).hexdigest()


def fetch(fake: FakeHub, dest: Path, *, sha256: str | None = None, progress: Any = False) -> dict[str, Any]:
    """``hub.download`` of ``REPO/FILE`` into ``dest``, as ``pull_file`` calls it (the
    catalog's sha256 arrives as ``lfs_sha256``)."""
    spec = gguf_spec(sha256=sha256)
    url = huggingface_hub.hf_hub_url(REPO, FILE, endpoint=fake.url)
    return hubio.download(huggingface_hub, spec, url, dest, endpoint=fake.url, label=FILE, progress=progress,
                          lfs_sha256=sha256)


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# ----------------------------------------------------------------------------- resume from .part
def test_a_part_file_is_resumed_from_where_it_stopped(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: DATA}
    dest = tmp_path / "m" / FILE
    dest.parent.mkdir()
    part_of(dest).write_bytes(DATA[:1_000_000])
    seen: list[tuple[int, int | None]] = []

    info = fetch(hub, dest, progress=lambda done, total: seen.append((done, total)))

    assert dest.read_bytes() == DATA and not part_of(dest).exists()
    assert [g["range"] for g in hub.gets(FILE)] == ["bytes=1000000-"]  # only the rest was asked for
    assert seen[0] == (1_000_000, len(DATA)) and seen[-1] == (len(DATA), len(DATA))  # the bar starts where it was
    assert info == {"commit": COMMIT, "sha256": SHA, "size": len(DATA), "verified": "sha256"}


def test_a_part_file_longer_than_the_hub_file_is_started_over(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: DATA}
    dest = tmp_path / FILE
    part_of(dest).write_bytes(b"x" * (len(DATA) + 10))  # a different file was there

    fetch(hub, dest)

    assert dest.read_bytes() == DATA
    assert [g["range"] for g in hub.gets(FILE)] == [None]


def test_more_bytes_than_the_hub_announced_is_refused_and_removed(hub: FakeHub, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import file_download

    real_get = file_download.http_get

    def one_byte_too_many(*args: Any, **kwargs: Any) -> None:
        real_get(*args, **kwargs)
        args[1].write(b"!")  # the temp file: longer than the size the hub announced

    monkeypatch.setattr(file_download, "http_get", one_byte_too_many)
    hub.repos[REPO] = {FILE: DATA}
    dest = tmp_path / FILE
    with pytest.raises(DownloadFailed, match=f"got {len(DATA) + 1} bytes, the hub says {len(DATA)}") as err:
        fetch(hub, dest)
    assert REPO in err.value.message and FILE in err.value.message
    assert not dest.exists() and not part_of(dest).exists()


# ----------------------------------------------------------------------------- verification order
@pytest.mark.parametrize(("catalog", "etag", "outcome"), [
    (SHA, "f" * 64, "sha256"),  # the catalog's sha256 decides, whatever the hub's says
    ("0" * 64, SHA, "0" * 64),  # ... and a wrong catalog sha256 fails although the hub's matches
    (None, SHA, "sha256"),  # no catalog sha256: the hub's LFS sha256 (its ETag)
    (None, "e" * 64, "e" * 64),
    (None, "a" * 40, "size"),  # not an LFS file (a git sha1 ETag): the size is all there is
])
def test_catalog_sha256_then_hub_lfs_sha256_then_size(hub: FakeHub, tmp_path: Path, catalog: str | None,
                                                      etag: str, outcome: str) -> None:
    hub.repos[REPO] = {FILE: DATA}
    hub.etag_override[(REPO, FILE)] = etag
    dest = tmp_path / FILE
    if outcome in ("sha256", "size"):
        info = fetch(hub, dest, sha256=catalog)
        assert info["verified"] == outcome and dest.read_bytes() == DATA
        assert info["sha256"] == (None if outcome == "size" else SHA) and info["size"] == len(DATA)
        return
    with pytest.raises(DownloadFailed, match="failed verification") as err:
        fetch(hub, dest, sha256=catalog)
    assert f"sha256 {SHA} != expected {outcome}" in err.value.message
    assert f"'{REPO}/{FILE}'" in err.value.message
    assert not dest.exists() and not part_of(dest).exists()  # nothing unverified is kept


def test_pull_file_passes_the_catalog_sha256(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: DATA}
    hub.etag_override[(REPO, FILE)] = "f" * 64
    info = hubio.pull_file(huggingface_hub, gguf_spec(sha256=SHA), tmp_path / FILE, hub.url, False)
    assert info["verified"] == "sha256" and info["sha256"] == SHA


# ----------------------------------------------------------------------------- a repo, file by file
def test_pull_snapshot_takes_the_wanted_files_of_one_commit(hub: FakeHub, tmp_path: Path) -> None:
    repo = "tars-test/tiny-8bit"
    files = {"config.json": b"{}", "model.safetensors": payload(100_000), "tokenizer.json": b"{}",
             "pytorch_model.bin": b"duplicate weights", ".gitattributes": b"*.bin lfs", "sub/extra.txt": b"x"}
    hub.repos[repo] = files
    seen: list[tuple[int, int | None]] = []

    info = hubio.pull_snapshot(huggingface_hub, snapshot_spec(), tmp_path / "m", hub.url,
                               lambda done, total: seen.append((done, total)))

    got = sorted(str(p.relative_to(tmp_path / "m")) for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert got == ["config.json", "model.safetensors", "sub/extra.txt", "tokenizer.json"]
    assert all(f"/resolve/{COMMIT}/" in r["path"] for r in hub.log if "/resolve/" in r["path"])  # one commit
    wanted = 2 + 100_000 + 2 + 1
    assert seen[-1] == (wanted, wanted)  # one count over the whole repo
    assert info["commit"] == COMMIT and info["files"] == 4 and info["size"] == wanted


def test_pull_snapshot_prefers_the_trees_lfs_sha256(hub: FakeHub, tmp_path: Path) -> None:
    repo, weights = "tars-test/tiny-8bit", payload(100_000)
    hub.repos[repo] = {"config.json": b"{}", "model.safetensors": weights}
    hub.etag_override[(repo, "model.safetensors")] = "f" * 64  # the ETag is wrong; the tree listing is right
    hub.etag_override[(repo, "config.json")] = "a" * 40  # a plain git file: size only
    hub.lfs[(repo, "model.safetensors")] = hashlib.sha256(weights).hexdigest()

    info = hubio.pull_snapshot(huggingface_hub, snapshot_spec(), tmp_path / "ok", hub.url, False)
    assert info["verified"] == "sha256+size"

    hub.lfs[(repo, "model.safetensors")] = "e" * 64
    with pytest.raises(DownloadFailed, match="failed verification") as err:
        hubio.pull_snapshot(huggingface_hub, snapshot_spec(), tmp_path / "bad", hub.url, False)
    assert f"expected {'e' * 64}" in err.value.message and "model.safetensors" in err.value.message


def test_pull_snapshot_without_lfs_files_is_checked_by_size(hub: FakeHub, tmp_path: Path) -> None:
    repo = "tars-test/tiny-8bit"
    hub.repos[repo] = {"config.json": b"{}", "tokenizer.json": b"{}"}
    for f in hub.repos[repo]:
        hub.etag_override[(repo, f)] = "a" * 40
    info = hubio.pull_snapshot(huggingface_hub, snapshot_spec(), tmp_path / "m", hub.url, False)
    assert info["verified"] == "size" and info["sha256"] is None


@pytest.mark.parametrize(("path", "wanted"), [
    ("config.json", True), ("model.safetensors", True), ("tokenizer.model", True), ("vocab.txt", True),
    ("1_Pooling/config.json", True), ("pytorch_model.bin", False), ("model.onnx", False),
    ("tf_model.h5", False), (".gitattributes", False), (".cache/x.json", False), ("onnx/.hidden/a.json", False),
])
def test_only_what_transformers_needs_and_never_hidden_files(path: str, wanted: bool) -> None:
    assert hubio._wanted(path) is wanted


# ----------------------------------------------------------------------------- translate
def caught(call: Any) -> Exception:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the exception huggingface_hub raises is what is tested
        return exc
    raise AssertionError("no exception")


def metadata(fake_url: str, repo: str = REPO, file: str = FILE) -> Any:
    return lambda: huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, file, endpoint=fake_url))


def assert_names_repo_and_file(err: DownloadFailed, *words: str) -> None:
    assert isinstance(err, DownloadFailed) and err.details["model"] == "tiny-gguf"
    assert f"'{REPO}' file '{FILE}'" in err.message, err.message
    for w in words:
        assert w in err.message, err.message


def test_a_missing_repo_and_a_missing_file_are_not_found(hub: FakeHub) -> None:
    hub.repos[REPO] = {"other.gguf": b"x"}
    missing_file = caught(metadata(hub.url))
    assert isinstance(missing_file, huggingface_hub.errors.EntryNotFoundError)
    assert_names_repo_and_file(hubio.translate(missing_file, gguf_spec()), "not found on the hub")
    missing_repo = caught(metadata(hub.url, repo="nobody/nothing"))
    assert isinstance(missing_repo, huggingface_hub.errors.RepositoryNotFoundError)
    assert_names_repo_and_file(hubio.translate(missing_repo, gguf_spec()), "repository", "not found")


def test_gated_and_missing_revision_say_what_to_do(hub: FakeHub) -> None:
    hub.errors[REPO] = (401, "GatedRepo")
    gated = caught(metadata(hub.url))
    assert isinstance(gated, huggingface_hub.errors.GatedRepoError)
    assert_names_repo_and_file(hubio.translate(gated, gguf_spec()), "is gated", "HF_TOKEN")
    hub.errors[REPO] = (404, "RevisionNotFound")
    revision = caught(metadata(hub.url))
    assert isinstance(revision, huggingface_hub.errors.RevisionNotFoundError)
    assert_names_repo_and_file(hubio.translate(revision, gguf_spec()), "revision not found")


def test_any_other_refusal_carries_its_http_status(hub: FakeHub) -> None:
    hub.errors[REPO] = (403, None)
    refused = caught(metadata(hub.url))
    assert isinstance(refused, huggingface_hub.errors.HfHubHTTPError)
    err = hubio.translate(refused, gguf_spec())
    assert_names_repo_and_file(err, "the hub refused", "HTTP 403")
    assert err.details["status"] == 403


def test_an_unreachable_hub_is_a_network_error_naming_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    url = dead_endpoint(monkeypatch)
    refused = caught(metadata(url))
    err = hubio.translate(refused, gguf_spec(), url)
    assert_names_repo_and_file(err, f"cannot reach the model hub at {url}", "network connection", "resumes")
    assert err.details["endpoint"] == url and "not found" not in err.message


def test_a_network_error_behind_other_exceptions_is_found() -> None:
    try:
        try:
            raise ConnectionResetError("peer reset")
        except ConnectionResetError as inner:
            raise RuntimeError("while reading the body") from inner
    except RuntimeError as outer:
        err = hubio.translate(outer, gguf_spec(), "https://hub.example")
    assert_names_repo_and_file(err, "cannot reach the model hub at https://hub.example", "ConnectionResetError")


def test_offline_mode_and_missing_cache_entries() -> None:
    offline = hubio.translate(huggingface_hub.errors.OfflineModeIsEnabled("offline"), gguf_spec())
    assert_names_repo_and_file(offline, "offline mode is on", "HF_HUB_OFFLINE=1")
    local = hubio.translate(huggingface_hub.errors.LocalEntryNotFoundError("no cached file\nmore"), gguf_spec())
    assert_names_repo_and_file(local, "cannot reach the model hub", "(no cached file)")


def test_a_disk_error_is_about_the_models_folder_and_anything_else_is_named_by_type() -> None:
    full = hubio.translate(OSError(errno.ENOSPC, "No space left on device"), gguf_spec())
    assert_names_repo_and_file(full, "cannot write", "into the models folder", "No space left")
    consistency = hubio.translate(OSError("Consistency check failed: file should be of size 5"), gguf_spec())
    assert_names_repo_and_file(consistency, "failed: OSError: Consistency check failed")
    other = hubio.translate(ValueError("odd answer"), gguf_spec())
    assert_names_repo_and_file(other, "pulling", "failed: ValueError: odd answer")


def test_a_repo_pull_names_only_the_repo() -> None:
    err = hubio.translate(ValueError("odd"), snapshot_spec())
    assert "'tars-test/tiny-8bit'" in err.message and " file " not in err.message
