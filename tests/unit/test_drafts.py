"""The planner's rule 7 (drafts.py): a model's draft is placed beside it — its VRAM counted on
the model's GPU, or on another GPU of the host (--device-draft), or in RAM beside a CPU model —
only where room is left, and the reason says so; planning.plan_for passes the drafts only
where this install would run them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from distributed.catalog import check_drafts, load_catalog
from distributed.errors import ConfigError
from distributed.planner import plan
from distributed.planning import drafts_for, plan_for
from distributed.settings import load_settings
from distributed.vram import RUNTIME_MB, estimate
from tests.unit.test_planner import check_invariants, host, pair

CAT = load_catalog()
SMOL = CAT.get("smollm2-135m-instruct")
QWEN7 = CAT.get("qwen2.5-7b-instruct") if "qwen2.5-7b-instruct" in CAT else CAT.get("mistral-7b-instruct")
TARGET = replace(QWEN7, draft=SMOL.id)
EMB = CAT.get("all-MiniLM-L6-v2")
DRAFTS = {TARGET.id: SMOL}


def draft_mb(slots: int, context: int = 2048) -> int:
    return estimate(replace(SMOL, context=max(SMOL.context, context)), context, slots=slots).total_mb


def test_the_draft_goes_on_the_models_gpu_with_its_vram_counted_and_said():
    hosts = pair()
    without = plan(hosts, [TARGET, EMB], context=2048, slots=4).where(TARGET.id)
    result = plan(hosts, [TARGET, EMB], context=2048, slots=4, drafts=DRAFTS)
    a = result.where(TARGET.id)
    beside = draft_mb(4) - RUNTIME_MB  # no second CUDA runtime: it lives in the model's process
    assert a.draft == {"model": SMOL.id, "device": a.device, "vram_mb": beside, "ram_mb": 0}
    assert a.vram_mb == without.vram_mb + beside and (a.node, a.device, a.slots) == (without.node, without.device, 4)
    assert a.reason == without.reason + f"; plus draft {SMOL.id}, {beside} MB on {a.device}"
    assert result.where(EMB.id).draft is None
    check_invariants(hosts, [TARGET, EMB], result, 500)  # no GPU over-committed, drafts included


def test_the_draft_counts_a_kv_cache_per_slot_at_the_models_context():
    hosts = {"pc1": host("pc1", 24576)}
    one = plan(hosts, [TARGET], context=4096, slots=1, drafts=DRAFTS).where(TARGET.id)
    four = plan(hosts, [TARGET], context=4096, slots=4, drafts=DRAFTS).where(TARGET.id)
    kv = estimate(SMOL, 4096).kv_mb
    assert four.draft["vram_mb"] - one.draft["vram_mb"] == 3 * kv > 0


def test_a_draft_never_takes_the_room_of_a_model_or_a_slot():
    """A GPU just big enough for the model and its slots: the draft is left out, saying why."""
    need = estimate(TARGET, 2048, slots=2).total_mb
    hosts = {"pc1": host("pc1", need + 500 + 10)}  # + the reserve, + 10 MB: far less than the draft
    a = plan(hosts, [TARGET], context=2048, slots=2, drafts=DRAFTS).where(TARGET.id)
    assert (a.slots, a.n_gpu_layers, a.draft) == (2, -1, None)
    assert f"; draft {SMOL.id} left out: it needs {draft_mb(2) - RUNTIME_MB} MB on cuda:0 (10 MB free)" in a.reason


def test_a_second_gpu_of_the_host_takes_the_draft_when_the_first_is_full():
    need = estimate(TARGET, 2048, slots=1).total_mb
    hosts = {"pc1": host("pc1", need + 500 + 10, 4096)}
    a = plan(hosts, [TARGET], context=2048, slots=1, drafts=DRAFTS).where(TARGET.id)
    assert (a.device, a.n_gpu_layers) == ("cuda:0", -1)
    assert a.draft == {"model": SMOL.id, "device": "cuda:1", "vram_mb": draft_mb(1), "ram_mb": 0}
    assert a.vram_mb == need  # the draft's own GPU pays for it (a CUDA runtime there too)
    assert f"plus draft {SMOL.id}, {draft_mb(1)} MB on its own GPU cuda:1 (cuda:0 has 10 MB free)" in a.reason


def test_a_model_on_a_cpu_gets_its_draft_in_ram():
    hosts = {"box": host("box", ram_mb=32768)}
    a = plan(hosts, [replace(SMOL, id="smol-big", draft=SMOL.id)], context=2048, slots=4,
             drafts={"smol-big": SMOL}).where("smol-big")
    ram = estimate(SMOL, 2048, slots=4).ram_mb
    assert a.device == "cpu" and a.draft == {"model": SMOL.id, "device": "cpu", "vram_mb": 0, "ram_mb": ram}
    assert a.reason.endswith(f"; plus draft {SMOL.id}, {ram} MB of RAM")


def test_a_split_or_partly_offloaded_model_runs_without_its_draft():
    big = replace(CAT.get("mistral-small-24b"), draft=SMOL.id)
    split = plan(pair(), [big], context=2048, slots=1, drafts={big.id: SMOL}).where(big.id)
    assert split.split and split.draft is None and f"no draft: {SMOL.id} is not used by a model split" in split.reason
    alone = plan({"pc1": pair()["pc1"]}, [big], context=2048, slots=1, drafts={big.id: SMOL}).where(big.id)
    assert alone.n_gpu_layers >= 0 and alone.draft is None and "is partly offloaded" in alone.reason


# --------------------------------------------------------------------------- planning.plan_for
@pytest.fixture
def server(tmp_path) -> str:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\necho 'version: 1 (x)' >&2\n")
    exe.chmod(0o755)
    return str(exe)


def test_plan_for_runs_drafts_only_where_this_install_would(server, tmp_path):
    hosts = {"pc1": pair()["pc1"]}
    for mode, engine, want in (("auto", server, True), ("draft", server, True), ("ngram", server, False),
                               ("off", server, False), ("auto", str(tmp_path / "none"), False)):
        s = load_settings(speculative=mode, engine_bin=engine, models_dir=tmp_path)
        assert (drafts_for(s, [TARGET, EMB]) == DRAFTS) is want, (mode, engine)
        a = plan_for(s, hosts, [TARGET, EMB]).where(TARGET.id)
        assert (a.draft is not None) is want and ("plus draft" in a.reason) is want
    # the caller's catalog is where the ids are looked up
    s = load_settings(speculative="auto", engine_bin=server, models_dir=tmp_path)
    assert drafts_for(s, [replace(TARGET, draft="nope")], catalog=CAT) == {}
    assert drafts_for(s, [TARGET], catalog=CAT) == DRAFTS


# --------------------------------------------------------------------------- the catalog field
def test_the_catalog_checks_what_a_draft_names(tmp_path: Path):
    user = tmp_path / "catalog.toml"
    entry = ('[[model]]\nid = "my-chat"\nkind = "chat"\nbackend = "llama_cpp"\nparams_b = 1.0\nquant = "Q4_K_M"\n'
             'context = 4096\npath = "my.gguf"\n')
    user.write_text(entry + 'draft = "smollm2-135m-instruct"\n')
    assert load_catalog(user_file=user).get("my-chat").draft == SMOL.id
    for bad, says in (('draft = "nope"', "field 'draft' names 'nope', which is not in the catalog"),
                      ('draft = "all-MiniLM-L6-v2"', "which is a embed model on sentence"),
                      ("draft = 3", "field 'draft' must be the id of a draft model")):
        user.write_text(entry + bad + "\n")
        with pytest.raises(ConfigError) as e:
            load_catalog(user_file=user)
        assert says in e.value.message
    with pytest.raises(ConfigError, match="field 'draft' is for GGUF chat models"):
        check_drafts(type(CAT)([replace(EMB, draft=SMOL.id), SMOL]))


def test_tars_plan_json_shows_the_draft():
    from distributed.cli.hardware import plan_json

    out = plan_json(plan(pair(), [TARGET, EMB], context=2048, slots=4, drafts=DRAFTS))
    row = next(r for r in out["assignments"] if r["model"] == TARGET.id)
    assert row["draft"]["model"] == SMOL.id and "plus draft" in row["reason"]
    assert "draft" not in next(r for r in out["assignments"] if r["model"] == EMB.id)
