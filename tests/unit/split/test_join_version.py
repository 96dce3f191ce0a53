"""One llama.cpp on every host: a join from a host of another llama.cpp is refused naming both."""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import pytest

from distributed.api.app import create_app
from distributed.engine.binary import llama_cpp_python_version
from distributed.profiler import profile_host
from distributed.service import build
from distributed.settings import load_settings

pytestmark = pytest.mark.anyio
TOKEN = "cluster-secret"


async def join(split: str, llama_cpp: str) -> dict:
    settings = load_settings(node_name="pc1", host="127.0.0.2", port=18531, cluster_token=TOKEN,
                             backend_override="fake", models=["all-MiniLM-L6-v2"], split=split)
    app = create_app(build(settings, profile=profile_host("rtx3060-12gb", "pc1")))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://127.0.0.2:18531") as c:
            r = await c.post("/rpc", headers={"Authorization": f"Bearer {TOKEN}"}, json={
                "jsonrpc": "2.0", "id": 1, "method": "cluster.join",
                "params": {"name": "pc2", "url": "http://127.0.0.3:18532", "llama_cpp": llama_cpp,
                           "profile": profile_host("gtx1660s-6gb", "pc2").to_dict()}})
            return r.json()


async def test_another_llama_cpp_is_refused_at_join_naming_both_versions() -> None:
    mine = llama_cpp_python_version()
    if not mine:
        pytest.skip("llama-cpp-python is not installed: no version to compare")
    out = await join("auto", "0.0.1")
    err = out["error"]
    assert err["code"] == -32001, out
    assert "pc2 runs llama.cpp of llama-cpp-python 0.0.1" in err["message"] and f"pc1 runs {mine}" in err["message"]


async def test_the_same_llama_cpp_or_split_off_is_not_refused_for_it() -> None:
    mine = llama_cpp_python_version()
    for split, version in (("auto", mine), ("off", "0.0.1")):
        out = await join(split, version)
        assert "llama.cpp" not in str(out.get("error", {}).get("message", "")), out
