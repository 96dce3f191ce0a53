"""POST /v1/rerank (Cohere / Jina shape) and POST /rerank (TEI shape) through the real app,
node, planner, micro-batcher and /rpc, with the fake backends (the fake reranker scores by
shared words, so the right order is known); two nodes in process for the forwarding."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from distributed.api.app import create_app
from distributed.domain import HostProfile
from distributed.node import Node
from distributed.service import build
from distributed.settings import load_settings
from tests.cluster_support import Host, Net, until

pytestmark = pytest.mark.anyio

CHAT, EMB, RR = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2"
PC1_URL, PC2_URL = "http://127.0.0.2:18601", "http://127.0.0.3:18602"
QUERY = "capital of France"
DOCS = ["Berlin is a city in Germany.", "Paris is the capital of France.", "The capital city is big."]


@contextlib.asynccontextmanager
async def serve(tmp_path, models: list[str], **overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Node]]:
    settings = load_settings(None, node_name="pc1", backend_override="fake", models_dir=tmp_path, models=models,
                             **overrides)
    profile = HostProfile(hostname="pc1", cpu_model="test", cpu_cores=4, ram_total_mb=16000, ram_free_mb=12000)
    service = build(settings, profile=profile)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        for t in node.local_targets():
            assert await t.wait_loaded(10) == "ready"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pc1") as client:
            yield client, node


async def test_cohere_shape_sorted_best_first_with_top_n_and_documents(tmp_path):
    async with serve(tmp_path, [CHAT, EMB, RR]) as (client, _):
        docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]  # strings or {"text"} objects, mixed
        r = await client.post("/v1/rerank", json={"model": RR, "query": QUERY, "documents": docs,
                                                  "top_n": 2, "return_documents": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == RR and body["node"] == "pc1" and body["via"] == "pc1" and body["id"]
        assert [x["index"] for x in body["results"]] == [1, 2]  # all three words, then two of three
        assert body["results"][0]["relevance_score"] == 1.0
        assert body["results"][0]["document"] == {"text": DOCS[1]}
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]

        r = await client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})  # default: the reranker
        body = r.json()
        assert body["model"] == RR and [x["index"] for x in body["results"]] == [1, 2, 0]
        assert all("document" not in x for x in body["results"])  # return_documents defaults to false
        scores = [x["relevance_score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)


async def test_tei_shape_and_rerank_accepts_cohere_documents_too(tmp_path):
    async with serve(tmp_path, [EMB, RR]) as (client, _):
        r = await client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [x["index"] for x in out] == [1, 2, 0] and out[0]["text"] == DOCS[1]
        assert set(out[0]) == {"index", "score", "text"} and out[0]["score"] >= out[1]["score"] >= out[2]["score"]
        r = await client.post("/rerank", json={"query": QUERY, "texts": DOCS})
        assert all(set(x) == {"index", "score"} for x in r.json())
        r = await client.post("/rerank", json={"model": RR, "query": QUERY, "documents": DOCS, "top_n": 1})
        assert [x["index"] for x in r.json()["results"]] == [1]


async def test_an_embedding_model_reranks_by_cosine(tmp_path):
    async with serve(tmp_path, [CHAT, EMB]) as (client, node):
        r = await client.post("/v1/rerank", json={"query": "same text", "documents": ["other", "same text"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == EMB and body["method"] == "cosine"  # no reranker served: the embedding default
        best = body["results"][0]
        assert best["index"] == 1 and abs(best["relevance_score"] - 1.0) < 1e-5  # identical text: cosine 1
        assert body["usage"]["prompt_tokens"] > 0
        assert node.targets[EMB].requests == 1  # through the model's own micro-batcher


async def test_bad_input_is_a_400_naming_the_field(tmp_path):
    async with serve(tmp_path, [CHAT, EMB, RR], rerank_max_documents=5) as (client, _):
        cases = [
            ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
            ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
            ("/v1/rerank", {"query": "q", "documents": ["d"] * 6}, "documents"),
            ("/v1/rerank", {"query": "q", "documents": ["d", {"txt": "x"}]}, "documents[1].text"),
            ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
            ("/v1/rerank", {"documents": ["d"]}, "query"),
            ("/v1/rerank", {"model": CHAT, "query": "q", "documents": ["d"]}, "model"),
        ]
        for path, body, field in cases:
            r = await client.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == field, (body, r.json())
        r = await client.post("/v1/rerank", json={"query": "q", "documents": ["d"] * 6})
        assert "at most 5" in r.json()["error"]["message"]
        # the native shape on /rerank, and TEI's field name
        r = await client.post("/rerank", json={"query": "q", "texts": ["d"] * 6})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "texts"
        assert "'texts' has 6" in r.json()["error"]["message"]
        r = await client.post("/rerank", json={"query": "  ", "texts": ["d"]})
        assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "query"


async def test_default_limit_is_1000_documents(tmp_path):
    async with serve(tmp_path, [EMB, RR]) as (client, _):
        r = await client.post("/v1/rerank", json={"model": RR, "query": "q", "documents": ["d"] * 1001})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents"
        r = await client.post("/v1/rerank", json={"model": RR, "query": "q", "documents": ["d q"] * 1000})
        assert r.status_code == 200 and len(r.json()["results"]) == 1000


async def test_unknown_model_is_a_404_listing_the_ranking_models(tmp_path):
    async with serve(tmp_path, [CHAT, EMB, RR]) as (client, _):
        r = await client.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
        assert r.status_code == 404
        msg = r.json()["error"]["message"]
        assert "nope" in msg and EMB in msg and RR in msg and CHAT not in msg


async def test_rerank_is_forwarded_to_the_host_that_serves_the_reranker():
    net = Net()
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", models=[CHAT, EMB, RR]).start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), models=[CHAT, EMB, RR]).start()
    try:
        def ready() -> bool:
            return all(len(h.node.targets) == 3 and all(t.state == "ready" for t in h.node.targets.values())
                       for h in (pc1, pc2))

        await until(ready, what="three models ready on both hosts")
        assert pc1.node.plan.where(RR).node == "pc2"  # placed like an embedding model: off the chat host
        r = await pc1.http.post("/v1/rerank", json={"model": RR, "query": QUERY, "documents": DOCS})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["node"], body["via"]) == ("pc2", "pc1")
        assert [x["index"] for x in body["results"]] == [1, 2, 0]
        r = await pc1.http.post("/rerank", json={"model": EMB, "query": "same", "texts": ["x", "same"]})
        assert r.status_code == 200 and r.json()[0]["index"] == 1  # MiniLM on pc2 through embed.encode
        await pc2.crash()
        r = await pc1.http.post("/v1/rerank", json={"model": RR, "query": QUERY, "documents": DOCS})
        # its host is down and the reranker fits here: the cluster's fallback serves it on pc1
        assert r.status_code == 200, r.text
        assert r.json()["node"] == "pc1" and [x["index"] for x in r.json()["results"]] == [1, 2, 0]
    finally:
        await pc1.stop()
        await pc2.stop()


async def test_a_replicated_reranker_is_served_by_its_replicas_and_survives_one_dying(tmp_path):
    import asyncio

    net = Net()
    pc1 = await Host(net, "pc1", PC1_URL, "rtx3060-12gb", models=[CHAT, EMB], models_dir=tmp_path / "1").start()
    pc2 = await Host(net, "pc2", PC2_URL, "gtx1660s-6gb", peers=(PC1_URL,), models=[CHAT, EMB],
                     models_dir=tmp_path / "2").start()
    try:
        await until(lambda: len(pc1.cluster.hosts()) == 2, what="pc2 joined")
        r = await pc1.http.post("/models", json={"model": RR, "replicas": 2})
        assert r.status_code == 202 and len(r.json()["placement"]) == 2, r.text

        def both_ready() -> bool:
            rs = pc1.node.routes.replicas.get(RR)
            return rs is not None and {m.node for m in rs.members() if rs.live(m)} == {"pc1", "pc2"}

        await until(both_ready, timeout=10, what="two live replicas of the reranker")
        body = {"model": RR, "query": QUERY, "documents": DOCS}
        answers = await asyncio.gather(*(pc1.http.post("/v1/rerank", json=body) for _ in range(12)))
        assert all(a.status_code == 200 for a in answers)
        assert {a.json()["node"] for a in answers} <= {"pc1", "pc2"}
        assert all([x["index"] for x in a.json()["results"]] == [1, 2, 0] for a in answers)
        await pc2.crash()
        answers = await asyncio.gather(*(pc1.http.post("/v1/rerank", json=body) for _ in range(6)))
        assert [a.status_code for a in answers] == [200] * 6 and {a.json()["node"] for a in answers} == {"pc1"}
    finally:
        await pc1.stop()
        await pc2.stop()
