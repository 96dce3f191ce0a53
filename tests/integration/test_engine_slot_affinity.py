"""Slot affinity with a real llama-server (the embedded SmolLM2): a conversation's next turn is
pinned (``id_slot``) to the slot that ran its previous turn, and llama-server reuses that
slot's cached prefix — its own /metrics count far fewer prompt tokens processed than the
prompt has. Skips where no llama-server is built (scripts/build_engine.sh)."""

from __future__ import annotations

import os
import re

import pytest

from distributed.catalog import load_catalog
from distributed.domain import Assignment, Completion, GenerateRequest, TokenChunk
from distributed.engine.binary import locate
from distributed.engine.config import EngineConfig
from distributed.engine.target import EngineTarget
from distributed.settings import load_settings

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SPEC = load_catalog().get("smollm2-135m-instruct")
ASSIGN = Assignment(model=SPEC.id, kind="chat", node="n1", device="cpu", quant=SPEC.quant, n_gpu_layers=0,
                    vram_mb=0, reason="test", backend="llama_cpp")


def system(topic: str) -> dict[str, str]:
    rules = " ".join(f"Rule {i}: when asked about {topic}, answer in one short sentence." for i in range(40))
    return {"role": "system", "content": f"You are an expert on {topic}. {rules}"}


async def prompt_tokens_processed(t: EngineTarget) -> float:
    r = await t._client.get(t.base_url + "/metrics", timeout=5.0)
    m = re.search(r"^llamacpp:prompt_tokens_total\s+(\S+)", r.text, re.M)
    assert m, r.text[:500]
    return float(m.group(1))


async def ask(t: EngineTarget, messages: list[dict[str, str]]) -> tuple[str, Completion]:
    items = [i async for i in t.stream(GenerateRequest(messages=messages, max_tokens=12, temperature=0.0,
                                                       stream=True))]
    done = items[-1]
    assert isinstance(done, Completion)
    return "".join(i.text for i in items if isinstance(i, TokenChunk)), done


async def test_the_next_turn_runs_in_the_slot_that_holds_its_prefix(smollm2_gguf):
    binary = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if binary is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    config = EngineConfig.of(load_settings(), SPEC, ASSIGN, binary, slots=2, context=2048, threads=1, timeout_s=120)
    assert config.slot_affinity  # TARS_ROUTING=cache, the default
    t = EngineTarget(SPEC, ASSIGN, config, model_path=lambda: smollm2_gguf, node="n1")
    t.start()
    try:
        assert await t.wait_loaded(120) == "ready", t.error
        taken: list[int | None] = []
        take = t.pins.take
        t.pins.take = lambda prefix: taken.append(take(prefix)) or taken[-1]  # type: ignore[method-assign]

        a = [system("rivers"), {"role": "user", "content": "Name a long river."}]
        b = [system("mountains"), {"role": "user", "content": "Name a tall mountain."}]
        answer_a, first_a = await ask(t, a)
        _, first_b = await ask(t, b)
        assert taken[0] != taken[1]  # the second conversation took the other (never used) slot
        assert first_a.usage.prompt_tokens > 400

        before = await prompt_tokens_processed(t)
        a2 = [*a, {"role": "assistant", "content": answer_a}, {"role": "user", "content": "And another?"}]
        _, second_a = await ask(t, a2)
        processed = await prompt_tokens_processed(t) - before
        assert taken[2] == taken[0]  # conversation a's slot
        assert t.info()["slot_affinity"] == {"affinity": True, "hits": 1, "misses": 2}
        # only the new turn was prefilled: the slot still held the system prompt and turn 1
        assert second_a.usage.prompt_tokens > first_a.usage.prompt_tokens
        assert processed < second_a.usage.prompt_tokens / 4, (processed, second_a.usage.prompt_tokens)
        assert not t.pins.busy  # every slot given back
    finally:
        await t.close()
