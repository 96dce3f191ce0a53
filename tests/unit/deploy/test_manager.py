"""``Deployer`` (deploy/manager.py) on its own: the real desired set (over a real cluster
state), placement and planner over simulated hosts, this host's real ``Routes``, and a
scripted cluster (``PlanningCluster``) that counts re-plans — on the planner or on a host
that does not plan (it records the change all the same)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.deploy.manager import Deployer
from distributed.deploy.placement import Placement
from distributed.domain import Assignment, HostProfile, Plan
from distributed.errors import ModelNotFound, NoRoom, ValidationFailed
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.store import ModelStore
from distributed.targets import Routes, TargetState
from tests.fakes import StubTarget

pytestmark = pytest.mark.anyio

CHAT, EMB, RR, BIG = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2", "mistral-7b-instruct"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


STATE_FILE = "tars-state-pc1.json"


class Cluster:
    """What the Deployer uses of the cluster (``seams.PlanningCluster``)."""

    def __init__(self, hosts: dict[str, HostProfile], *, planner: bool = True) -> None:
        self._hosts = hosts
        self.planner = "pc1" if planner else "pc2"
        self.plan = Plan()
        self.replans = 0
        self.placement: Placement | None = None

    def hosts(self) -> dict[str, HostProfile]:
        return self._hosts

    async def replan(self) -> None:
        """The planner plans the desired set at once; elsewhere the plan comes later."""
        self.replans += 1
        if self.planner == "pc1" and self.placement is not None:
            self.plan = self.placement.plan(self._hosts)


def deployer(tmp_path: Path, hosts: dict[str, HostProfile] | None = None, *, planner: bool = True,
             routes: Routes | None = None) -> tuple[Deployer, Cluster]:
    settings = load_settings(None, node_name="pc1", backend_override="fake", models=[CHAT, EMB],
                             models_dir=tmp_path)
    catalog = load_catalog()
    placement = Placement(settings, catalog, ModelStore(tmp_path, catalog))
    cluster = Cluster(hosts or {"pc1": profile_host("rtx3060-12gb", "pc1")}, planner=planner)
    cluster.placement = placement
    return Deployer(settings, placement, routes or Routes("pc1"), cluster), cluster


def saved(tmp_path: Path) -> Placement:
    """The desired set as the next start reads it from disk."""
    settings = load_settings(None, node_name="pc1", backend_override="fake", models=[CHAT, EMB], models_dir=tmp_path)
    catalog = load_catalog()
    return Placement(settings, catalog, ModelStore(tmp_path, catalog))


async def test_deploy_persists_plans_and_applies_once(tmp_path):
    d, cluster = deployer(tmp_path)
    out = await d.deploy(RR)
    assert out["status"] == "deploying" and out["replicas"] == 1 and out["node"] is None
    assert [a["node"] for a in out["placement"]] == ["pc1"] and out["reason"]
    assert cluster.replans == 1
    assert saved(tmp_path).desired.models() == [CHAT, EMB, RR]  # survives a restart
    assert [s.id for s in saved(tmp_path).specs()] == [CHAT, EMB, RR]


async def test_the_same_deploy_again_is_unchanged_and_applies_nothing(tmp_path):
    d, cluster = deployer(tmp_path)
    await d.deploy(RR)
    out = await d.deploy(RR)
    assert out["status"] == "unchanged" and "already deployed" in out["message"] and cluster.replans == 1
    out = await d.deploy(CHAT)  # a model of TARS_MODELS is deployed as it is
    assert out["status"] == "unchanged" and cluster.replans == 1


async def test_a_model_that_failed_here_is_loaded_again(tmp_path):
    routes = Routes("pc1")
    d, cluster = deployer(tmp_path, routes=routes)
    await d.deploy(RR)
    routes.set(StubTarget(RR, "rerank", state=TargetState.FAILED))  # a pull that failed, say
    out = await d.deploy(RR)
    assert out["status"] == "retrying" and "had failed on pc1" in out["message"] and cluster.replans == 2


async def test_an_unknown_model_is_a_404_listing_the_catalog(tmp_path):
    d, cluster = deployer(tmp_path)
    with pytest.raises(ModelNotFound) as ei:
        await d.deploy("gpt-5")
    assert BIG in ei.value.message and RR in ei.value.message
    with pytest.raises(ModelNotFound) as ei:
        await d.remove(RR)  # not deployed: the error lists what is
    assert CHAT in ei.value.message and EMB in ei.value.message
    assert cluster.replans == 0 and saved(tmp_path).desired.models() == [CHAT, EMB]


async def test_no_room_says_what_it_needs_and_restores_the_desired_set(tmp_path):
    small = HostProfile(hostname="box", cpu_model="cpu", cpu_cores=4, ram_total_mb=3000, ram_free_mb=2000)
    d, cluster = deployer(tmp_path, {"pc1": small})
    await d.deploy(RR)
    before = (tmp_path / STATE_FILE).read_text()
    with pytest.raises(NoRoom) as ei:
        await d.deploy(BIG)
    err = ei.value
    assert "needs about" in err.message and "pc1: no GPU" in err.message and "2000 MB RAM free" in err.message
    assert err.details["needs_mb"] > 4000 and err.details["hosts"]["pc1"]["ram_free_mb"] == 2000
    assert BIG not in d.desired.models() and d.desired.models() == [CHAT, EMB, RR]  # restored in memory
    assert (tmp_path / STATE_FILE).read_text() == before and cluster.replans == 1  # nothing written or applied
    with pytest.raises(NoRoom):  # pinned to a host that has no room: the same, and restored
        await d.deploy(BIG, node="pc1")
    assert d.desired.get(BIG).node is None and BIG not in d.desired.models()


async def test_a_host_that_is_not_live_is_refused_naming_the_live_ones(tmp_path):
    d, cluster = deployer(tmp_path)
    with pytest.raises(ValidationFailed) as ei:
        await d.deploy(RR, node="pc9")
    assert ei.value.details["field"] == "node" and "live hosts: pc1" in ei.value.message
    assert cluster.replans == 0


async def test_replicas_go_to_other_hosts_and_say_when_some_have_no_room(tmp_path):
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2"),
             "pc3": profile_host("gtx1660s-6gb", "pc3")}
    d, _ = deployer(tmp_path, hosts)
    out = await d.deploy("gemma-3-270m", replicas=3)
    assert sorted(a["node"] for a in out["placement"]) == ["pc1", "pc2", "pc3"] and "message" not in out
    assert saved(tmp_path).desired.get("gemma-3-270m").replicas == 3
    d, _ = deployer(tmp_path / "two", {"pc1": hosts["pc1"]})
    out = await d.deploy("gemma-3-270m", replicas=2)
    assert len(out["placement"]) == 1 and "1 of 2 replicas placed" in out["message"]


async def test_pinned_to_a_host_it_is_placed_there(tmp_path):
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}
    d, _ = deployer(tmp_path, hosts)
    out = await d.deploy(RR, node="pc2")
    assert [a["node"] for a in out["placement"]] == ["pc2"] and out["reason"].startswith("deployed to pc2 as asked")
    a = d.placement.plan(hosts).where(RR)
    assert isinstance(a, Assignment) and a.node == "pc2"


async def test_remove_persists_and_applies(tmp_path):
    d, cluster = deployer(tmp_path)
    out = await d.remove(EMB)
    assert out == {"model": EMB, "status": "removing", "models": [CHAT], "planner": "pc1"} and cluster.replans == 1
    assert saved(tmp_path).desired.models() == [CHAT]  # a model of TARS_MODELS stays removed
    out = await d.deploy(EMB)  # and comes back when deployed again
    assert out["status"] == "deploying" and saved(tmp_path).desired.models() == [CHAT, EMB]


async def test_a_host_that_does_not_plan_records_the_change_and_asks_the_cluster(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    out = await d.deploy(RR, replicas=1, node="pc1")
    assert out["status"] == "deploying" and out["planner"] == "pc2" and cluster.replans == 1
    assert "has not planned it yet" in out["message"] and [a["node"] for a in out["placement"]] == ["pc1"]
    assert saved(tmp_path).desired.models() == [CHAT, EMB, RR]  # recorded here, replicated from here
    out = await d.remove(RR)
    assert out["status"] == "removing" and cluster.replans == 2 and saved(tmp_path).desired.models() == [CHAT, EMB]
    with pytest.raises(ModelNotFound):  # an unknown id is refused here
        await d.deploy("gpt-5")
