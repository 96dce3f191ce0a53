"""The one planning entry (distributed/planning.py): options from Settings and the chat engine,
the same numbers for every caller (node, cluster, deploy, failover), and the engine started
with the slots the plan counted.

Which engine each test plans for is explicit: ``llama_server_found`` (a TARS_ENGINE_BIN the
engine choice accepts: TARS_PARALLEL slots) or TARS_CHAT_ENGINE=inprocess / the fake backend
(one slot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distributed import failover, planner
from distributed.catalog import load_catalog
from distributed.cluster import Cluster
from distributed.deploy.manager import Deployer
from distributed.domain import HostProfile, Plan
from distributed.engine.choice import engine_target
from distributed.node import Node
from distributed.planning import PlanOptions, options, plan_for
from distributed.profiler import profile_host
from distributed.settings import load_settings

CATALOG = load_catalog()
LLAMA2, EMB = "llama2-7b-chat", "all-MiniLM-L6-v2"


def settings_of(tmp_path: Path, **kw: Any) -> Any:
    return load_settings(None, node_name="pc1", models_dir=tmp_path / "models", **kw)


def test_options_follow_the_settings_and_the_chat_engine(tmp_path: Path, llama_server_found: str) -> None:
    server = settings_of(tmp_path, engine_bin=llama_server_found, parallel=8, context=4096, vram_reserve_mb=700)
    assert options(server) == PlanOptions(reserve_mb=700, context=4096, split=True, slots=8)
    inproc = settings_of(tmp_path, engine_bin=llama_server_found, parallel=8, chat_engine="inprocess")
    assert (options(inproc).slots, options(inproc).split) == (1, False)  # one request at a time, no RPC
    no_build = settings_of(tmp_path, engine_bin=str(tmp_path / "none"), parallel=8)
    assert (options(no_build).slots, options(no_build).split) == (1, False)
    assert options(settings_of(tmp_path, engine_bin=llama_server_found, parallel=8, backend_override="fake")).slots == 1
    assert options(settings_of(tmp_path, engine_bin=llama_server_found, split="off")).split is False


def test_plan_for_is_the_pure_planner_with_those_options(tmp_path: Path, llama_server_found: str) -> None:
    s = settings_of(tmp_path, engine_bin=llama_server_found, parallel=4, context=4096)
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}
    for ids in ([LLAMA2, EMB], ["mistral-small-24b"]):
        specs = CATALOG.select(ids)
        assert plan_for(s, hosts, specs) == planner.plan(hosts, specs, reserve_mb=500, context=4096, split=True,
                                                         slots=4)
    assert plan_for(s, hosts, CATALOG.select([LLAMA2])).where(LLAMA2).slots == 3  # 4 do not fit the 3060
    assert plan_for(s, hosts, CATALOG.select(["mistral-small-24b"])).where("mistral-small-24b").split


@pytest.fixture
def node(tmp_path: Path, llama_server_found: str) -> Node:
    """pc1 (RTX 3060 12 GB) serving llama2-7b-chat and the embeddings, planned for llama-server
    with 4 slots of 4096 tokens (only 3 fit)."""
    s = settings_of(tmp_path, engine_bin=llama_server_found, parallel=4, context=4096, models=[LLAMA2, EMB])
    return Node(s, profile_host("rtx3060-12gb", "pc1"))


def test_node_cluster_and_deployer_plan_with_the_same_numbers(node: Node) -> None:
    expected = planner.plan({"pc1": node.profile}, node.model_specs(), reserve_mb=500, context=4096, slots=4)
    assert expected.where(LLAMA2).slots == 3 and "3 of 4 slots" in expected.where(LLAMA2).reason
    assert node.plan_alone() == expected
    cluster = Cluster(node, node.settings)
    assert cluster.control.proposal() == expected
    deployer = Deployer(node.settings, node.placement, node.routes, cluster)  # runtime deploys: the same placement
    assert deployer.placement.plan({"pc1": node.profile}) == expected
    assert node.plan_alone() == expected and cluster.control.proposal() == expected


def test_failover_fits_here_counts_the_slots_as_the_cluster_does(node: Node) -> None:
    cluster_plan = Cluster(node, node.settings).control.proposal()
    node.plan = Plan(assignments=[a for a in cluster_plan.assignments if a.model != LLAMA2])  # it ran elsewhere
    a, why = failover.fits_here(node, node.settings, CATALOG.get(LLAMA2))
    assert why == "" and a == cluster_plan.where(LLAMA2)
    assert (a.vram_mb, a.slots) == (cluster_plan.where(LLAMA2).vram_mb, 3)
    # a host too small for even one slot: no assignment, and the planner's reason
    node.profile = HostProfile(hostname="pc1", cpu_model="cpu", cpu_cores=4, ram_total_mb=3000, ram_free_mb=2000)
    node.plan = Plan()
    none, why = failover.fits_here(node, node.settings, CATALOG.get(LLAMA2))
    assert none is None and "fits nowhere" in why and "with 1 slot" in why


def test_the_engine_starts_with_the_planned_slots(node: Node, tmp_path: Path) -> None:
    a = node.plan_alone().where(LLAMA2)
    t = engine_target(node, CATALOG.get(LLAMA2), a)
    argv = t.argv(tmp_path / "m.gguf")
    assert (argv[argv.index("-np") + 1], argv[argv.index("-c") + 1]) == ("3", str(3 * 4096))
    assert t.config.slots == 3
    import dataclasses

    older = dataclasses.replace(a, slots=None)  # a plan from a peer that predates Assignment.slots
    argv = engine_target(node, CATALOG.get(LLAMA2), older).argv(tmp_path / "m.gguf")
    assert argv[argv.index("-np") + 1] == "4"  # TARS_PARALLEL, as before
