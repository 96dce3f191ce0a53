"""``PlanApplier.met``: a plan applied before this node knew one of its hosts is completed when
that host joins — no later plan may come (the CI failure of stop 23: pc2 accepted the plan
of three replicas before it had met pc3, and never routed to pc3's copy)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from distributed.domain import Assignment, Plan
from distributed.plan_apply import PlanApplier
from distributed.targets import RemoteTarget, ReplicaSet, Routes
from tests.fakes import FakePeer, StubTarget

pytestmark = pytest.mark.anyio


def place(model: str, node: str) -> Assignment:
    return Assignment(model=model, kind="chat", node=node, device="cpu", quant="Q4", n_gpu_layers=0, vram_mb=0,
                      reason="test")


class Peer(FakePeer):
    def steady(self, settle_s: float) -> bool:
        return False


class Table(dict[str, Peer]):
    def __iter__(self) -> Any:
        return iter(list(self.values()))


class Node:
    def __init__(self) -> None:
        self.name = "pc2"
        self.routes = Routes("pc2")

    async def apply_plan(self, plan: Plan) -> None:
        await self.routes.apply_local({a.model: a for a in plan.for_node(self.name)},
                                      lambda a: StubTarget(a.model, a.kind, self.name))


async def test_a_host_met_after_the_plan_joins_the_replicas_and_gets_its_own_models():
    node, table = Node(), Table(pc1=Peer("pc1"))
    applier = PlanApplier(node, table, SimpleNamespace(heartbeat_s=0.5, embed_max_batch=32), failover=None)
    plan = Plan(assignments=[place("r", "pc1"), place("r", "pc2"), place("r", "pc3"), place("only3", "pc3")])
    assert await applier.apply(plan, "p4")
    rs = node.routes.replicas["r"]
    assert isinstance(rs, ReplicaSet) and set(rs.remotes) == {"pc1"}  # pc3 is not known yet
    assert "only3" not in node.routes.targets

    applier.met(table["pc1"])  # a host the plan already routes to: nothing changes
    assert set(rs.remotes) == {"pc1"}

    table["pc3"] = pc3 = Peer("pc3")
    applier.met(pc3)  # pc3 joins: the plan in force is completed, with no new plan
    assert node.routes.replicas["r"] is rs and set(rs.remotes) == {"pc1", "pc3"} and rs.remotes["pc3"].peer is pc3
    only3 = node.routes.targets["only3"]
    assert isinstance(only3, RemoteTarget) and only3.peer is pc3
    member = rs.remotes["pc3"]
    applier.met(pc3)  # it rejoins: the members are kept
    assert rs.remotes["pc3"] is member and node.routes.targets["only3"] is only3
    await node.routes.close()


async def test_met_before_any_plan_does_nothing():
    node = Node()
    applier = PlanApplier(node, Table(), SimpleNamespace(heartbeat_s=0.5, embed_max_batch=32), failover=None)
    applier.met(Peer("pc3"))
    assert node.routes.targets == {} and node.routes.replicas == {}
