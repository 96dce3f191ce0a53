"""``Routes``, the one owner of target swaps: plans applied here (make before break),
handoff, stand-ins adopted, fallback loaded once — with scripted targets and peers, no
sleeps: each load ends when the test says so."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from distributed.domain import Assignment, Plan
from distributed.node import Node
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.targets import RemoteTarget, Routes, Target, TargetState
from tests.cluster_support import until

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def place(model: str, node: str = "pc1", device: str = "cpu", kind: str = "chat") -> Assignment:
    return Assignment(model=model, kind=kind, node=node, device=device, quant="Q4", n_gpu_layers=0, vram_mb=0,
                      reason="test")


class Scripted(Target):
    """A local target whose load ends when the test calls ``finish``."""

    def __init__(self, a: Assignment, log: list[str]) -> None:
        self.model, self.kind, self.node, self.assignment = a.model, a.kind, "pc1", a
        self._state = TargetState.LOADING
        self._loaded = asyncio.Event()
        self.closed = False
        self.log = log

    @property
    def state(self) -> TargetState:
        return self._state

    def start(self) -> None:
        self.log.append(f"load {self.model}@{self.assignment.device}")

    def finish(self, state: TargetState = TargetState.READY) -> None:
        self._state = state
        self._loaded.set()

    async def wait_loaded(self, timeout: float | None = None) -> TargetState:
        await self._loaded.wait()
        return self._state

    async def close(self) -> None:
        self.closed = True
        self.log.append(f"close {self.model}@{self.assignment.device}")
        self._state = TargetState.UNAVAILABLE

    def stream(self, req: Any) -> Any:
        raise NotImplementedError

    async def embed(self, req: Any) -> Any:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"id": self.model, "state": self.state}


class Peer:
    def __init__(self, name: str = "pc2") -> None:
        self.name, self.state, self.reachable = name, "alive", True
        self.gone = asyncio.Event()
        self.client = None
        self.models: dict[str, dict[str, Any]] = {}

    def model_info(self, model: str) -> dict[str, Any] | None:
        return self.models.get(model)

    def failed(self, why: str) -> None:
        self.reachable = False


class World:
    def __init__(self) -> None:
        self.routes = Routes("pc1")
        self.log: list[str] = []
        self.made: list[Scripted] = []

    def make(self, a: Assignment) -> Scripted:
        t = Scripted(a, self.log)
        self.made.append(t)
        return t

    def routed_to_peer(self, model: str = "a") -> tuple[Peer, RemoteTarget]:
        """``model`` served by a live peer where it is ready, and routed there."""
        peer = Peer()
        peer.models[model] = {"id": model, "state": "ready"}
        remote = RemoteTarget(model, "chat", peer)
        self.routes.set(remote)
        return peer, remote


async def test_apply_local_loads_keeps_reloads_and_unloads():
    w = World()
    await w.routes.apply_local({"a": place("a"), "b": place("b")}, w.make)
    assert w.log == ["load a@cpu", "load b@cpu"] and set(w.routes.targets) == {"a", "b"}
    for t in w.made:
        t.finish()
    # same placement: kept; new placement for b: the old copy unloads before the new one loads (VRAM)
    await w.routes.apply_local({"a": place("a"), "b": place("b", device="cuda:0")}, w.make)
    assert w.log[2:] == ["close b@cpu", "load b@cuda:0"]
    # b no longer assigned here: unloaded and no longer routed
    await w.routes.apply_local({"a": place("a")}, w.make)
    assert w.log[4:] == ["close b@cuda:0"] and list(w.routes.targets) == ["a"]
    assert [t.model for t in w.routes.local()] == ["a"]


async def test_a_failed_model_is_loaded_again_by_the_next_plan():
    w = World()
    await w.routes.apply_local({"a": place("a")}, w.make)
    w.made[0].finish(TargetState.FAILED)
    await w.routes.apply_local({"a": place("a")}, w.make)
    assert w.log == ["load a@cpu", "close a@cpu", "load a@cpu"] and w.routes.targets["a"] is w.made[1]


async def test_a_model_arriving_from_a_live_peer_stays_there_until_the_copy_here_has_loaded():
    w = World()
    _, remote = w.routed_to_peer()
    await w.routes.apply_local({"a": place("a")}, w.make)
    assert w.routes.targets["a"] is remote  # make before break: still routed to the peer
    w.made[0].finish()
    await until(lambda: w.routes.targets["a"] is w.made[0], what="routed to the copy here")


async def test_route_to_peer_keeps_the_ready_copy_as_handoff_until_the_peer_is_ready():
    w = World()
    await w.routes.apply_local({"a": place("a")}, w.make)
    copy = w.made[0]
    copy.finish()
    peer = Peer()
    peer.models["a"] = {"id": "a", "state": "loading"}
    w.routes.route_to_peer(place("a", node="pc2"), peer, lambda handoff: RemoteTarget("a", "chat", peer,
                                                                                      handoff=handoff))
    remote = w.routes.targets["a"]
    assert isinstance(remote, RemoteTarget) and remote.standin is copy and remote.handoff and not copy.closed
    assert w.routes.computes_here(remote)
    w.routes.settle(peer)  # still loading there: kept
    assert remote.standin is copy
    peer.models["a"]["state"] = "ready"
    w.routes.settle(peer)
    await until(lambda: remote.standin is None and copy.closed, what="the handoff copy dropped and closed")
    assert not w.routes.computes_here(remote)


async def test_fallback_is_loaded_once_and_adopted_when_the_plan_assigns_the_model_here():
    w = World()
    peer, remote = w.routed_to_peer()
    peer.failed("refused")
    standins = await asyncio.gather(*(w.routes.fallback(remote, lambda: w.make(place("a"))) for _ in range(5)))
    assert len({id(s) for s in standins}) == 1 and w.routes.fallback_loads == 1 and w.log == ["load a@cpu"]
    assert remote.standin is standins[0] and not remote.handoff
    w.routes.settle(peer)  # unreachable: a stale "ready" drops nothing
    assert remote.standin is standins[0]
    w.routes.adopt_standin(place("a"))  # the plan now puts it here, placed the same: no second load
    await until(lambda: w.routes.targets["a"] is standins[0], what="the stand-in adopted")
    assert w.log == ["load a@cpu"]


async def test_node_apply_plan_swaps_through_routes():
    settings = load_settings(node_name="pc1", backend_override="fake", models=["gemma-3-270m", "all-MiniLM-L6-v2"])
    node = Node(settings, profile=profile_host("rtx3060-12gb", "pc1"))
    plan = node.plan_alone()
    await node.apply_plan(plan)
    assert sorted(node.targets) == ["all-MiniLM-L6-v2", "gemma-3-270m"]
    for t in node.local_targets():
        assert await t.wait_loaded(10) == "ready"
    chat = node.targets["gemma-3-270m"]
    await node.apply_plan(Plan(assignments=[a for a in plan.assignments if a.kind == "embed"]))
    assert list(node.targets) == ["all-MiniLM-L6-v2"] and chat.state == "unavailable"
    assert node.health()[0]
    await node.stop()
    assert node.targets == {}
