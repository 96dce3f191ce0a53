"""``Deployer`` (deploy/manager.py) on its own: the real desired set (over a real cluster
state), placement and planner over simulated hosts, this host's real ``Routes``, and a
scripted cluster (``PlanningCluster``) that counts re-plans — on the planner or on a host
that does not plan (it records the change all the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distributed.catalog import load_catalog
from distributed.cluster_state import ClusterState
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


async def test_no_room_says_what_it_needs_and_restores_the_desired_set(tmp_path, state_dir):
    small = HostProfile(hostname="box", cpu_model="cpu", cpu_cores=4, ram_total_mb=3000, ram_free_mb=2000)
    d, cluster = deployer(tmp_path, {"pc1": small})
    await d.deploy(RR)
    before = (state_dir / STATE_FILE).read_text()
    with pytest.raises(NoRoom) as ei:
        await d.deploy(BIG)
    err = ei.value
    assert "needs about" in err.message and "pc1: no GPU" in err.message and "2000 MB RAM free" in err.message
    assert err.details["needs_mb"] > 4000 and err.details["hosts"]["pc1"]["ram_free_mb"] == 2000
    assert BIG not in d.desired.models() and d.desired.models() == [CHAT, EMB, RR]  # restored in memory
    assert (state_dir / STATE_FILE).read_text() == before and cluster.replans == 1  # nothing written or applied
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


# ---------------------------------------------------------------------- issue 20: references and chat templates
REF = "hf.co/tars-test/Tiny-GGUF:Q4_K_M"


def _ref_spec() -> Any:
    from distributed.domain import ModelSpec

    return ModelSpec(id=REF, kind="chat", backend="llama_cpp", params_b=0.135, quant="Q4_K_M", context=2048,
                     repo="tars-test/Tiny-GGUF", file="tiny-Q4_K_M.gguf", size_mb=100, n_layers=30, n_embd=576,
                     n_head_kv=3, head_dim=64, revision="a" * 40)


async def test_a_deploys_chat_template_is_kept_planned_and_compared(tmp_path):
    d, cluster = deployer(tmp_path)
    out = await d.deploy(RR, chat_template="chatml-tools")
    assert out["status"] == "deploying" and out["placement"][0]["chat_template"] == "chatml-tools"
    assert saved(tmp_path).desired.get(RR).chat_template == "chatml-tools"  # in the replicated state's file
    plan = d.placement.plan(cluster.hosts())
    assert plan.where(RR).chat_template == "chatml-tools" and plan.where(CHAT).chat_template is None
    assert (await d.deploy(RR, chat_template="chatml-tools"))["status"] == "unchanged"
    assert (await d.deploy(RR))["status"] == "deploying" and cluster.replans == 2  # its own template again
    assert d.placement.plan(cluster.hosts()).where(RR).chat_template is None


async def test_a_template_that_does_not_ship_is_refused_before_anything(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    with pytest.raises(ValidationFailed) as ei:
        await d.deploy(RR, chat_template="/etc/passwd")  # over the network a template is named, never a path
    assert ei.value.details["field"] == "chat_template" and "chatml-tools" in ei.value.message
    assert cluster.replans == 0 and RR not in d.desired and saved(tmp_path).desired.models() == [CHAT, EMB]


async def test_a_host_that_does_not_plan_resolves_a_reference_and_shares_its_spec(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    d.placement.catalog.remember(_ref_spec())  # resolved here (modelref.resolve leaves it so; no hub in a unit test)
    out = await d.deploy(REF, chat_template="chatml-tools")
    assert out["status"] == "deploying" and out["model"] == REF and cluster.replans == 1
    assert d.desired.specs()[REF]["revision"] == "a" * 40  # spec:<ref> in the replicated state
    # the planner (another host, a catalog that never resolved it) learns the spec from the state
    settings = load_settings(None, node_name="pc2", backend_override="fake", models=[CHAT, EMB],
                             models_dir=tmp_path / "pc2")
    catalog = load_catalog()
    state = ClusterState.for_settings(settings)
    other = Placement(settings, catalog, ModelStore(tmp_path / "pc2", catalog), state=state)
    assert REF not in catalog
    merged = state.merge(d.placement.state.wire(), "pc1")
    assert not merged.refused and {f"spec:{REF}", f"desired:{REF}"} <= set(merged.changed)
    plan = other.plan(cluster.hosts())
    assert plan.where(REF) is not None and plan.where(REF).chat_template == "chatml-tools"
    assert catalog.get(REF).file == "tiny-Q4_K_M.gguf" and list(plan.specs) == [REF]
    assert d.desired.note_spec(REF, d.desired.specs()[REF]) is False  # the same spec again writes nothing
    with pytest.raises(ValidationFailed) as ei:  # a malformed reference: refused where it arrives
        await d.deploy("hf.co/not a repo")
    assert ei.value.details["field"] == "model" and cluster.replans == 1


async def test_the_plan_carries_the_spec_of_a_resolved_reference(tmp_path):
    d, cluster = deployer(tmp_path)
    d.placement.catalog.remember(_ref_spec())  # as modelref.resolve leaves it
    out = await d.deploy(REF)
    assert out["status"] == "deploying" and out["model"] == REF
    plan = d.placement.plan(cluster.hosts())
    assert list(plan.specs) == [REF] and plan.specs[REF]["revision"] == "a" * 40  # catalog ids travel as ids
    from distributed.domain import Plan

    other = load_catalog()  # a worker's catalog: it never resolved the reference
    assert REF not in other
    other.learn(Plan.from_dict(plan.to_dict()).specs)  # Node.apply_plan: over the wire, then learned
    assert other.get(REF).file == "tiny-Q4_K_M.gguf" and other.get(REF).n_layers == 30
