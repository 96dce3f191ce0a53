"""``Routes``, the one owner of target swaps: plans applied here (make before break),
handoff, stand-ins adopted, fallback loaded once — with scripted targets and peers, no
sleeps: each load ends when the test says so."""

from __future__ import annotations

import asyncio

import pytest

from distributed.domain import Assignment, Plan
from distributed.errors import ModelLoading
from distributed.node import Node
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.targets import RemoteTarget, ReplicaSet, Routes, TargetState
from tests.fakes import FakePeer, StubTarget
from tests.cluster_support import until

pytestmark = pytest.mark.anyio


def place(model: str, node: str = "pc1", device: str = "cpu", kind: str = "chat") -> Assignment:
    return Assignment(model=model, kind=kind, node=node, device=device, quant="Q4", n_gpu_layers=0, vram_mb=0,
                      reason="test")


class Scripted(StubTarget):
    """A local target whose load ends when the test calls ``finish``."""

    def __init__(self, a: Assignment, log: list[str]) -> None:
        super().__init__(a.model, a.kind, "pc1", TargetState.LOADING)
        self.assignment = a
        self._loaded = asyncio.Event()
        self.closed = False
        self.log = log

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


Peer = FakePeer


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


async def test_node_apply_plan_swaps_through_routes(tmp_path):
    settings = load_settings(node_name="pc1", backend_override="fake", models=["gemma-3-270m", "all-MiniLM-L6-v2"],
                             models_dir=tmp_path)
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


# ----------------------------------------------------------------------------- resolve and replicas
async def test_resolve_is_the_routing_question_and_here_never_forwards_again():
    w = World()
    assert w.routes.resolve("a") is None  # not routed: the node says 404 or why it is not placed
    await w.routes.apply_local({"a": place("a")}, w.make)
    copy = w.made[0]
    assert w.routes.resolve("a") is copy and w.routes.resolve("a", here=True) is copy
    peer = Peer()
    peer.models["b"] = {"id": "b", "state": "ready"}
    remote = RemoteTarget("b", "chat", peer)
    w.routes.set(remote)
    assert w.routes.resolve("b") is remote
    with pytest.raises(ModelLoading) as ei:  # a forwarded call for a model this host does not compute
        w.routes.resolve("b", here=True)
    assert "not served by pc1" in ei.value.message and "pc2" in ei.value.message
    copy.finish()
    remote.hold(copy, handoff=True)  # the copy here serves while the model moves: computed here
    assert w.routes.resolve("b", here=True) is remote


def member(a: Assignment, peer: Peer) -> RemoteTarget:
    return RemoteTarget(a.model, a.kind, peer, failover=None, assignment=a.to_dict())


async def test_replicate_installs_a_replica_set_over_the_copy_here_and_each_peer():
    w = World()
    pc2, pc3 = Peer("pc2"), Peer("pc3")
    known: dict[str, Peer] = {"pc2": pc2}  # pc3 is not known yet
    plan = [place("a"), place("a", node="pc2"), place("a", node="pc3"), place("b")]
    await w.routes.apply_local({"a": place("a"), "b": place("b")}, w.make)
    w.routes.replicate(plan, known.get, member)
    rs = w.routes.replicas["a"]
    assert isinstance(rs, ReplicaSet) and set(rs.remotes) == {"pc2"} and "b" not in w.routes.replicas
    assert rs.local_member() is w.routes.targets["a"]
    assert w.routes.resolve("a") is rs  # a request arriving here: the set picks the copy
    assert w.routes.resolve("a", here=True) is w.routes.targets["a"]  # a forwarded one: the copy here
    assert w.routes.resolve("b") is w.routes.targets["b"]
    known["pc3"] = pc3
    pc2_member = rs.remotes["pc2"]
    w.routes.replicate(plan, known.get, member)  # the next plan: pc3 joins, pc2's member is kept
    assert w.routes.replicas["a"] is rs and set(rs.remotes) == {"pc2", "pc3"} and rs.remotes["pc2"] is pc2_member
    rows = {r["id"]: r for r in w.routes.describe()}
    assert [x["node"] for x in rows["a"]["replicas"]] == ["pc1", "pc2", "pc3"] and "replicas" not in rows["b"]
    w.routes.replicate([place("a"), place("b")], known.get, member)  # back to one copy: the set goes
    assert w.routes.replicas == {} and w.routes.resolve("a") is w.routes.targets["a"]
    await w.routes.close()


async def test_a_replicated_model_not_here_is_refused_for_forwarded_calls():
    w = World()
    pc2, pc3 = Peer("pc2"), Peer("pc3")
    pc2.models["a"] = pc3.models["a"] = {"id": "a", "state": "ready"}
    w.routes.set(RemoteTarget("a", "chat", pc2))  # the table keeps one host of the model
    w.routes.replicate([place("a", node="pc2"), place("a", node="pc3")], {"pc2": pc2, "pc3": pc3}.get, member)
    rs = w.routes.resolve("a")
    assert isinstance(rs, ReplicaSet) and rs.local_member() is None and set(rs.remotes) == {"pc2", "pc3"}
    with pytest.raises(ModelLoading):
        w.routes.resolve("a", here=True)
