"""Runtime deploy / remove (issue 12.1): POST /models, DELETE /models/{id}, GET /models states,
persistence across a restart, forwarding from a worker, pulls with progress from a fake hub.

The app, node, cluster, planner, /rpc and store are the real ones; models use the fake
backends, except the pull test, which pulls a tiny real cross-encoder and loads it."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from distributed.api.app import create_app
from distributed.catalog_files import toml_entry
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.profiler import profile_host
from distributed.settings import load_settings
from tests.cluster_support import Host, Net, until
from tests.hubstub import HubStub as FakeHub
from tests.hubstub import hub  # noqa: F401  (the hub stand-in fixture)

pytestmark = pytest.mark.anyio

CHAT, EMB, RR = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2"
PC1_URL, PC2_URL = "http://127.0.0.2:18701", "http://127.0.0.3:18702"
JSON_CT = {"Content-Type": "application/json"}  # the guard wants it on every state-changing method


@contextlib.asynccontextmanager
async def serve(models_dir: Path, profile: HostProfile | None = None, **overrides: Any
                ) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    opts = {"node_name": "pc1", "backend_override": "fake", "models_dir": models_dir, "models": [CHAT, EMB],
            **overrides}
    settings = load_settings(None, **opts)
    service = build(settings, profile=profile or profile_host("rtx3060-12gb", "pc1"))
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pc1",
                                     timeout=30) as client:
            yield client, node


async def states(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.get("/models")
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["models"]}


async def wait_state(client: httpx.AsyncClient, model: str, want: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = (await states(client)).get(model, {})
        if seen.get("state") == want:
            return seen
        if want != "failed" and seen.get("state") == "failed":
            raise AssertionError(f"{model} failed: {seen.get('error')}")
        await _sleep(0.05)
    raise AssertionError(f"{model} never became {want}; last seen {seen}")


async def _sleep(s: float) -> None:
    import asyncio

    await asyncio.sleep(s)


# ----------------------------------------------------------------------------- one node
async def test_deploy_then_remove_at_runtime_on_one_node(tmp_path):
    async with serve(tmp_path) as (client, node):
        await wait_state(client, EMB, "ready")
        r = await client.post("/models", json={"model": RR})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "deploying" and body["placement"][0]["node"] == "pc1"
        assert "reranker" in body["reason"] and body["via"] == "pc1"
        await wait_state(client, RR, "ready")
        r = await client.post("/v1/rerank", json={"model": RR, "query": "capital of France",
                                                  "documents": ["cats", "Paris is the capital of France"]})
        assert r.status_code == 200 and r.json()["results"][0]["index"] == 1

        again = await client.post("/models", json={"model": RR})
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
        assert "already deployed" in again.json()["message"]

        r = await client.delete(f"/models/{RR}", headers=JSON_CT)
        assert r.status_code == 202 and r.json()["status"] == "removing" and RR not in r.json()["models"]
        await until(lambda: RR not in node.targets, what="the reranker unloaded")
        r = await client.post("/v1/rerank", json={"model": RR, "query": "q", "documents": ["d"]})
        assert r.status_code == 404
        r = await client.delete(f"/models/{RR}", headers=JSON_CT)
        assert r.status_code == 404 and CHAT in r.json()["error"]["message"]


async def test_bad_deploys_say_why(tmp_path):
    small = HostProfile(hostname="box", cpu_model="cpu", cpu_cores=4, ram_total_mb=3000, ram_free_mb=2000)
    async with serve(tmp_path, small) as (client, _):
        r = await client.post("/models", json={"model": "gpt-5"})
        assert r.status_code == 404
        msg = r.json()["error"]["message"]
        assert "gpt-5" in msg and "mistral-7b-instruct" in msg and RR in msg  # it lists the catalog

        r = await client.post("/models", json={"model": "mistral-7b-instruct"})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["type"] == "no_room" and "needs about" in err["message"] and "pc1: no GPU" in err["message"]
        assert "2000 MB RAM free" in err["message"] and err["details"]["needs_mb"] > 4000
        assert "mistral-7b-instruct" not in (await states(client))  # nothing changed

        for body, field in [({}, "model"), ({"model": RR, "replicas": 0}, "replicas"),
                            ({"model": RR, "node": "pc9"}, "node"), ({"model": RR, "extra": 1}, "extra")]:
            r = await client.post("/models", json=body)
            assert r.status_code == 400 and r.json()["error"]["details"]["field"] == field, (body, r.text)


async def test_deploys_and_removals_survive_a_restart(tmp_path, state_dir):
    async with serve(tmp_path) as (client, _):
        assert (await client.post("/models", json={"model": RR})).status_code == 202
        assert (await client.delete(f"/models/{EMB}", headers=JSON_CT)).status_code == 202  # a TARS_MODELS model
        await wait_state(client, RR, "ready")
    saved = {e["k"]: e["v"] for e in json.loads((state_dir / "tars-state-pc1.json").read_text())["entries"]}
    assert saved[f"desired:{RR}"] == {"replicas": 1, "node": None} and saved[f"desired:{EMB}"] is None  # removed
    async with serve(tmp_path) as (client, node):  # same TARS_MODELS, same models folder
        await wait_state(client, RR, "ready")
        assert set(node.targets) == {CHAT, RR}
        assert (await client.post("/models", json={"model": EMB})).status_code == 202  # back again
        await wait_state(client, EMB, "ready")
    async with serve(tmp_path) as (client, node):
        await wait_state(client, EMB, "ready")
        assert set(node.targets) == {CHAT, EMB, RR}


# ----------------------------------------------------------------------------- two nodes
async def test_deploy_on_a_worker_places_and_routes_across_the_cluster(tmp_path, state_dir):
    net = Net()
    d1, d2 = tmp_path / "pc1", tmp_path / "pc2"
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", models=[CHAT, EMB], models_dir=d1).start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), models=[CHAT, EMB], models_dir=d2).start()
    try:
        def routed(model: str, where: str) -> bool:
            return all(model in h.node.targets and h.node.targets[model].node == where
                       and h.node.targets[model].state == "ready" for h in (pc1, pc2))

        await until(lambda: routed(EMB, "pc2") and routed(CHAT, "pc1"), what="the first plan applied")
        r = await pc2.http.post("/models", json={"model": RR})  # asked on pc2: recorded there, pc1 plans it
        assert r.status_code == 202, r.text
        assert r.json()["placement"][0]["node"] == "pc2" and r.json()["via"] == "pc2"
        await until(lambda: routed(RR, "pc2"), what="the reranker routed on both hosts")
        r = await pc1.http.post("/v1/rerank", json={"model": RR, "query": "a b", "documents": ["c", "a b"]})
        assert r.status_code == 200 and (r.json()["node"], r.json()["via"]) == ("pc2", "pc1")

        r = await pc1.http.post("/models", json={"model": "phi-2", "node": "pc1"})  # pinned: not where the planner would
        assert r.status_code == 202 and r.json()["placement"][0]["node"] == "pc1", r.text
        assert "deployed to pc1 as asked" in r.json()["reason"]
        await until(lambda: routed("phi-2", "pc1"), what="phi-2 routed to pc1 everywhere")

        r = await pc2.http.delete(f"/models/{RR}", headers=JSON_CT)
        assert r.status_code == 202
        await until(lambda: all(RR not in h.node.targets for h in (pc1, pc2)), what="the reranker gone everywhere")
        for h in (pc1, pc2):  # every host keeps the cluster's desired set (replicated)
            saved = {e["k"]: e["v"] for e in json.loads((state_dir / f"tars-state-{h.name}.json").read_text())["entries"]}
            assert saved["desired:phi-2"] == {"replicas": 1, "node": "pc1"} and saved[f"desired:{RR}"] is None
            assert h.node.placement.desired.models() == [CHAT, EMB, "phi-2"]
    finally:
        await pc2.stop()
        await pc1.stop()


async def test_delete_lets_requests_in_flight_finish(tmp_path):
    import asyncio

    async with serve(tmp_path) as (client, node):
        node.backend_extra["token_delay_s"] = 0.05  # a slow fake chat model
        assert (await client.post("/models", json={"model": "gemma-3-270m"})).status_code == 202
        await wait_state(client, "gemma-3-270m", "ready")
        slow = asyncio.create_task(client.post("/inference", json={"model": "gemma-3-270m", "prompt": "hi",
                                                                   "max_tokens": 12}))
        await until(lambda: node.targets["gemma-3-270m"].queue_depth > 0, what="the request running")
        r = await client.delete("/models/gemma-3-270m", headers=JSON_CT)
        assert r.status_code == 202
        done = await slow
        assert done.status_code == 200 and done.json()["text"], done.text  # finished, not cut off
        assert "gemma-3-270m" not in node.targets


async def test_a_runtime_deploy_reserves_what_tars_plan_says(tmp_path, llama_server_found):
    """Planned for llama-server (a build found) with TARS_PARALLEL=8: POST /models places the model
    with exactly the VRAM, slots and reason `tars plan` prints for the same models and hardware
    (neither model is on disk and the hub is offline, so nothing loads: only the plan is compared)."""
    import typer
    from typer.testing import CliRunner

    from distributed.cli import hardware

    base, new = "qwen2.5-7b-instruct", "mistral-7b-instruct"
    engine = {"backend_override": "", "engine_bin": llama_server_found, "parallel": 8, "context": 2048,
              "models": [base]}
    async with serve(tmp_path, **engine) as (client, node):
        r = await client.post("/models", json={"model": new})
        assert r.status_code == 202, r.text
        (deployed,) = r.json()["placement"]
    app = typer.Typer()
    hardware.register(app)
    env = {"TARS_PARALLEL": "8", "TARS_CONTEXT": "2048", "TARS_ENGINE_BIN": llama_server_found,
           "TARS_MODELS_DIR": str(tmp_path)}
    out = CliRunner().invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--models", f"{base},{new}", "--json"],
                             env=env)
    assert out.exit_code == 0, out.output
    planned = {a["model"]: a for a in json.loads(out.output)["assignments"]}[new]
    for key in ("node", "device", "n_gpu_layers", "vram_mb", "slots", "reason"):
        assert deployed[key] == planned[key], key
    # 8 slots of both models do not fit the 12 GB together: the deploy got fewer, and says so
    assert 1 <= deployed["slots"] < 8 and f"{deployed['slots']} of 8 slots" in deployed["reason"]
    one = CliRunner().invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--models", f"{base},{new}", "--json"],
                             env={**env, "TARS_PARALLEL": "1"})
    single = {a["model"]: a for a in json.loads(one.output)["assignments"]}[new]
    assert single["slots"] == 1 and single["vram_mb"] < deployed["vram_mb"]


# ----------------------------------------------------------------------------- pulls
class SlowHub(FakeHub):
    """A fake hub that sends files in slices with pauses, so a pull is seen in progress."""

    delay_s = 0.02

    def _serve(self, h: Any, head: bool) -> None:
        if head or "/resolve/" not in h.path:
            return super()._serve(h, head)
        wfile = h.wfile

        class Slow:
            def write(self, data: bytes) -> int:
                for i in range(0, len(data), 16384):
                    wfile.write(data[i:i + 16384])
                    wfile.flush()
                    time.sleep(SlowHub.delay_s)
                return len(data)

            def flush(self) -> None:
                wfile.flush()

        h.wfile = Slow()
        try:
            return super()._serve(h, head)
        finally:
            h.wfile = wfile


def _user_catalog(models_dir: Path, repo: str) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "catalog.toml").write_text(toml_entry(dict(
        id="tiny-ce", kind="rerank", backend="cross_encoder", params_b=0.0001, quant="fp32", context=128, repo=repo,
        size_mb=1)))


@pytest.mark.slow
async def test_deploy_pulls_from_the_hub_with_progress_then_serves(hub, tiny_cross_encoder_dir: Path,  # noqa: F811
                                                                   tmp_path: Path, monkeypatch):
    slow = SlowHub()
    with slow:
        monkeypatch.setenv("HF_ENDPOINT", slow.url)
        files = {p.name: p.read_bytes() for p in tiny_cross_encoder_dir.iterdir() if p.is_file()}
        slow.repos["tars-test/tiny-ce"] = files
        models = tmp_path / "models"
        _user_catalog(models, "tars-test/tiny-ce")
        profile = HostProfile(hostname="pc1", cpu_model="cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=8000)
        async with serve(models, profile, backend_override="", models=[EMB]) as (client, node):
            r = await client.post("/models", json={"model": "tiny-ce"})
            assert r.status_code == 202, r.text
            seen = await wait_state(client, "tiny-ce", "pulling", timeout=30)
            assert 0 <= seen["progress"]["percent"] < 100 and seen["progress"]["total_bytes"] > 0
            await wait_state(client, "tiny-ce", "ready", timeout=120)
            assert (models / "tiny-ce" / "config.json").is_file()
            r = await client.post("/rerank", json={"model": "tiny-ce", "query": "q", "texts": ["a", "b"]})
            assert r.status_code == 200 and len(r.json()) == 2
            # a repo the hub does not have: the model fails with the reason, the node serves on
            import dataclasses

            gone = dataclasses.replace(node.catalog.get("tiny-ce"), id="gone-ce", repo="tars-test/gone")
            node.placement.catalog = type(node.catalog)([*node.catalog.all(), gone])  # the host's one catalog
            r = await client.post("/models", json={"model": "gone-ce"})
            assert r.status_code == 202
            failed = await wait_state(client, "gone-ce", "failed", timeout=30)
            assert "not found" in failed["error"] and "tars-test/gone" in failed["error"]
            slow.repos["tars-test/gone"] = files  # the hub has it now: deploying again retries
            r = await client.post("/models", json={"model": "gone-ce"})
            assert r.status_code == 202 and r.json()["status"] == "retrying", r.text
            await wait_state(client, "gone-ce", "ready", timeout=120)
            assert (await client.get("/health")).json()["models"]["tiny-ce"] == "ready"
