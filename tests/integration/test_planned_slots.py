"""The engine runs with the slots the plan counted. A node (the real app, planner and
llama-server) serves the embedded Gemma 3 270M on a simulated GPU with room for two of its
four slots of context: the plan gives it two and says why, the llama-server child runs with
``-np 2 -c 2×context``, and it answers. Skips where no llama-server is built
(scripts/build_engine.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psutil
import pytest

from distributed.api.app import create_app
from distributed.catalog import load_catalog
from distributed.domain import GPUInfo, HostProfile
from distributed.engine.binary import locate
from distributed.service import build
from distributed.settings import load_settings
from distributed.vram import estimate

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SPEC = load_catalog().get("gemma-3-270m")
CONTEXT = 512


async def test_a_node_starts_its_engine_with_the_slots_the_plan_gave(gemma_gguf: Path) -> None:
    # the shared models folder: the node's state and remembered peers live in this test's own
    # TARS_STATE_DIR (tests/conftest.py), so another test's "pc1" cannot leave it a cluster to wait on
    models_dir = gemma_gguf.parent
    engine_bin = os.environ.get("TARS_ENGINE_BIN", "")
    if locate(engine_bin) is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    two = estimate(SPEC, CONTEXT, gemma_gguf, slots=2).total_mb
    assert estimate(SPEC, CONTEXT, gemma_gguf, slots=3).total_mb > two
    gpu = GPUInfo(index=0, name="Simulated GPU", vram_total_mb=500 + two, vram_free_mb=500 + two)
    profile = HostProfile(hostname="pc1", cpu_model="test cpu", cpu_cores=2, ram_total_mb=16000, ram_free_mb=12000,
                          gpus=[gpu])
    settings = load_settings(None, node_name="pc1", models_dir=models_dir, context=CONTEXT, threads=1, parallel=4,
                             chat_engine="server", engine_bin=engine_bin, models=[SPEC.id])
    service = build(settings, profile=profile)
    node, app = service.node, create_app(service)
    async with app.router.lifespan_context(app):
        a = node.plan.where(SPEC.id)
        assert (a.device, a.n_gpu_layers, a.slots, a.vram_mb) == ("cuda:0", -1, 2, two)
        assert f"2 of 4 slots: the KV cache of 4 × {CONTEXT} tokens" in a.reason
        target = node.targets[SPEC.id]
        assert await target.wait_loaded(300) == "ready", target.error
        info = target.info()
        assert info["slots"]["total"] == 2
        argv = psutil.Process(info["engine"]["pid"]).cmdline()  # the running llama-server's own command line
        assert (argv[argv.index("-np") + 1], argv[argv.index("-c") + 1]) == ("2", str(2 * CONTEXT))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pc1",
                                     timeout=120) as client:
            r = await client.post("/v1/completions", json={"model": SPEC.id, "prompt": "The capital of France is",
                                                           "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
