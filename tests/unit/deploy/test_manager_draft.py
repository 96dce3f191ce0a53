"""``Deployer.deploy(..., draft=)`` (speculative decoding): the draft is checked, kept with the
deployment (the replicated desired set, on any host), planned beside the model where this install
runs drafts."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.deploy.manager import Deployer
from distributed.deploy.placement import Placement
from distributed.errors import ValidationFailed
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.store import ModelStore
from distributed.targets import Routes
from tests.unit.deploy.test_manager import CHAT, EMB, Cluster, deployer, saved

pytestmark = pytest.mark.anyio


def with_server(tmp_path: Path, **overrides) -> tuple[Deployer, Cluster]:
    """A Deployer whose install runs GGUF chat in llama-server (a stand-in binary: nothing starts)."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho 'version: 1 (x)' >&2\n")
    exe.chmod(0o755)
    settings = load_settings(None, node_name="pc1", models=[CHAT, EMB], models_dir=tmp_path, engine_bin=str(exe),
                             **overrides)
    catalog = load_catalog()
    placement = Placement(settings, catalog, ModelStore(tmp_path, catalog))
    cluster = Cluster({"pc1": profile_host("rtx3060-12gb", "pc1")})
    return Deployer(settings, placement, Routes("pc1"), cluster), cluster


async def test_a_draft_is_planned_beside_the_model_and_kept(tmp_path):
    d, cluster = with_server(tmp_path)
    out = await d.deploy(CHAT, draft=CHAT)  # SmolLM2 drafting for itself: one vocabulary
    a = out["placement"][0]
    assert out["status"] == "deploying" and out["draft"] == CHAT and "draft_check" not in out
    assert a["draft"]["model"] == CHAT and a["draft"]["device"] == a["device"] == "cuda:0"
    assert f"plus draft {CHAT}, {a['draft']['vram_mb']} MB on cuda:0" in a["reason"] and cluster.replans == 1
    assert d.placement.spec(CHAT).draft == CHAT and d.placement.spec(EMB).draft is None
    again = Placement(d.settings, d.placement.catalog, d.placement.store)  # the next start
    assert again.spec(CHAT).draft == CHAT and again.plan(cluster.hosts()).where(CHAT).draft["model"] == CHAT


async def test_with_speculation_off_the_draft_is_kept_but_not_planned(tmp_path):
    d, _ = with_server(tmp_path, speculative="off")
    out = await d.deploy(CHAT, draft=CHAT)
    assert out["placement"][0]["draft"] is None and "plus draft" not in out["reason"]
    assert out["draft_note"] == "kept with the deployment, not used while TARS_SPECULATIVE=off"


async def test_a_refused_draft_changes_nothing(tmp_path):
    d, cluster = with_server(tmp_path)
    with pytest.raises(ValidationFailed) as e:
        await d.deploy(CHAT, draft="bge-reranker-base")
    assert e.value.details["field"] == "draft" and "is a rerank model" in e.value.message
    assert cluster.replans == 0 and d.placement.spec(CHAT).draft is None


async def test_a_host_that_does_not_plan_records_the_draft_for_the_cluster(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    out = await d.deploy(CHAT, draft=CHAT)
    assert out["status"] == "deploying" and out["draft"] == CHAT and cluster.replans == 1
    assert saved(tmp_path).desired.get(CHAT).draft == CHAT  # recorded here, replicated from here
    assert saved(tmp_path).spec(CHAT).draft == CHAT
