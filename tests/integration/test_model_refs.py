"""Models by the name users give them, through a running node (in process): hub references
deployed with POST /models and TARS_MODELS, errors by status, a 409 planned from a header read
by range, the catalog edited while the node runs, the header correcting a wrong entry, a
deploy's chat template. The hub is tests/hubstub.py serving the real SmolLM2 GGUF."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from distributed import catalog_files, modelref
from distributed.domain import HostProfile
from tests.hubstub import GATED_REPO, SMOL_REPO, VISION_REPO, add_repos, hub, projector  # noqa: F401
from tests.cluster_support import until
from tests.integration.test_deploy import EMB, JSON_CT, serve, states, wait_state

pytestmark = pytest.mark.anyio
REF = f"hf.co/{SMOL_REPO}:Q4_1"


def _gguf_gets(hub) -> list[dict]:
    return [r for r in hub.log if r["method"] == "GET" and r["path"].endswith(".gguf")]


async def test_a_reference_deploys_and_answers_under_its_name(hub, smollm2_gguf: Path, tmp_path: Path):
    add_repos(hub, smollm2_gguf)
    async with serve(tmp_path) as (client, node):
        r = await client.post("/models", json={"model": REF})
        assert r.status_code == 202, r.text
        assert r.json()["model"] == REF and r.json()["placement"][0]["model"] == REF
        await wait_state(client, REF, "ready")
        listed = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert listed[REF]["vision"] is False and listed[REF]["kind"] == "chat"
        r = await client.post("/v1/chat/completions", json={"model": REF, "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == REF, r.text
        # planned from the header, read by range (the fake backend pulls nothing)
        assert _gguf_gets(hub) and all(g["range"] for g in _gguf_gets(hub))
        assert hub.bytes_served(SMOL_REPO) <= 4 * 2**20
        plan_est = node.plan.where(REF)
        assert plan_est is not None and plan_est.node == "pc1"
        assert (await client.delete(f"/models/{REF}", headers=JSON_CT)).status_code == 202


async def test_bad_references_answer_404_and_403_with_the_hubs_reason(hub, smollm2_gguf: Path, tmp_path: Path):
    add_repos(hub, smollm2_gguf)
    async with serve(tmp_path) as (client, _):
        r = await client.post("/models", json={"model": f"hf.co/{SMOL_REPO}:Q5_K_M"})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert "Q5_K_M" in err["message"] and err["details"]["available"] == ["Q8_0", "Q4_1", "Q4_K_M"]
        r = await client.post("/models", json={"model": "hf.co/tars-test/Nothing-Here"})
        assert r.status_code == 404 and "tars-test/Nothing-Here" in r.json()["error"]["message"]
        assert "Repository not found" in r.json()["error"]["message"]
        r = await client.post("/models", json={"model": f"hf.co/{GATED_REPO}:Q4_K_M"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "model_gated"
        assert GATED_REPO in r.json()["error"]["message"] and "restricted" in r.json()["error"]["message"]
        r = await client.post("/models", json={"model": "hf.co/not a repo"})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "model"
        r = await client.post("/v1/chat/completions", json={"model": f"hf.co/{SMOL_REPO}:Q5_K_M",
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404  # never deployed: not served


async def test_a_reference_that_fits_nowhere_is_a_409_before_any_pull(hub, smollm2_gguf: Path, tmp_path: Path):
    add_repos(hub, smollm2_gguf)
    tiny = HostProfile(hostname="box", cpu_model="cpu", cpu_cores=2, ram_total_mb=1100, ram_free_mb=500)
    async with serve(tmp_path, tiny, backend_override="") as (client, node):
        r = await client.post("/models", json={"model": REF})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["type"] == "no_room" and REF in err["message"] and err["details"]["needs_mb"] > 94
        assert hub.bytes_served(SMOL_REPO) <= 4 * 2**20 and all(g["range"] for g in _gguf_gets(hub))
        assert not (tmp_path / "hub").exists()  # nothing pulled
        assert REF not in (await states(client))


async def test_tars_models_refs_resolve_at_start_and_after_a_restart_without_the_hub(
        hub, smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    add_repos(hub, smollm2_gguf)
    async with serve(tmp_path, models=[REF, EMB]) as (client, node):
        await wait_state(client, REF, "ready")
        assert [s.id for s in node.model_specs()] == [REF, EMB]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the hub is gone: refs.json knows the reference
    n = len(hub.log)
    async with serve(tmp_path, models=[REF, EMB]) as (client, node):
        await wait_state(client, REF, "ready")
    assert len(hub.log) == n


async def test_a_reference_deployed_at_runtime_is_back_after_a_restart_without_the_hub(
        hub, smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    add_repos(hub, smollm2_gguf)
    async with serve(tmp_path) as (client, _):
        assert (await client.post("/models", json={"model": REF})).status_code == 202
        await wait_state(client, REF, "ready")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    async with serve(tmp_path) as (client, node):
        await wait_state(client, REF, "ready")
        assert node.catalog.get(REF).revision == hub.commit(SMOL_REPO)


async def test_the_catalog_is_followed_while_the_node_runs(smollm2_gguf: Path, tmp_path: Path):
    async with serve(tmp_path) as (client, node):
        r = await client.post("/models", json={"model": "my-smol"})
        assert r.status_code == 404
        entry = modelref.local_entry(smollm2_gguf, model_id="my-smol")  # what `tars models add` writes
        catalog_files.add_entry(tmp_path / "catalog.toml", entry)
        r = await client.post("/models", json={"model": "my-smol"})
        assert r.status_code == 202, r.text
        await wait_state(client, "my-smol", "ready")
        assert node.catalog.get("my-smol").path == str(smollm2_gguf.resolve())
        catalog_files.remove_entry(tmp_path / "catalog.toml", "my-smol")  # `tars models rm`
        assert "my-smol" not in node.catalog
        r = await client.post("/models", json={"model": "my-smol"})
        assert r.status_code == 404


@pytest.mark.slow
async def test_a_wrong_catalog_entry_is_corrected_by_the_header(smollm2_gguf: Path, tmp_path: Path, caplog):
    """The plan of a real node (in-process engine: the file is loaded) uses the header's numbers."""
    (tmp_path / "catalog.toml").write_text(catalog_files.toml_entry(dict(
        id="wrong-smol", kind="chat", backend="llama_cpp", params_b=7.0, quant="Q4_1", context=131072,
        path=str(smollm2_gguf), n_layers=80, n_embd=8192, n_head_kv=64, head_dim=128)))
    caplog.set_level(logging.WARNING, logger="distributed.catalog")
    async with serve(tmp_path, models=["wrong-smol"], backend_override="", chat_engine="inprocess") as (client, node):
        await wait_state(client, "wrong-smol", "ready", timeout=120)
        spec = node.catalog.get("wrong-smol")
        assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim, spec.context) == (30, 576, 3, 64, 8192)
        from distributed.vram import estimate

        est = estimate(spec, node.settings.context, smollm2_gguf)
        assert est.source == "gguf" and node.plan.where("wrong-smol").vram_mb == est.total_mb
    said = [r.getMessage() for r in caplog.records if "corrected from its GGUF header" in r.getMessage()]
    assert said and "n_layers 80 -> 30" in said[0] and "context 131072 -> 8192" in said[0]


async def test_a_deploy_names_a_shipped_chat_template(tmp_path: Path):
    gemma = "gemma-3-270m"  # a base model: no chat template in its GGUF
    async with serve(tmp_path / "models") as (client, node):
        r = await client.post("/models", json={"model": gemma, "chat_template": "/etc/passwd"})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "chat_template"
        assert "chatml-tools" in r.json()["error"]["message"]
        assert gemma not in node.targets  # nothing deployed
        r = await client.post("/models", json={"model": gemma, "chat_template": "chatml-tools"})
        assert r.status_code == 202, r.text
        await wait_state(client, gemma, "ready")
        assert node.targets[gemma].spec.chat_template == "chatml-tools"
        assert node.targets[gemma].assignment.chat_template == "chatml-tools"
        assert node.catalog.get(gemma).chat_template is None  # the catalog entry is unchanged
        r = await client.post("/models", json={"model": gemma})  # back to the model's own
        assert r.status_code == 202 and r.json()["status"] == "deploying"
        await until(lambda: gemma in node.targets and node.targets[gemma].spec.chat_template is None,
                    what="reloaded without the deploy's template")
    async with serve(tmp_path / "models") as (client, node):  # the deploy's choice outlives a restart
        await wait_state(client, gemma, "ready")


async def test_a_vision_reference_is_planned_with_its_projector(hub, smollm2_gguf: Path, projector: Path,
                                                                 tmp_path: Path):
    add_repos(hub, smollm2_gguf, mmproj=projector)
    async with serve(tmp_path) as (client, node):
        plain = await client.post("/models", json={"model": REF})
        seeing = await client.post("/models", json={"model": f"hf.co/{VISION_REPO}"})
        assert plain.status_code == seeing.status_code == 202, seeing.text
        a, b = node.plan.where(REF), node.plan.where(f"hf.co/{VISION_REPO}")
        from distributed.vram import PROJECTOR_COMPUTE_MB

        assert b.vram_mb - a.vram_mb == 1 + PROJECTOR_COMPUTE_MB  # the projector's weights + its buffer
        assert node.catalog.get(f"hf.co/{VISION_REPO}").vision
