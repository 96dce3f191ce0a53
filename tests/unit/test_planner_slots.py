"""The planner counts a KV cache per engine slot and lowers a model's slots where VRAM is short
(planner.py rule 6): whole on a GPU with all slots > fewer slots > split > partial offload > CPU.

These plan for llama-server (``slots`` > 1); the in-process engine and the fake backend plan
with ``slots=1`` (see test_planning.py for which engine gives which)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distributed.catalog import load_catalog
from distributed.domain import Assignment, Plan
from distributed.planner import plan
from distributed.vram import estimate
from tests.unit.test_planner import build, check_invariants, host, pair

CATALOG = load_catalog()
LLAMA2 = CATALOG.get("llama2-7b-chat")  # no GQA: 1 GB of KV cache per 2048 tokens, so slots are dear
QWEN14 = CATALOG.get("qwen2.5-14b-instruct")
BIG = CATALOG.get("mistral-small-24b")  # fits no single reference GPU
EMB = CATALOG.get("all-MiniLM-L6-v2")


def test_all_slots_when_they_fit_and_the_slots_are_recorded() -> None:
    hosts = pair()
    one = plan(hosts, [LLAMA2, EMB], context=2048, slots=1).where(LLAMA2.id)
    two = plan(hosts, [LLAMA2, EMB], context=2048, slots=2).where(LLAMA2.id)
    assert (one.slots, two.slots) == (1, 2) and two.node == "pc1" and two.n_gpu_layers == -1
    assert two.vram_mb - one.vram_mb == estimate(LLAMA2, 2048).kv_mb  # one more KV cache of 2048 tokens
    assert "at 2 × 2048 tokens" in two.reason and "slots:" not in two.reason
    assert plan(hosts, [LLAMA2, EMB], slots=2).where(EMB.id).slots is None  # embeddings have no slots


def test_a_model_whose_slots_do_not_fit_gets_fewer_and_the_reason_says_so() -> None:
    hosts = {"pc1": pair()["pc1"]}  # RTX 3060 12 GB: 11.5 GB after the reserve
    a = plan(hosts, [LLAMA2], context=4096, slots=4).where(LLAMA2.id)
    assert estimate(LLAMA2, 4096, slots=4).total_mb > 12288 - 500 >= estimate(LLAMA2, 4096, slots=3).total_mb
    assert (a.node, a.device, a.n_gpu_layers, a.slots) == ("pc1", "cuda:0", -1, 3)  # whole on the GPU, not offloaded
    assert a.vram_mb == estimate(LLAMA2, 4096, slots=3).total_mb
    assert "3 of 4 slots: the KV cache of 4 × 4096 tokens (8.0 GB) does not fit" in a.reason
    assert "at 3 × 4096 tokens" in a.reason


def test_fewer_slots_on_one_gpu_come_before_a_split() -> None:
    hosts = pair()
    a = plan(hosts, [QWEN14], context=4096, slots=4).where(QWEN14.id)
    assert estimate(QWEN14, 4096, slots=4).total_mb > 12288 - 500  # all 4 would need the pair's pooled VRAM
    assert a.split is None and (a.node, a.n_gpu_layers, a.slots) == ("pc1", -1, 3)
    assert "3 of 4 slots" in a.reason


def test_a_split_keeps_its_slots_when_they_fit_and_lowers_them_when_not() -> None:
    hosts = pair()
    full = plan(hosts, [BIG], context=2048, slots=4).where(BIG.id)
    assert full.split and full.slots == 4 and "slots:" not in full.reason
    lowered = plan(hosts, [BIG], context=4096, slots=8).where(BIG.id)
    assert lowered.split and 1 <= lowered.slots < 8
    assert f"{lowered.slots} of 8 slots: the KV cache of 8 × 4096 tokens" in lowered.reason
    more = plan(hosts, [BIG], context=4096, slots=lowered.slots + 1)
    assert more.where(BIG.id).slots == lowered.slots  # the most that split


def test_a_partial_offload_keeps_all_slots() -> None:
    """Past the GPU-whole and split steps the model no longer fits whole however few its slots:
    layers go to RAM, and the slots asked for stay (their KV cache goes with their layers)."""
    a = plan({"pc1": pair()["pc1"]}, [BIG], context=2048, slots=4).where(BIG.id)
    assert 0 < a.n_gpu_layers < estimate(BIG, 2048).n_layers and a.slots == 4 and a.ram_mb > 0


def test_other_chat_models_all_fit_whole_with_their_slots_before_any_is_lowered() -> None:
    """llama3.1-8b is placed before mistral-7b (bigger), and 2 of its 4 slots would fit the second
    GPU; but mistral-7b fits there whole with all 4, so it gets the GPU and llama3.1-8b is offloaded."""
    qwen, llama3, mistral = QWEN14, CATALOG.get("llama3.1-8b-instruct"), CATALOG.get("mistral-7b-instruct")
    hosts = {"g": host("g", estimate(qwen, 2048, slots=4).total_mb + 500, 5700 + 500)}
    assert estimate(llama3, 2048, slots=2).total_mb <= 5700 < estimate(llama3, 2048, slots=3).total_mb
    assert estimate(mistral, 2048, slots=4).total_mb <= 5700
    p = plan(hosts, [qwen, llama3, mistral], context=2048, slots=4)
    check_invariants(hosts, [qwen, llama3, mistral], p, 500)
    assert (p.where(qwen.id).device, p.where(qwen.id).slots) == ("cuda:0", 4)
    assert (p.where(mistral.id).device, p.where(mistral.id).n_gpu_layers, p.where(mistral.id).slots) == \
        ("cuda:1", -1, 4)
    assert p.where(llama3.id).n_gpu_layers != -1  # no GPU has room for it whole any more


def test_unplaced_says_it_needs_more_than_one_slot_takes() -> None:
    (u,) = plan({"tiny": host("tiny", 2048, ram_mb=2048)}, [LLAMA2], slots=4).unplaced
    assert "with 1 slot" in u.reason and f"{estimate(LLAMA2, 2048).total_mb / 1024:.1f} GB" in u.reason


def test_the_slots_cross_hosts_and_an_older_peers_assignment_still_loads() -> None:
    a = plan({"pc1": pair()["pc1"]}, [LLAMA2], context=4096, slots=4).where(LLAMA2.id)
    assert Plan.from_dict(Plan(assignments=[a]).to_dict()).assignments == [a]
    old = {k: v for k, v in a.to_dict().items() if k != "slots"}
    assert Assignment.from_dict(old).slots is None  # the engine then starts with TARS_PARALLEL


# --------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs=st.dictionaries(st.sampled_from(["pc1", "pc2", "pc3"]),
                          st.tuples(st.lists(st.integers(0, 24576), max_size=2), st.integers(1024, 65536)),
                          min_size=1, max_size=3),
       models=st.lists(st.sampled_from(CATALOG.all()), min_size=1, max_size=5, unique_by=lambda m: m.id),
       reserve=st.integers(0, 1024), context=st.sampled_from([512, 2048, 4096]), slots=st.integers(1, 8))
def test_property_slots_never_over_commit_and_are_said(hs, models, reserve, context, slots) -> None:
    hosts = build(hs)
    result = plan(hosts, models, reserve_mb=reserve, context=context, slots=slots)
    check_invariants(hosts, models, result, reserve, context)
    specs = {m.id: m for m in models}
    for a in result.assignments:
        spec = specs[a.model]
        if spec.kind != "chat" or spec.backend != "llama_cpp":
            assert a.slots is None
            continue
        assert 1 <= a.slots <= slots
        assert (f"{a.slots} of {slots} slots" in a.reason) == (a.slots < slots)
        if a.device != "cpu" and not a.split and a.n_gpu_layers == -1:
            assert a.vram_mb == estimate(spec, context, slots=a.slots).total_mb
    # deterministic, whatever order hosts and models are listed in
    again = plan(dict(reversed(list(hosts.items()))), list(reversed(models)), reserve_mb=reserve, context=context,
                 slots=slots)
    assert sorted(again.assignments, key=lambda a: a.model) == sorted(result.assignments, key=lambda a: a.model)
