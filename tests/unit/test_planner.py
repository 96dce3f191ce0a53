"""The planner: properties that must hold for any cluster, and the reference cases."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed.catalog import load_catalog
from distributed.domain import GPUInfo, HostProfile, ModelSpec, Plan
from distributed.planner import plan, ram_budget_mb, recommend
from distributed.profiler import profile_host
from distributed.vram import estimate

CATALOG = load_catalog()
ALL = CATALOG.all()


def host(name: str, *vram_mb: int, ram_mb: int = 32768) -> HostProfile:
    gpus = [GPUInfo(index=i, name=f"GPU{i}", vram_total_mb=v, vram_free_mb=v) for i, v in enumerate(vram_mb)]
    return HostProfile(hostname=name, cpu_model="test CPU", cpu_cores=8, ram_total_mb=ram_mb,
                       ram_free_mb=ram_mb, gpus=gpus)


def pair() -> dict[str, HostProfile]:
    return {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}


def check_invariants(hosts: dict[str, HostProfile], models: list[ModelSpec], result: Plan, reserve: int,
                     context: int = 2048) -> None:
    """What must hold for every plan (used by the property tests and the examples)."""
    ids = [m.id for m in models]
    placed = [a.model for a in result.assignments]
    unplaced = [u.model for u in result.unplaced]
    # every model placed or unplaced, exactly once, with a reason
    assert sorted(placed + unplaced) == sorted(set(ids))
    assert all(a.reason.strip() for a in result.assignments)
    assert all(u.reason.strip() for u in result.unplaced)
    # no GPU over-committed; devices exist; layer counts consistent with the device
    used: dict[tuple[str, str], int] = defaultdict(int)
    ram: dict[str, int] = defaultdict(int)
    specs = {m.id: m for m in models}
    for a in result.assignments:
        assert a.node in hosts
        ram[a.node] += a.ram_mb
        if a.device == "cpu":
            assert a.vram_mb == 0 and a.n_gpu_layers == 0
            continue
        # a split model takes VRAM on every GPU of its split (the engine's share is a.vram_mb)
        shares = a.split or [{"node": a.node, "device": a.device, "vram_mb": a.vram_mb}]
        assert shares[0]["node"] == a.node and shares[0]["vram_mb"] == a.vram_mb
        for share in shares:
            idx = int(share["device"].split(":")[1])
            gpu = next(g for g in hosts[share["node"]].gpus if g.index == idx)
            used[(share["node"], share["device"])] += share["vram_mb"]
            assert used[(share["node"], share["device"])] <= gpu.vram_total_mb - reserve, \
                f"{share['node']} {share['device']} over-committed"
        if a.split:
            assert sum(s["layers"] for s in a.split) == estimate(specs[a.model], context).n_layers
            assert all(s["layers"] > 0 for s in a.split) and len({s["node"] for s in a.split}) == len(a.split)
            assert a.n_gpu_layers == -1 and a.ram_mb == 0 and specs[a.model].backend == "llama_cpp"
        assert a.vram_mb > 0
        if a.n_gpu_layers != -1:  # partial offload: only llama.cpp can split layers
            assert specs[a.model].backend == "llama_cpp" and a.n_gpu_layers > 0 and a.ram_mb > 0
    for node, mb in ram.items():
        assert mb <= ram_budget_mb(hosts[node]), f"{node} RAM over-committed"


# --------------------------------------------------------------------------- properties
gpu_mb = st.integers(min_value=0, max_value=49152)
host_st = st.builds(lambda v, r: (v, r), st.lists(gpu_mb, max_size=3), st.integers(512, 131072))
hosts_st = st.dictionaries(st.sampled_from(["pc1", "pc2", "pc3", "nas", "laptop"]), host_st, min_size=1, max_size=4)
models_st = st.lists(st.sampled_from(ALL), min_size=1, max_size=len(ALL), unique_by=lambda m: m.id)


def build(hs: dict[str, tuple[list[int], int]]) -> dict[str, HostProfile]:
    return {name: host(name, *vram, ram_mb=ram) for name, (vram, ram) in hs.items()}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs=hosts_st, models=models_st, reserve=st.integers(0, 4096), context=st.integers(128, 32768))
def test_property_never_over_commits_and_accounts_for_every_model(hs, models, reserve, context) -> None:
    hosts = build(hs)
    result = plan(hosts, models, reserve_mb=reserve, context=context)
    check_invariants(hosts, models, result, reserve, context)


@settings(max_examples=60, deadline=None)
@given(hs=hosts_st, models=models_st, reserve=st.integers(0, 2048))
def test_property_same_input_same_plan_in_any_order(hs, models, reserve) -> None:
    hosts = build(hs)
    first = plan(hosts, models, reserve_mb=reserve)
    assert plan(hosts, models, reserve_mb=reserve) == first
    # the order hosts and models are listed in does not change the decisions
    shuffled = plan(dict(reversed(list(hosts.items()))), list(reversed(models)), reserve_mb=reserve)
    key = lambda a: a.model  # noqa: E731
    assert sorted(shuffled.assignments, key=key) == sorted(first.assignments, key=key)
    assert sorted(shuffled.unplaced, key=lambda u: u.model) == sorted(first.unplaced, key=lambda u: u.model)


# --------------------------------------------------------------------------- reference cases
def test_reference_pair_chat_on_12gb_embeddings_on_6gb() -> None:
    hosts = pair()
    models = CATALOG.select(["mistral-7b-instruct", "all-MiniLM-L6-v2"])
    result = plan(hosts, models)
    check_invariants(hosts, models, result, 500)
    chat, emb = result.where("mistral-7b-instruct"), result.where("all-MiniLM-L6-v2")
    assert (chat.node, chat.device, chat.n_gpu_layers, chat.quant) == ("pc1", "cuda:0", -1, "Q4_K_M")
    assert (emb.node, emb.device) == ("pc2", "cuda:0")
    assert "most usable VRAM" in chat.reason and "kept off the chat host pc1" in emb.reason
    assert chat.vram_mb == estimate(models[0], 2048).total_mb


def test_reference_pair_with_the_embedded_defaults_and_hosts_listed_backwards() -> None:
    hosts = dict(reversed(list(pair().items())))
    result = plan(hosts, CATALOG.defaults())
    assert result.where("smollm2-135m-instruct").node == "pc1"
    assert result.where("all-MiniLM-L6-v2").node == "pc2"


def test_reference_pair_puts_8bit_small_models_on_the_other_host() -> None:
    hosts = pair()
    models = CATALOG.select(["mistral-7b-instruct", "all-MiniLM-L6-v2", "phi-2"])
    result = plan(hosts, models)
    check_invariants(hosts, models, result, 500)
    phi = result.where("phi-2")
    assert (phi.node, phi.quant, phi.n_gpu_layers) == ("pc2", "int8", -1)
    assert result.where("mistral-7b-instruct").node == "pc1"


def test_single_host_serves_everything_on_its_gpu() -> None:
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1")}
    models = CATALOG.select(["mistral-7b-instruct", "all-MiniLM-L6-v2"])
    result = plan(hosts, models)
    check_invariants(hosts, models, result, 500)
    assert {(a.node, a.device) for a in result.assignments} == {("pc1", "cuda:0")}
    assert "only host" in result.where("all-MiniLM-L6-v2").reason
    assert not result.unplaced


def test_cpu_only_host_runs_everything_on_cpu() -> None:
    hosts = {"box": profile_host("cpu", "box")}
    models = CATALOG.select(["gemma-3-270m", "all-MiniLM-L6-v2", "mistral-7b-instruct"])
    result = plan(hosts, models)
    check_invariants(hosts, models, result, 500)
    assert {a.device for a in result.assignments} == {"cpu"}
    assert all("no GPU in the cluster" in a.reason for a in result.assignments)
    assert result.where("mistral-7b-instruct").ram_mb >= estimate(models[2], 2048).weights_mb


def test_tiny_gpu_gets_a_partial_offload() -> None:
    hosts = {"old": host("old", 2048, ram_mb=16384)}
    spec = CATALOG.get("mistral-7b-instruct")
    result = plan(hosts, [spec])
    check_invariants(hosts, [spec], result, 500)
    a = result.where(spec.id)
    assert a.device == "cuda:0" and 0 < a.n_gpu_layers < 32
    assert a.vram_mb <= 2048 - 500 and a.ram_mb > 0
    assert f"{a.n_gpu_layers} of 32 layers" in a.reason
    est = estimate(spec, 2048)
    assert est.vram_for_layers(a.n_gpu_layers + 1) > 2048 - 500  # as many layers as fit, not fewer


def test_model_too_big_for_anything_is_unplaced_with_the_reason() -> None:
    hosts = {"pi": host("pi", ram_mb=2048)}
    result = plan(hosts, CATALOG.select(["mistral-7b-instruct", "gemma-3-270m"]))
    assert [u.model for u in result.unplaced] == ["mistral-7b-instruct"]
    assert "RAM" in result.unplaced[0].reason and "VRAM" in result.unplaced[0].reason
    assert result.where("gemma-3-270m").device == "cpu"


def test_no_hosts_means_everything_unplaced() -> None:
    result = plan({}, CATALOG.defaults())
    assert not result.assignments and {u.model for u in result.unplaced} == {"smollm2-135m-instruct", "all-MiniLM-L6-v2"}


def test_reserve_is_respected_exactly() -> None:
    spec = CATALOG.get("mistral-7b-instruct")
    need = estimate(spec, 2048).total_mb
    fits = plan({"g": host("g", need + 500)}, [spec], reserve_mb=500).where(spec.id)
    assert fits.n_gpu_layers == -1
    short = plan({"g": host("g", need + 499)}, [spec], reserve_mb=500).where(spec.id)
    assert 0 < short.n_gpu_layers < 32


def test_a_bigger_context_costs_more_vram() -> None:
    spec = CATALOG.get("llama2-7b-chat")
    small = plan({"g": host("g", 24576)}, [spec], context=1024).where(spec.id)
    big = plan({"g": host("g", 24576)}, [spec], context=4096).where(spec.id)
    assert big.vram_mb - small.vram_mb >= 3 * 512  # 32 layers x 32 KV heads x 128 x 2 (K,V) x 2 bytes per token


def test_plan_uses_the_gguf_on_disk_when_given(gemma_gguf: Path) -> None:
    spec = CATALOG.get("gemma-3-270m")
    result = plan({"g": host("g", 8192)}, [spec], paths={spec.id: gemma_gguf})
    assert result.where(spec.id).vram_mb == estimate(spec, 2048, gemma_gguf).total_mb
    assert estimate(spec, 2048, gemma_gguf).source == "gguf"


def test_plan_round_trips_through_json() -> None:
    result = plan(pair(), ALL)
    assert Plan.from_dict(result.to_dict()) == result


# --------------------------------------------------------------------------- recommend
def test_recommend_for_the_reference_pair() -> None:
    picks = [s.id for s in recommend(pair(), ALL)]
    # the biggest 4-bit GGUF chat model that the 12 GB GPU holds whole (a split model is not recommended)
    assert picks[0] == "qwen2.5-14b-instruct"
    assert "all-MiniLM-L6-v2" in picks
    assert any(CATALOG.get(p).backend == "hf8bit" for p in picks)
    check_invariants(pair(), CATALOG.select(picks), plan(pair(), CATALOG.select(picks)), 500)
    assert not plan(pair(), CATALOG.select(picks)).unplaced


def test_recommend_for_a_cpu_host_sticks_to_the_embedded_defaults() -> None:
    picks = [s.id for s in recommend({"box": profile_host("cpu", "box")}, ALL)]
    assert picks == ["smollm2-135m-instruct", "all-MiniLM-L6-v2"]
