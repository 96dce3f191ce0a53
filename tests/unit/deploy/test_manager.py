"""``Deployer`` (deploy/manager.py) on its own: the real desired set, placement and planner
over simulated hosts, this host's real ``Routes``, and a scripted cluster (``PlanningCluster``)
that counts re-plans or stands for a worker that forwards to its server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distributed.catalog import load_catalog
from distributed.deploy.manager import Deployer
from distributed.deploy.placement import Placement
from distributed.deploy.state import STATE_FILE
from distributed.domain import Assignment, HostProfile
from distributed.errors import ConfigError, ModelNotFound, NoRoom, ValidationFailed
from distributed.profiler import profile_host
from distributed.settings import load_settings
from distributed.store import ModelStore
from distributed.targets import Routes, TargetState
from tests.fakes import StubTarget

pytestmark = pytest.mark.anyio

CHAT, EMB, RR, BIG = "smollm2-135m-instruct", "all-MiniLM-L6-v2", "ms-marco-MiniLM-L-6-v2", "mistral-7b-instruct"


class Server:
    """The planning host's client as a worker sees it: records what is forwarded."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method: str, params: dict[str, Any], **kw: Any) -> dict[str, Any]:
        self.sent.append((method, params))
        return {"model": params["model"], "status": "forwarded"}


class Cluster:
    """What the Deployer uses of the cluster (``seams.PlanningCluster``)."""

    def __init__(self, hosts: dict[str, HostProfile], *, planner: bool = True) -> None:
        self._hosts = hosts
        self.is_planner = planner
        self.server = Server()
        self.replans = 0
        self.joined = True

    def planner_client(self) -> Any:
        if self.is_planner:
            return None
        if not self.joined:
            raise ConfigError("pc2 is a worker that has not joined its server yet; retry shortly")
        return self.server

    def hosts(self) -> dict[str, HostProfile]:
        return self._hosts

    async def replan(self) -> None:
        self.replans += 1


def deployer(tmp_path: Path, hosts: dict[str, HostProfile] | None = None, *, planner: bool = True,
             routes: Routes | None = None) -> tuple[Deployer, Cluster]:
    settings = load_settings(None, node_name="pc1", backend_override="fake", models=[CHAT, EMB],
                             models_dir=tmp_path)
    catalog = load_catalog()
    placement = Placement(settings, catalog, ModelStore(tmp_path, catalog))
    cluster = Cluster(hosts or {"pc1": profile_host("rtx3060-12gb", "pc1")}, planner=planner)
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
    assert cluster.replans == 0 and not (tmp_path / STATE_FILE).exists()


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
    assert out == {"model": EMB, "status": "removing", "models": [CHAT]} and cluster.replans == 1
    assert saved(tmp_path).desired.models() == [CHAT]  # a model of TARS_MODELS stays removed
    out = await d.deploy(EMB)  # and comes back when deployed again
    assert out["status"] == "deploying" and saved(tmp_path).desired.models() == [CHAT, EMB]


async def test_a_worker_forwards_to_the_planning_host(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    assert (await d.deploy(RR, replicas=2, node="pc1"))["status"] == "forwarded"
    assert (await d.remove(RR))["status"] == "forwarded"
    assert cluster.server.sent == [("models.deploy", {"model": RR, "replicas": 2, "node": "pc1"}),
                                   ("models.remove", {"model": RR})]
    assert cluster.replans == 0 and not (tmp_path / STATE_FILE).exists()  # the server owns the set
    with pytest.raises(ModelNotFound):  # an unknown id is refused here, before forwarding
        await d.deploy("gpt-5")
    cluster.joined = False
    with pytest.raises(ConfigError, match="not joined"):
        await d.deploy(RR)


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
    assert saved(tmp_path).desired.get(RR).chat_template == "chatml-tools"  # in the desired-set file
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
    assert cluster.server.sent == [] and cluster.replans == 0


async def test_a_worker_forwards_a_reference_unresolved_with_its_template(tmp_path):
    d, cluster = deployer(tmp_path, planner=False)
    await d.deploy(REF, chat_template="chatml-tools")  # no hub here: the planning host resolves it
    assert cluster.server.sent == [("models.deploy", {"model": REF, "replicas": None, "node": None,
                                                      "chat_template": "chatml-tools"})]
    with pytest.raises(ValidationFailed) as ei:  # a malformed reference: refused where it arrives
        await d.deploy("hf.co/not a repo")
    assert ei.value.details["field"] == "model" and len(cluster.server.sent) == 1


async def test_the_plan_carries_the_spec_of_a_resolved_reference(tmp_path):
    d, cluster = deployer(tmp_path)
    d.placement.catalog.remember(_ref_spec())  # as modelref.resolve leaves it
    out = await d.deploy(REF)
    assert out["status"] == "deploying" and out["model"] == REF
    plan = d.placement.plan(cluster.hosts())
    assert list(plan.specs) == [REF] and plan.specs[REF]["revision"] == "a" * 40  # catalog ids travel as ids
    from distributed.catalog import load_catalog
    from distributed.domain import Plan

    other = load_catalog()  # a worker's catalog: it never resolved the reference
    assert REF not in other
    other.learn(Plan.from_dict(plan.to_dict()).specs)  # Node.apply_plan: over the wire, then learned
    assert other.get(REF).file == "tiny-Q4_K_M.gguf" and other.get(REF).n_layers == 30
