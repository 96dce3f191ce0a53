"""The embedding runtime through a real node in process: the embedded MiniLM on the runtime
TARS_EMBED_RUNTIME names (here OpenVINO, exported at first load under TARS_MODELS_DIR/runtimes),
/v1/embeddings answering like torch, and /models and ``tars ps`` naming the runtime and why."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from distributed.api.app import create_app
from distributed.cli.deploy import runtime_cell
from distributed.domain import HostProfile
from distributed.service import build
from distributed.settings import load_settings

EMBED = "all-MiniLM-L6-v2"
SENTENCES = ["A cat sits on the mat.", "The stock market fell sharply today.", "How do I bake bread?"]


@pytest.fixture(scope="module")
async def node_on(minilm_dir, tmp_path_factory) -> Any:
    models_dir = tmp_path_factory.mktemp("models")
    settings = load_settings(None, node_name="rt", models_dir=models_dir, models=[EMBED], embed_runtime="openvino")
    profile = HostProfile(hostname="rt", cpu_model="test cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000)
    service = build(settings, profile=profile)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rt",
                                     timeout=120) as client:
            for t in node.local_targets():
                assert await t.wait_loaded(300) == "ready", t.error
            yield client, models_dir


@pytest.mark.slow
@pytest.mark.anyio
async def test_models_show_the_runtime_and_embeddings_match_torch(node_on, minilm_dir):
    client, models_dir = node_on
    rows = {m["id"]: m for m in (await client.get("/models")).json()["models"]}
    runtime = rows[EMBED]["runtime"]
    assert runtime["name"] == "openvino" and runtime["source"] == "setting"
    assert runtime["why"].startswith("openvino: TARS_EMBED_RUNTIME=openvino, cosine 0.9")
    assert runtime["agreement"] >= 0.999
    assert runtime_cell(rows[EMBED]) == "openvino"
    assert list((models_dir / "runtimes" / EMBED).glob("openvino-*/model.xml"))

    r = await client.post("/v1/embeddings", json={"model": EMBED, "input": SENTENCES})
    assert r.status_code == 200
    got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    assert got.shape == (3, 384) and float((got * ref).sum(axis=1).min()) >= 0.999


def test_ps_shows_the_runtime_and_its_speedup():
    assert runtime_cell({"runtime": {"name": "openvino", "speedup": 3.14}}) == "openvino 3.1x"
    assert runtime_cell({"runtime": {"name": "torch", "speedup": 1.0}}) == "torch"
    assert runtime_cell({"runtime": {"name": "onnx"}}) == "onnx"
    assert runtime_cell({"kind": "chat"}) == "–"
