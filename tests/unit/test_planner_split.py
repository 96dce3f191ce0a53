"""Pooled VRAM: a model no single GPU holds is split by layers across hosts (issue 10.1)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed.catalog import load_catalog
from distributed.domain import Plan
from distributed.planner import plan, split_layers
from distributed.profiler import profile_host
from distributed.vram import estimate
from tests.unit.test_planner import check_invariants, host

CATALOG = load_catalog()
BIG = CATALOG.get("mistral-small-24b")


def pair() -> dict:
    return {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}


# --------------------------------------------------------------------------- the reference pair
def test_mistral_small_24b_is_split_across_the_reference_pair() -> None:
    hosts = pair()
    models = CATALOG.select(["mistral-small-24b", "all-MiniLM-L6-v2"])
    result = plan(hosts, models)
    check_invariants(hosts, models, result, 500)
    a = result.where("mistral-small-24b")
    est = estimate(BIG, 2048)
    assert est.total_mb > 12288 - 500  # no GPU of the pair holds it alone
    # the engine runs on the host with the most VRAM; its share comes first
    assert (a.node, a.device, a.n_gpu_layers, a.ram_mb) == ("pc1", "cuda:0", -1, 0)
    assert [s["node"] for s in a.split] == ["pc1", "pc2"] and a.split_nodes == ["pc2"]
    layers = {s["node"]: s["layers"] for s in a.split}
    assert sum(layers.values()) == est.n_layers == 40
    assert layers["pc1"] > layers["pc2"] > 0  # in proportion to VRAM: 12 GB vs 6 GB
    assert a.vram_mb == a.split[0]["vram_mb"]
    # the one-line reason names the sizes and the layers on each host with its GPU
    assert "needs 14.1 GB" in a.reason and "no GPU has it" in a.reason
    assert f"{layers['pc1']} of 40 layers on pc1 RTX 3060" in a.reason
    assert f"{layers['pc2']} layers on pc2 GTX 1660 SUPER" in a.reason
    # the embeddings still fit next to the worker's share on pc2
    assert result.where("all-MiniLM-L6-v2").node == "pc2" and not result.unplaced


def test_layers_follow_the_room_after_reserve_and_kv_cache() -> None:
    hosts = pair()
    a = plan(hosts, [BIG]).where(BIG.id)
    est = estimate(BIG, 2048)
    rest = est.total_mb - est.overhead_mb - round(est.n_layers * est.layer_mb)
    room1 = 12288 - 500 - est.overhead_mb - rest
    room2 = 6144 - 500 - est.overhead_mb
    expected_pc1 = 40 * room1 / (room1 + room2)
    assert abs(a.split[0]["layers"] - expected_pc1) <= 1
    for share in a.split:  # each share: runtime + compute buffer + its layers (weights and KV cache)
        extra = rest if share["node"] == "pc1" else 0
        assert abs(share["vram_mb"] - (est.overhead_mb + share["layers"] * est.layer_mb + extra)) <= 2


def test_a_bigger_context_moves_layers_but_keeps_every_gpu_within_budget() -> None:
    hosts = pair()
    small = plan(hosts, [BIG], context=2048).where(BIG.id)
    big = plan(hosts, [BIG], context=8192)
    check_invariants(hosts, [BIG], big, 500, 8192)
    a = big.where(BIG.id)
    if a is not None and a.split:
        assert sum(s["vram_mb"] for s in a.split) > sum(s["vram_mb"] for s in small.split)


def test_split_is_preferred_over_a_partial_offload() -> None:
    result = plan(pair(), [BIG])
    assert result.where(BIG.id).split and "CPU" not in result.where(BIG.id).reason


def test_split_off_falls_back_to_a_partial_offload() -> None:
    a = plan(pair(), [BIG], split=False).where(BIG.id)
    assert a.split is None and a.node == "pc1" and 0 < a.n_gpu_layers < 40 and a.ram_mb > 0
    assert "the rest on its CPU" in a.reason


def test_a_model_that_fits_one_gpu_is_never_split() -> None:
    for model in ("qwen2.5-14b-instruct", "gemma-3-12b-it", "llama3.1-8b-instruct", "qwen2.5-7b-instruct"):
        a = plan(pair(), [CATALOG.get(model)]).where(model)
        assert a.split is None and (a.node, a.n_gpu_layers) == ("pc1", -1), model


def test_the_fewest_hosts_that_hold_it() -> None:
    hosts = {"a": host("a", 12288), "b": host("b", 10240), "c": host("c", 8192)}
    a = plan(hosts, [BIG]).where(BIG.id)
    assert [s["node"] for s in a.split] == ["a", "b"]  # two are enough: c stays out of it
    three = {"a": host("a", 6144), "b": host("b", 6144), "c": host("c", 6144)}
    result = plan(three, [BIG])
    check_invariants(three, [BIG], result, 500)
    assert sorted(s["node"] for s in result.where(BIG.id).split) == ["a", "b", "c"]


def test_not_enough_vram_even_together_is_a_partial_offload_or_cpu() -> None:
    hosts = {"a": host("a", 6144, ram_mb=65536), "b": host("b", 4096)}
    result = plan(hosts, [BIG])
    a = result.where(BIG.id)
    assert a.split is None and a.ram_mb > 0  # 9 GB of GPUs cannot hold 14 GB


def test_cpu_only_hosts_are_never_split_across() -> None:
    hosts = {"a": profile_host("cpu", "a"), "b": profile_host("cpu", "b")}
    a = plan(hosts, [BIG]).where(BIG.id)
    assert a is None or a.split is None


def test_only_gguf_chat_models_split() -> None:
    hosts = {"a": host("a", 3072), "b": host("b", 3072)}
    models = CATALOG.select(["phi-2"])  # 8-bit transformers: cannot split by layers
    a = plan(hosts, models).where("phi-2")
    assert a is None or a.split is None


def test_split_round_trips_through_json_and_old_plans_still_load() -> None:
    result = plan(pair(), CATALOG.select(["mistral-small-24b", "all-MiniLM-L6-v2"]))
    assert Plan.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    old = result.to_dict()
    for a in old["assignments"]:
        a.pop("split")  # a plan from a host of the previous version
    assert all(a.split is None for a in Plan.from_dict(old).assignments)


# --------------------------------------------------------------------------- split_layers
def test_split_layers_rounds_to_the_proportion_and_respects_caps() -> None:
    assert split_layers(40, [10000, 5000], [40, 40]) in ([27, 13], [26, 14])
    assert split_layers(40, [10000, 5000], [40, 10]) == [30, 10]
    assert split_layers(40, [1, 1], [20, 19]) is None
    assert split_layers(3, [1, 1, 1], [1, 1, 1]) == [1, 1, 1]


@given(n=st.integers(1, 200), rooms=st.lists(st.integers(1, 50000), min_size=2, max_size=5),
       data=st.data())
def test_property_split_layers_sums_and_caps(n, rooms, data) -> None:
    caps = data.draw(st.lists(st.integers(0, 200), min_size=len(rooms), max_size=len(rooms)))
    out = split_layers(n, rooms, caps)
    if sum(caps) < n:
        assert out is None
    else:
        assert out is not None and sum(out) == n and all(0 <= x <= c for x, c in zip(out, caps))
        assert out == split_layers(n, rooms, caps)  # deterministic


# --------------------------------------------------------------------------- properties
gpu_mb = st.integers(min_value=0, max_value=16384)
host_st = st.builds(lambda v, r: (v, r), st.lists(gpu_mb, max_size=2), st.integers(2048, 65536))
hosts_st = st.dictionaries(st.sampled_from(["pc1", "pc2", "pc3", "nas"]), host_st, min_size=2, max_size=4)
big_models = [s for s in CATALOG.all() if s.backend == "llama_cpp" and not s.embedded]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs=hosts_st, models=st.lists(st.sampled_from(big_models + CATALOG.defaults()), min_size=1, max_size=4,
                                    unique_by=lambda m: m.id),
       reserve=st.integers(0, 1024), context=st.sampled_from([512, 2048, 8192]))
def test_property_splits_never_over_commit_and_sum_to_the_layer_count(hs, models, reserve, context) -> None:
    hosts = {n: host(n, *vram, ram_mb=ram) for n, (vram, ram) in hs.items()}
    result = plan(hosts, models, reserve_mb=reserve, context=context)
    check_invariants(hosts, models, result, reserve, context)  # counts every share on its GPU
    for a in result.assignments:
        if a.split and len(models) == 1:  # alone, it is split only when no single GPU could hold it whole
            est = estimate(next(m for m in models if m.id == a.model), context)
            assert est.total_mb > max(g.vram_total_mb - reserve for h in hosts.values() for g in h.gpus)
    # deterministic, whatever order hosts and models are listed in
    again = plan(dict(reversed(list(hosts.items()))), list(reversed(models)), reserve_mb=reserve, context=context)
    key = lambda a: a.model  # noqa: E731
    assert sorted(again.assignments, key=key) == sorted(result.assignments, key=key)
