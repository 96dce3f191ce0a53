"""``distributed/prefix.py``: prompt-prefix fingerprints, the replica index, slot pins."""

from __future__ import annotations

import asyncio

import pytest

from distributed.domain import GenerateRequest
from distributed.prefix import BLOCK_CHARS, MIN_MATCH_CHARS, Prefix, PrefixIndex, SlotPins

LONG = "Answer in the voice of a patient teacher. " * 12  # > MIN_MATCH_CHARS


def chat(*contents: str, system: str = LONG, **kw: object) -> GenerateRequest:
    messages = [{"role": "system", "content": system}]
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]
    return GenerateRequest(model="m", messages=messages, **kw)  # type: ignore[arg-type]


def test_a_later_turn_shares_the_earlier_turns_fingerprints_and_no_more():
    t1, t2 = Prefix.of(chat("q1")), Prefix.of(chat("q1", "a1", "q2"))
    assert len(t1.keys) == 3 and len(t2.keys) == 5  # head, system, then each message
    assert t2.keys[:3] == t1.keys and t2.common(t1) == t1.chars[-1] >= MIN_MATCH_CHARS
    assert Prefix.of(chat("q1")) == t1  # deterministic
    assert Prefix.of(chat("other")).common(t2) == t1.chars[1]  # the system prompt only


def test_the_head_counts_what_renders_before_the_messages():
    base = Prefix.of(chat("q1"))
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert Prefix.of(chat("q1", tools=tools)).common(base) == 0
    assert Prefix.of(GenerateRequest(model="n", messages=chat("q1").messages)).common(base) == 0
    # key order inside a message does not matter; part boundaries do
    swapped = GenerateRequest(model="m", messages=[{"content": LONG, "role": "system"}, {"content": "q1", "role": "user"}])
    assert Prefix.of(swapped) == base
    assert Prefix.from_parts([b"ab", b"c"]).keys[-1] != Prefix.from_parts([b"a", b"bc"]).keys[-1]


def test_a_raw_prompt_is_fingerprinted_in_blocks():
    text = "x" * (BLOCK_CHARS * 3 + 10)
    p = Prefix.of(GenerateRequest(model="m", prompt=text))
    longer = Prefix.of(GenerateRequest(model="m", prompt=text + " and more"))
    assert len(p.keys) == 1 + 4
    assert longer.common(p) == p.chars[3]  # the three whole blocks (and the head) match, the tail block differs


def test_a_short_shared_prefix_is_no_match():
    short = Prefix.of(chat("q1", system="Be brief."))
    assert Prefix.of(chat("q1", "a1", "q2", system="Be brief.")).common(short) == 0
    index = PrefixIndex()
    index.record(short, "pc2")
    assert index.longest(Prefix.of(chat("q1", "a1", "q2", system="Be brief."))) is None


def test_the_index_answers_the_longest_usable_prefix_and_forgets_the_oldest():
    index = PrefixIndex(size=8)
    index.record(Prefix.of(chat("q1")), "pc2")
    index.record(Prefix.of(chat("other question")), "pc3")  # the same system prompt: pc3 owns it now
    t2 = Prefix.of(chat("q1", "a1", "q2"))
    assert index.longest(t2) == ("pc2", Prefix.of(chat("q1")).chars[-1])
    assert index.longest(t2, usable=lambda o: o != "pc2") == ("pc3", t2.chars[1])  # the system prompt's owner
    assert index.longest(t2, usable=lambda o: False) is None
    for i in range(10):
        index.record(Prefix.of(chat(f"filler {i}", system=f"{i} {LONG}")), "pc4")
    assert len(index) == 8 and index.longest(t2) is None
    index.forget("pc4")
    assert len(index) == 0


def test_a_slot_is_chosen_by_shared_prefix_among_the_free_ones_else_least_recently_used():
    pins = SlotPins(3)
    a1, b1, c1 = (Prefix.of(chat("q1", system=f"{n} {LONG}")) for n in "abc")
    assert [pins.take(p) for p in (a1, b1, c1)] == [0, 1, 2] and pins.misses == 3
    assert pins.take(a1) is None  # all busy
    for s in (0, 1, 2):
        pins.give(s)
    a2 = Prefix.of(chat("q1", "a1", "q2", system=f"a {LONG}"))
    assert pins.take(a2) == 0 and pins.hits == 1  # conversation a's slot
    b2 = Prefix.of(chat("q1", "a1", "q2", system=f"b {LONG}"))
    assert pins.take(b2) == 1 and pins.hits == 2
    d1 = Prefix.of(chat("q1", system=f"d {LONG}"))
    assert pins.take(d1) == 2 and pins.misses == 4  # the one free slot
    pins.give(0), pins.give(1), pins.give(2)
    e1 = Prefix.of(chat("q1", system=f"e {LONG}"))
    assert pins.take(e1) == 0  # no match: the least recently taken (0, before 1 and 2)


@pytest.mark.anyio
async def test_pin_sends_id_slot_and_frees_it_on_error_or_cancel():
    pins = SlotPins(2)
    body: dict[str, object] = {}
    async with pins.pin(chat("q1"), body) as slot:
        assert body == {"id_slot": slot, "cache_prompt": True} and pins.busy == {slot}
    assert not pins.busy
    with pytest.raises(RuntimeError):
        async with pins.pin(chat("q1"), {}):
            raise RuntimeError("the engine went away")
    assert not pins.busy

    async def held() -> None:
        async with pins.pin(chat("q2"), {}):
            await asyncio.sleep(60)

    task = asyncio.ensure_future(held())
    while not pins.busy:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pins.busy
    off, body = SlotPins(2, enabled=False), {}
    async with off.pin(chat("q1"), body) as slot:
        assert slot is None and body == {} and off.info() == {"affinity": False, "hits": 0, "misses": 0}
