"""The store for hub references and local entries: every shard and the projector pulled
together into hub/ORG/REPO (resumed, verified), a header read by range as the plan's source
before the pull, and the header correcting a wrong catalog entry."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from distributed import modelref
from distributed.catalog import load_catalog
from distributed.domain import HostProfile, ModelSpec
from distributed.planner import plan
from distributed.store import MARKER, ModelStore, projector_path
from distributed.vram import estimate
from tests.hubstub import (SMOL_REPO, SPLIT_REPO, VISION_REPO, add_repos, hub, projector,  # noqa: F401
                           smollm2_shards)

CPU = HostProfile(hostname="box", cpu_model="cpu", cpu_cores=4, ram_total_mb=16000, ram_free_mb=12000)


def _store(tmp_path: Path) -> ModelStore:
    models = tmp_path / "models"
    return ModelStore(models, load_catalog(user_file=models / "catalog.toml"))


def test_a_split_reference_is_pulled_whole_and_resumes(hub, smollm2_gguf: Path, smollm2_shards: list[Path],
                                                       tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf, shards=smollm2_shards)
    store = _store(tmp_path)
    spec = modelref.resolve(f"hf.co/{SPLIT_REPO}", store.catalog)
    second = spec.shards[1]
    hub.truncate_first_get.add((SPLIT_REPO, second))  # the connection drops half way through shard 2
    seen: list[tuple[int, int | None]] = []

    path = store.pull(spec, progress=lambda d, t: seen.append((d, t)))

    folder = tmp_path / "models" / "hub" / SPLIT_REPO
    assert path == folder / spec.file and store.path_for(spec) == path
    for shard, name in zip(smollm2_shards, spec.shards):
        assert (folder / name).read_bytes() == shard.read_bytes()
    gets = [g for g in hub.gets(Path(second).name) if not g["range"] or g["range"].endswith("-")]  # not the header
    assert len(gets) == 2 and int(gets[1]["range"].removeprefix("bytes=").rstrip("-")) > 0  # resumed, not restarted
    total = sum(p.stat().st_size for p in smollm2_shards)
    assert seen[-1] == (total, total) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))  # one count
    marker = json.loads((folder / "Q4_K_M" / MARKER).read_text())
    assert marker["verified"] == "sha256" and marker["files"] == spec.shards
    # one shard missing: not on disk (a pull fetches just that one again)
    (folder / spec.shards[1]).unlink()
    assert store.path_for(spec) is None
    n = hub.bytes_served(SPLIT_REPO, spec.shards[0])
    assert store.pull(spec, progress=False) == path and hub.bytes_served(SPLIT_REPO, spec.shards[0]) == n


def test_the_projector_comes_with_the_model(hub, smollm2_gguf: Path, projector: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf, mmproj=projector)
    store = _store(tmp_path)
    spec = modelref.resolve(f"hf.co/{VISION_REPO}:Q4_K_M", store.catalog)
    path = store.pull(spec, progress=False)
    assert projector_path(spec.mmproj, spec.file, path) == path.parent / "mmproj-SmolLM2-f16.gguf"
    assert projector_path(spec.mmproj, spec.file, path).read_bytes() == projector.read_bytes()
    rows = {r["id"]: r for r in store.list()}
    assert rows[spec.id]["vision"] and rows[spec.id]["on_disk"]
    assert not any(r["source"].startswith("local (not") for r in rows.values())  # the projector is no stray


def test_the_plan_before_the_pull_is_the_plan_after_it(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf)
    store = _store(tmp_path)
    spec = modelref.resolve(f"hf.co/{SMOL_REPO}:Q8_0", store.catalog)
    before = store.paths([spec])
    assert before[spec.id].suffix == ".json"  # the header read by range, cached
    est_before = estimate(spec, 2048, before[spec.id])
    plan_before = plan({"box": CPU}, [spec], paths=before, context=2048)
    assert est_before.source == "gguf" and not store.on_disk([spec])

    store.pull(spec, progress=False)
    after = store.paths([spec])
    assert after[spec.id].suffix == ".gguf"
    assert estimate(spec, 2048, after[spec.id]) == est_before
    assert plan({"box": CPU}, [spec], paths=after, context=2048).to_dict() == plan_before.to_dict()


def test_a_wrong_entry_is_corrected_from_the_header_with_a_log_line(smollm2_gguf: Path, tmp_path: Path,
                                                                    caplog) -> None:
    wrong = ModelSpec(id="wrong", kind="chat", backend="llama_cpp", params_b=7, quant="Q4_1", context=131072,
                      path=str(smollm2_gguf), n_layers=80, n_embd=8192, n_head_kv=64, head_dim=128, size_mb=4000)
    store = ModelStore(tmp_path, load_catalog(extra=[wrong]))
    spec = store.catalog.get("wrong")
    assert estimate(spec, 4096).n_layers == 80  # what the entry alone says
    caplog.set_level(logging.WARNING, logger="distributed.catalog")

    paths = store.paths([spec])

    assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim, spec.context) == (30, 576, 3, 64, 8192)
    assert store.catalog.get("wrong") is spec  # the catalog's own entry
    p = plan({"box": CPU}, [spec], paths=paths, context=131072)
    assert estimate(spec, 131072, paths["wrong"]).context == 8192 and p.where("wrong") is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "wrong" in lines[0] and "n_layers 80 -> 30" in lines[0]
    store.paths([spec])
    assert len(caplog.records) == 1  # said once


def test_the_embedded_ggufs_agree_with_their_catalog_entries(smollm2_gguf: Path, gemma_gguf: Path) -> None:
    """The shipped catalog checked against the real headers it can read (the embedded models)."""
    from distributed.gguf_header import numbers, read_gguf

    catalog = load_catalog()
    for model, path in (("smollm2-135m-instruct", smollm2_gguf), ("gemma-3-270m", gemma_gguf)):
        spec, nums = catalog.get(model), numbers(read_gguf(path))
        assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim, spec.context, spec.quant) == (
            nums["n_layers"], nums["n_embd"], nums["n_head_kv"], nums["head_dim"], nums["context"], nums["file_type"])
        assert spec.size_mb == -(-path.stat().st_size // 2**20) and spec.params_b == pytest.approx(nums["params_b"],
                                                                                                    rel=0.01)
