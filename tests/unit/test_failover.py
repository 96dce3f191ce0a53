"""``failover.py``: serving a model here while the peer that runs it is down — a real node
(fake backend) and planner, a RemoteTarget whose scripted peer is dead."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from distributed.domain import GenerateRequest, HostProfile
from distributed.errors import ModelFailed, PeerUnavailable
from distributed.failover import fits_here, serve_here
from distributed.node import Node
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.targets import RemoteTarget
from tests.fakes import FakePeer

pytestmark = pytest.mark.anyio

CHAT, EMB, BASE, BIG = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "gemma-3-270m", "mistral-7b-instruct"


def node(tmp_path: Path, profile: HostProfile | None = None, extra: dict[str, Any] | None = None,
         **overrides: Any) -> Node:
    settings = load_settings(None, node_name="pc1", backend_override="fake", models=[CHAT, EMB],
                             models_dir=tmp_path, **overrides)
    n = Node(settings, profile or profile_host("rtx3060-12gb", "pc1"), backend_extra=extra)
    n.plan = n.plan_alone()  # what this host runs already (fits_here counts it)
    return n


def remote(n: Node, model: str = BASE, peer: FakePeer | None = None) -> RemoteTarget:
    t = RemoteTarget(model, "chat", peer or FakePeer(state="dead"), failover=lambda r, exc: serve_here(n, n.settings, r, exc))
    n.routes.set(t)
    return t


def down(model: str = BASE) -> PeerUnavailable:
    return PeerUnavailable(f"model '{model}' runs on pc2, which is dead", peer="pc2", model=model)


async def test_fallback_off_is_a_503_naming_the_peer_and_loads_nothing(tmp_path):
    n = node(tmp_path, fallback=False)
    t = remote(n)
    with pytest.raises(PeerUnavailable) as ei:
        await serve_here(n, n.settings, t, down())
    err = ei.value
    assert err.peer == "pc2" and err.http_status == 503
    assert "runs on pc2, which is dead" in err.message and "TARS_FALLBACK=false" in err.message
    assert n.routes.fallback_loads == 0 and t.standin is None
    with pytest.raises(PeerUnavailable, match="fallback is off"):  # what a request sees
        await t.generate(GenerateRequest(model=BASE, prompt="hi"))


async def test_a_model_that_does_not_fit_here_is_a_503_with_the_reason(tmp_path):
    small = HostProfile(hostname="pc1", cpu_model="cpu", cpu_cores=4, ram_total_mb=3000, ram_free_mb=2000)
    n = node(tmp_path, small)
    t = remote(n, BIG, FakePeer())
    t.peer.reachable = False  # it refused a connection: "unreachable"
    with pytest.raises(PeerUnavailable) as ei:
        await serve_here(n, n.settings, t, down(BIG))
    msg = ei.value.message
    assert "runs on pc2, which is unreachable, and it cannot run on pc1: " in msg and ei.value.peer == "pc2"
    assert n.routes.fallback_loads == 0 and t.standin is None  # nothing loaded, nothing held
    a, why = fits_here(n, n.settings, n.catalog.get(BIG))
    assert a is None and why and why in msg


async def test_the_stand_in_is_loaded_once_and_shared(tmp_path):
    n = node(tmp_path, extra={"load_delay_s": 0.05})
    t = remote(n)
    standins = await asyncio.gather(*(serve_here(n, n.settings, t, down()) for _ in range(5)))
    assert len({id(s) for s in standins}) == 1 and n.routes.fallback_loads == 1
    standin = standins[0]
    assert standin.local and standin.state == "ready" and t.standin is standin and not t.handoff
    assert n.routes.standins() == [standin]
    c = await t.generate(GenerateRequest(model=BASE, prompt="hi", max_tokens=4))  # a request goes there too
    assert c.fallback is True and c.node == "pc1" and n.routes.fallback_loads == 1
    await n.stop()


async def test_a_stand_in_that_fails_to_load_is_a_503_naming_the_peer(tmp_path):
    n = node(tmp_path, extra={"fail_models": [BASE]})
    t = remote(n)
    with pytest.raises(ModelFailed) as ei:
        await serve_here(n, n.settings, t, down())
    assert "loading it on pc1 as a fallback failed" in ei.value.message and ei.value.details["peer"] == "pc2"
    await n.stop()


async def test_fits_here_counts_what_this_host_runs_and_its_stand_ins(tmp_path):
    n = node(tmp_path)
    a, why = fits_here(n, n.settings, n.catalog.get(BASE))
    assert a is not None and a.node == "pc1" and a.model == BASE and why == ""
    n.profile = None
    assert fits_here(n, n.settings, n.catalog.get(BASE)) == (None, "pc1 has not profiled its hardware yet")


async def test_the_stand_in_runs_with_the_chat_template_its_deploy_asked_for(tmp_path):
    from distributed.domain import Assignment, Plan

    n = node(tmp_path)
    a = Assignment(model=BASE, kind="chat", node="pc2", device="cuda:0", quant="Q4_K_M", n_gpu_layers=-1,
                   vram_mb=300, reason="t", backend="llama_cpp", chat_template="chatml-tools")
    n.plan = Plan(assignments=[*n.plan.assignments, a])  # the plan puts BASE on pc2, with a deploy's template
    t = remote(n)
    standin = await serve_here(n, n.settings, t, down())
    assert standin.spec.chat_template == "chatml-tools"  # as its peer runs it, not the GGUF's own template
    assert n.catalog.get(BASE).chat_template is None
