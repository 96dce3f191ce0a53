"""The plan counts a KV cache per engine slot for GGUF chat models (TARS_PARALLEL), nothing for others."""

from __future__ import annotations

from distributed import planner, profiler
from distributed.catalog import load_catalog
from distributed.engine.choice import engine_slots
from distributed.settings import load_settings
from distributed.vram import estimate, with_slots


def test_kv_cache_per_slot_in_the_estimate_and_the_plan():
    cat = load_catalog()
    chat = cat.get("mistral-7b-instruct")
    embed = cat.get("all-MiniLM-L6-v2")
    one = estimate(chat, 2048)
    four = with_slots(one, chat, 4)
    assert four.kv_mb == 4 * one.kv_mb and four.total_mb == one.total_mb + 3 * one.kv_mb
    assert four.context == 2048 and four.slots == 4 and "4 engine slots" in four.notes[-1]
    assert with_slots(estimate(embed, 512), embed, 4) == estimate(embed, 512)
    hosts = {"pc1": profiler.profile_host("rtx3060-12gb", "pc1")}
    a1 = planner.plan(hosts, [chat], context=2048).where(chat.id)
    a4 = planner.plan(hosts, [chat], context=2048, slots=4).where(chat.id)
    assert a4.vram_mb - a1.vram_mb == 3 * one.kv_mb


def test_engine_slots_follow_the_engine_choice(tmp_path):
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\necho 'version: 1 (x)' >&2\n")
    exe.chmod(0o755)
    assert engine_slots(load_settings(engine_bin=str(exe), parallel=6)) == 6
    assert engine_slots(load_settings(engine_bin=str(exe), parallel=6, chat_engine="inprocess")) == 1
    assert engine_slots(load_settings(engine_bin=str(tmp_path / "none"), parallel=6)) == 1
    assert engine_slots(load_settings(engine_bin=str(exe), parallel=6, backend_override="fake")) == 1
