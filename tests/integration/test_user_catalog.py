"""One catalog (issue 8.1): a model known only from ``TARS_MODELS_DIR/catalog.toml`` is
served like a built-in one. Before, ``tars plan`` and ``tars models pull`` read the user
catalog while ``tars serve`` refused the same model ("TARS_MODELS names unknown model")."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from distributed.api.app import create_app
from distributed.domain import HostProfile
from distributed.node import Node, user_catalog
from distributed.service import build
from distributed.settings import load_settings

pytestmark = pytest.mark.anyio

MINE = "my-gemma"


def _user_catalog(folder: Path, gguf: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "catalog.toml").write_text(
        "[[model]]\n"
        f'id = "{MINE}"\nkind = "chat"\nbackend = "llama_cpp"\nparams_b = 0.27\nquant = "Q4_K_M"\n'
        f"context = 32768\npath = \"{gguf}\"\n"
        'description = "a GGUF file of my own"\n')
    return folder


def _profile(name: str) -> HostProfile:
    return HostProfile(hostname=name, cpu_model="test cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000)


def test_the_node_knows_a_model_from_the_user_catalog(tmp_path):
    gguf = tmp_path / "weights.gguf"
    gguf.write_bytes(b"GGUF")
    folder = _user_catalog(tmp_path / "models", gguf)
    settings = load_settings(None, node_name="mine", models_dir=folder, models=MINE)
    node = Node(settings, _profile("mine"))
    (spec,) = node.model_specs()  # was ConfigError "TARS_MODELS names unknown model 'my-gemma'"
    assert spec.id == MINE and spec.path == str(gguf)
    assert node.store.catalog is node.catalog  # one catalog, shared with the store
    assert node.plan_alone().where(MINE) is not None
    # the composition root builds the same catalog (built-in entries stay known)
    assert MINE in user_catalog(settings) and "gemma-3-270m" in user_catalog(settings)


@pytest.mark.slow
async def test_serves_a_local_gguf_known_only_from_the_user_catalog(gemma_gguf, tmp_path):
    pytest.importorskip("llama_cpp")
    folder = _user_catalog(tmp_path / "models", gemma_gguf)
    settings = load_settings(None, node_name="mine", models_dir=folder, models=MINE, context=512, threads=2)
    service = build(settings, profile=_profile("mine"))
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://mine",
                                     timeout=120) as client:
            (target,) = node.local_targets()
            assert await target.wait_loaded(300) == "ready", target.error
            r = await client.post("/inference", json={"model": MINE, "prompt": "The sky is", "max_tokens": 4,
                                                      "temperature": 0.0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == MINE and body["node"] == "mine" and body["usage"]["completion_tokens"] >= 1
            models = (await client.get("/models")).json()["models"]
            assert [m["id"] for m in models] == [MINE] and models[0]["backend"] == "llama_cpp"
