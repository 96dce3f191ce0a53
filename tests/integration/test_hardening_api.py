"""Issue 11 in process (httpx ASGITransport, fake backends): content type, Host header,
duplicate Authorization, HEAD /health, metrics cardinality, embedding input limit, the
API key on /docs /openapi.json /config, and the cluster channel's validation."""

from __future__ import annotations

import contextlib
import random
import string
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from distributed.api.app import create_app
from distributed.api.guards import HostPolicy, split_host
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.settings import load_settings

pytestmark = pytest.mark.anyio

CHAT, EMBED = "gemma-3-270m", "all-MiniLM-L6-v2"
TOKEN = "cluster-secret"


@contextlib.asynccontextmanager
async def serve(tmp_path, base_url: str = "http://127.0.0.2:8000", client: tuple[str, int] = ("127.0.0.1", 5000),
                **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    settings = load_settings(None, **{"node_name": "pc1", "backend_override": "fake", "models_dir": tmp_path,
                                      "models": [CHAT, EMBED], "host": "127.0.0.2", "port": 8000,
                                      "cluster_token": TOKEN, **overrides})
    profile = HostProfile(hostname="pc1", cpu_model="cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000)
    service = build(settings, profile=profile)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as c:
            for t in node.local_targets():
                await t.wait_loaded(10)
            yield c, node


async def test_state_changing_routes_need_json_content_type(tmp_path):
    async with serve(tmp_path) as (c, node):
        body = b'{"prompt": "hello", "max_tokens": 4}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = await c.post("/inference", content=body, headers={"content-type": ctype})
            assert r.status_code == 415, r.text
            err = r.json()["error"]
            assert err["type"] == "unsupported_media_type" and "application/json" in err["message"]
        r = await c.post("/v1/chat/completions", content=b'{"messages":[{"role":"user","content":"x"}]}')
        assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"  # OpenAI error shape
        assert node.targets[CHAT].info()["requests"] == 0  # nothing ran
        r = await c.post("/inference", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        r = await c.request("DELETE", "/models/nope", content=b"x=1", headers={"content-type": "text/plain"})
        assert r.status_code == 415  # a body must be JSON whatever the method
        r = await c.delete("/models/nope")  # bodiless DELETE: no type needed (browsers preflight DELETE)
        assert r.status_code != 415


async def test_host_header_is_checked(tmp_path):
    async with serve(tmp_path) as (c, node):
        for host in ("127.0.0.2:8000", "localhost:8000", "pc1", "127.0.0.1", "[::1]:8000", "bench", "pc1.lan"):
            assert (await c.get("/health", headers={"host": host})).status_code == 200, host
        r = await c.get("/status", headers={"host": "evil.example:8000"})
        assert r.status_code == 400 and "TARS_ALLOWED_HOSTS" in r.json()["error"]["message"]
        r = await c.post("/embed", json={"input": "x"}, headers={"host": "rebind.attacker.example"})
        assert r.status_code == 400
        r = await c.get("/health", headers={"host": "8.8.8.8"})  # an address that is not this node's
        assert r.status_code == 400
        # /rpc is exempt (token-checked; peers use whatever name their TARS_PEERS says)
        r = await c.post("/rpc", headers={"host": "tars-box.home", "authorization": f"Bearer {TOKEN}"},
                         json={"jsonrpc": "2.0", "method": "node.health", "id": 1})
        assert r.status_code == 200 and r.json()["result"]["node"] == "pc1"
    async with serve(tmp_path, allowed_hosts="tars.example.lan,.home.arpa") as (c, node):
        for host in ("tars.example.lan", "box.home.arpa:8000"):
            assert (await c.get("/health", headers={"host": host})).status_code == 200, host
        assert (await c.get("/health", headers={"host": "evil.example"})).status_code == 400


def test_host_policy_names():
    p = HostPolicy("pc1", "0.0.0.0", "http://192.168.1.10:8000", ["*.bad", ".lan"])
    assert p.allows("192.168.1.10") and p.allows("pc1") and p.allows("pc1.fritz.box") and p.allows("x.lan")
    assert p.allows("10.1.2.3", local_addr="10.1.2.3")  # the address the connection arrived on
    assert not p.allows("10.1.2.3", local_addr="192.168.1.10") and not p.allows("evil.example")
    assert HostPolicy("pc1", allowed=["*"]).allows("anything.example")
    assert split_host("[FE80::1]:8000") == "fe80::1" and split_host("Pc1.Lan.:80") == "pc1.lan"


async def test_duplicate_authorization_headers_are_refused(tmp_path):
    async with serve(tmp_path, api_key="k1") as (c, node):
        two = [("authorization", "Bearer k1"), ("authorization", f"Bearer {TOKEN}")]
        r = await c.get("/status", headers=two)
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "authorization"
        r = await c.post("/rpc", headers=[*two, ("content-type", "application/json")],
                         content=b'{"jsonrpc":"2.0","method":"node.health","id":1}')
        assert r.status_code == 400
        assert (await c.get("/status", headers={"authorization": "Bearer k1"})).status_code == 200


async def test_docs_openapi_and_config_need_the_key_when_one_is_set(tmp_path):
    async with serve(tmp_path, api_key="k1") as (c, node):
        for path in ("/docs", "/openapi.json", "/config", "/status", "/metrics"):
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers={"authorization": "Bearer k1"})).status_code == 200, path
        assert (await c.get("/health")).status_code == 200


async def test_head_health(tmp_path):
    async with serve(tmp_path) as (c, node):
        r = await c.head("/health")
        assert r.status_code == 200 and r.content == b""


async def test_random_model_names_do_not_grow_metrics(tmp_path):
    async with serve(tmp_path) as (c, node):
        await c.post("/inference", json={"model": CHAT, "prompt": "x", "max_tokens": 2})
        before = len((await c.get("/metrics")).content)
        rnd = random.Random(7)
        for _ in range(5000):
            name = "".join(rnd.choices(string.ascii_letters, k=24))
            r = await c.post("/embed", json={"model": name, "input": "x"})
            assert r.status_code == 404
        text = (await c.get("/metrics")).text
        assert len(text) < before + 4000, (before, len(text))
        assert 'model="unknown"' in text and f'model="{CHAT}"' in text


async def test_embedding_inputs_are_bounded(tmp_path):
    async with serve(tmp_path, embed_max_inputs=8) as (c, node):
        r = await c.post("/embed", json={"input": ["a"] * 9})
        assert r.status_code == 400
        err = r.json()["error"]
        assert "TARS_EMBED_MAX_INPUTS" in err["message"] and "8" in err["message"]
        assert err["details"]["field"] == "input" and err["details"]["limit"] == 8
        r = await c.post("/v1/embeddings", json={"input": ["a"] * 9})
        assert r.status_code == 400 and "TARS_EMBED_MAX_INPUTS" in r.json()["error"]["message"]
        assert (await c.post("/embed", json={"input": ["a"] * 8})).status_code == 200
        assert (await c.post("/v1/embeddings", json={"input": ["a"] * 8})).status_code == 200


_STATES: dict[str, Any] = {}


def _ctl(name: str) -> dict[str, Any]:
    """The signed control envelope a node of that name sends (cluster_state.py), one run per name."""
    from distributed.cluster_state import ClusterState

    state = _STATES.setdefault(name, ClusterState(name.replace("\n", " "), TOKEN))
    return state.seal({"term": 0, "digest": state.digest(), "held": None, "held_by": ""})


def _join(name: str, url: str) -> dict[str, Any]:
    profile = {"hostname": name, "cpu_model": "cpu", "cpu_cores": 2, "ram_total_mb": 8000, "ram_free_mb": 4000}
    return {"jsonrpc": "2.0", "method": "cluster.join", "id": 1,
            "params": {"name": name, "url": url, "profile": profile, "ctl": _ctl(name)}}


def _plan_of(result: dict[str, Any]) -> dict[str, Any]:
    """The plan a join answer carries (in its envelope, signed by the planner)."""
    return result["ctl"]["plan"]["plan"]


async def test_join_checks_name_url_and_origin(tmp_path):
    auth = {"authorization": f"Bearer {TOKEN}"}
    async with serve(tmp_path, client=("192.168.1.20", 40000)) as (c, node):
        for name, url, field in [("pc2\nINFO forged", "http://192.168.1.20:8000", "name"),
                                 ("pc2", "http://192.168.1.20:8000/admin", "url"),
                                 ("pc2", "gopher://192.168.1.20:70", "url"),
                                 ("pc2", "http://192.168.1.99:8000", "url")]:  # not where the join came from
            r = (await c.post("/rpc", json=_join(name, url), headers=auth)).json()
            assert r["error"]["code"] == -32602 and r["error"]["data"]["details"]["field"] == field, r
        assert node.peers is not None and not node.peers.peers
        r = (await c.post("/rpc", json=_join("pc2", "http://192.168.1.20:8000"), headers=auth)).json()
        assert r["result"]["name"] == "pc1" and node.peers.get("pc2") is not None
        beat = {"jsonrpc": "2.0", "method": "cluster.heartbeat", "id": 2, "params": {"name": "bad name!"}}
        r = (await c.post("/rpc", json=beat, headers=auth)).json()
        assert r["error"]["code"] == -32602


def _gpu_profile(name: str, vram: int) -> dict[str, Any]:
    return {"hostname": name, "cpu_model": "cpu", "cpu_cores": 4, "ram_total_mb": 16000, "ram_free_mb": 8000,
            "gpus": [{"index": 0, "name": "Claimed GPU", "vram_total_mb": vram, "vram_free_mb": vram}]}


async def test_a_host_claiming_more_vram_than_it_reports_gets_no_models(tmp_path):
    """pc2 joins claiming an 80 GB GPU while its live figures (sent with the join and its
    heartbeats) report 6 GB: no model for it until they agree; then it gets its share. A peer
    that sends no live figures (a version before them) is taken at its word."""
    import asyncio

    auth = {"authorization": f"Bearer {TOKEN}"}
    async with serve(tmp_path) as (c, node):
        join = _join("pc2", "http://127.0.0.3:18999")
        join["params"]["profile"] = _gpu_profile("pc2", 81920)
        join["params"]["gpus"] = [{"index": 0, "name": "Claimed GPU", "vram_total_mb": 6144, "vram_used_mb": 100}]
        r = (await c.post("/rpc", json=join, headers=auth)).json()
        assert {a["node"] for a in _plan_of(r["result"])["assignments"]} == {"pc1"}  # the figures disagree

        def beat(vram: int) -> dict[str, Any]:
            gpus = [{"index": 0, "name": "Claimed GPU", "vram_total_mb": vram, "vram_used_mb": 100}]
            return {"jsonrpc": "2.0", "method": "cluster.heartbeat", "id": 3,
                    "params": {"name": "pc2", "url": "http://127.0.0.3:18999", "gpus": gpus, "ctl": _ctl("pc2")}}

        assert "result" in (await c.post("/rpc", json=beat(6144), headers=auth)).json()
        for _ in range(100):
            if node.plan.assignments and all(a.node == "pc1" for a in node.plan.assignments):
                break
            await asyncio.sleep(0.05)
        assert {a.node for a in node.plan.assignments} == {"pc1"}, node.plan.to_dict()
        assert "81920" in node.peers.peers["pc2"].vram_doubt
        await c.post("/rpc", json=beat(81920), headers=auth)  # the figures agree: trusted again
        for _ in range(100):
            if any(a.node == "pc2" for a in node.plan.assignments):
                break
            await asyncio.sleep(0.05)
        assert any(a.node == "pc2" for a in node.plan.assignments)
        # an older peer: joins claiming a GPU, its heartbeats carry no figures -> taken at its word
        join3 = _join("pc3", "http://127.0.0.4:18998")
        join3["params"]["profile"] = _gpu_profile("pc3", 81920)
        r = (await c.post("/rpc", json=join3, headers=auth)).json()
        assert node.peers.peers["pc3"].vram_doubt is None and "pc3" in {a["node"] for a in _plan_of(r["result"])["assignments"]}


def test_transient_503s_say_when_to_retry():
    from distributed.api.app import _error_response
    from distributed.errors import ModelFailed, ModelLoading, PeerUnavailable

    assert _error_response(PeerUnavailable("pc2 is gone", peer="pc2"), "pc1", "/embed").headers["retry-after"] == "1"
    assert _error_response(ModelLoading("loading"), "pc1", "/v1/embeddings").headers["retry-after"] == "1"
    assert "retry-after" not in _error_response(ModelFailed("broken"), "pc1", "/embed").headers
