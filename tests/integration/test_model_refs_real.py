"""Hub references served by real engines (slow): a split GGUF run by reference in llama-server
answers chat under that name after a pull that was interrupted and resumed; in a two-host
cluster (in process) the model is pulled only on the host that runs it, and answers through
the other host by its name. The hub is tests/hubstub.py serving the real SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.engine.binary import locate
from tests.cluster_support import Host, Net, until
from tests.hubstub import SMOL_REPO, SPLIT_REPO, add_repos, hub, smollm2_shards  # noqa: F401
from tests.integration.test_deploy import EMB, PC1_URL, PC2_URL, serve, wait_state

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_split_reference_runs_in_llama_server_under_its_name(hub, smollm2_gguf: Path,
                                                                      smollm2_shards: list[Path], tmp_path: Path):
    if locate("") is None:
        pytest.skip("llama-server is not built (scripts/build_engine.sh)")
    add_repos(hub, smollm2_gguf, shards=smollm2_shards)
    ref = f"hf.co/{SPLIT_REPO}:q4_k_m"
    hub.truncate_first_get.add((SPLIT_REPO, f"Q4_K_M/{smollm2_shards[0].name}"))  # the pull is cut once
    async with serve(tmp_path, models=[EMB], backend_override="", chat_engine="server", parallel=2) as (client, node):
        r = await client.post("/models", json={"model": ref})
        assert r.status_code == 202, r.text
        await wait_state(client, ref, "ready", timeout=240)
        row = next(m for m in (await client.get("/models")).json()["models"] if m["id"] == ref)
        assert row["engine"]["name"] == "llama-server" and row["vision"] is False
        r = await client.post("/v1/chat/completions", json={
            "model": ref, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Say hello."}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == ref and body["choices"][0]["message"]["content"].strip()
        # every shard pulled, the cut one resumed where it stopped
        folder = tmp_path / "hub" / SPLIT_REPO / "Q4_K_M"
        assert sorted(p.name for p in folder.glob("*.gguf")) == [p.name for p in smollm2_shards]
        cut = [g for g in hub.gets(smollm2_shards[0].name) if not g["range"] or g["range"].endswith("-")]
        assert len(cut) == 2 and int(cut[1]["range"].removeprefix("bytes=").rstrip("-")) > 0
        # the engine was started on the first shard: llama.cpp found the second beside it
        argv = node.targets[ref].supervisor.argv  # the command line of the running engine
        assert argv[argv.index("-m") + 1] == str(folder / smollm2_shards[0].name) and "--mmproj" not in argv


async def test_a_reference_is_pulled_only_where_it_runs(hub, smollm2_gguf: Path, tmp_path: Path):
    add_repos(hub, smollm2_gguf)
    ref = f"hf.co/{SMOL_REPO}:Q4_1"
    net = Net()
    d1, d2 = tmp_path / "pc1", tmp_path / "pc2"
    opts = dict(backend_override="", chat_engine="inprocess", models=[EMB])
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", models_dir=d1, **opts).start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), models_dir=d2, **opts).start()
    try:
        await until(lambda: EMB in pc2.node.targets, timeout=60, what="the first plan applied")
        r = await pc2.http.post("/models", json={"model": ref, "node": "pc2"})  # asked on the worker, run there
        assert r.status_code == 202, r.text
        assert r.json()["placement"][0]["node"] == "pc2"

        def ready_everywhere() -> bool:
            return all(ref in h.node.targets and h.node.targets[ref].state == "ready" for h in (pc1, pc2))

        await until(ready_everywhere, timeout=180, what="the reference ready on pc2 and routed on pc1")
        r = await pc1.http.post("/v1/chat/completions", json={
            "model": ref, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == ref, r.text
        assert (r.json()["node"], r.json()["via"]) == ("pc2", "pc1")
        # resolved once, on the host asked (pc2, not the planner); pulled only on the host that runs it
        assert [r for r in hub.log if "/tree/" in r["path"]] and len([r for r in hub.log if "/tree/" in r["path"]]) == 1
        assert (d2 / "hub" / SMOL_REPO / "SmolLM2-135M-Instruct-Q4_1.gguf").is_file()
        assert not (d1 / "hub").exists()
        assert pc2.node.catalog.get(ref).to_dict() == pc1.node.catalog.get(ref).to_dict()  # the plan carried it
        assert (d2 / "refs.json").is_file()  # and pc2 remembers it for its next start
    finally:
        await pc2.stop()
        await pc1.stop()
