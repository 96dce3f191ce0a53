"""GenerationQueue (engine/inprocess.py), the in-process chat engine: one generation at a time
in FIFO order, bounds, cancellation, timeouts; and the thread → loop channel its tokens cross."""

from __future__ import annotations

import asyncio
import threading

import pytest

from distributed.backends.base import BackendOptions
from distributed.backends.fake import FakeChatBackend
from distributed.domain import Assignment, GenerateRequest, ModelSpec
from distributed.engine.inprocess import GenerationQueue, _Channel
from distributed.errors import Overloaded, RequestTimeout, TarsError
from tests.support import until

pytestmark = pytest.mark.anyio


def _chat(token_delay: float = 0.0, reply_tokens: int | None = 5) -> FakeChatBackend:
    spec = ModelSpec(id="m", kind="chat", backend="fake", params_b=0.1, quant="Q4_K_M", context=512)
    a = Assignment(model="m", kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0, reason="t")
    extra = {"token_delay_s": token_delay}
    if reply_tokens is not None:
        extra["reply_tokens"] = reply_tokens
    b = FakeChatBackend(spec, a, BackendOptions(context=512, extra=extra))
    b.load()
    return b


def _queue(b: FakeChatBackend, max_waiting: int = 4, timeout_s: float = 10.0) -> GenerationQueue:
    return GenerationQueue(b.stream, max_waiting=max_waiting, timeout_s=timeout_s, name="m")


async def _collect(q: GenerationQueue, req: GenerateRequest, log: list | None = None, tag: str = "") -> list:
    out = []
    async for chunk in q.stream(req):
        if log is not None and not out:
            log.append(tag)
        out.append(chunk)
    return out


# --------------------------------------------------------------------------- channel
async def test_channel_hands_over_everything_queued_in_one_wake_up():
    chan = _Channel(asyncio.get_running_loop())
    t = threading.Thread(target=lambda: [chan.put(i) for i in range(50)])
    t.start()
    t.join()
    got = await chan.get_all()
    assert got == list(range(50))  # one wake-up, all items, in order


async def test_channel_wakes_a_waiting_consumer_from_a_thread():
    loop = asyncio.get_running_loop()
    chan = _Channel(loop)
    loop.call_later(0.02, lambda: threading.Thread(target=chan.put, args=("x",)).start())
    assert await asyncio.wait_for(chan.get_all(), 2) == ["x"]


# --------------------------------------------------------------------------- generation queue
async def test_one_generation_at_a_time_in_fifo_order():
    b = _chat(token_delay=0.005)
    q = _queue(b)
    order: list[str] = []
    reqs = [GenerateRequest(prompt=f"p{i}", max_tokens=5) for i in range(4)]
    tasks = []
    for i, r in enumerate(reqs):
        tasks.append(asyncio.create_task(_collect(q, r, order, f"r{i}")))
        await asyncio.sleep(0)  # submission order = creation order
    results = await asyncio.gather(*tasks)
    assert b.max_active == 1
    assert order == ["r0", "r1", "r2", "r3"]
    for chunks in results:
        assert [c.text for c in chunks if c.text] and chunks[-1].finish_reason == "stop"
        assert sum(1 for c in chunks if c.text) == 5


async def test_full_queue_raises_overloaded_with_retry_after():
    b = _chat(token_delay=0.02, reply_tokens=20)
    q = _queue(b, max_waiting=1)
    running = asyncio.create_task(_collect(q, GenerateRequest(prompt="a", max_tokens=20)))
    await until(lambda: b.active == 1)
    waiting = asyncio.create_task(_collect(q, GenerateRequest(prompt="b", max_tokens=20)))
    await until(lambda: q.waiting == 1)
    assert q.depth == 2
    with pytest.raises(Overloaded) as ei:
        await _collect(q, GenerateRequest(prompt="c", max_tokens=2))
    assert ei.value.retry_after >= 1
    assert ei.value.http_status == 429
    await asyncio.gather(running, waiting)  # the two admitted ones still finish
    await until(lambda: q.depth == 0)


async def test_a_running_stream_is_never_interrupted_by_a_newer_one():
    b = _chat(token_delay=0.01, reply_tokens=10)
    q = _queue(b)
    first = asyncio.create_task(_collect(q, GenerateRequest(prompt="first", max_tokens=10)))
    await until(lambda: b.tokens_produced >= 2)
    second = asyncio.create_task(_collect(q, GenerateRequest(prompt="second", max_tokens=10)))
    a, c = await asyncio.gather(first, second)
    assert sum(1 for x in a if x.text) == 10 and a[-1].finish_reason == "stop"
    assert sum(1 for x in c if x.text) == 10


async def test_leaving_early_cancels_the_generation_and_frees_the_slot():
    b = _chat(token_delay=0.01, reply_tokens=200)
    q = _queue(b)
    got = 0
    async for chunk in q.stream(GenerateRequest(prompt="long", max_tokens=200)):
        got += 1
        if got == 3:
            break
    await until(lambda: b.active == 0)  # the worker notices the event between tokens
    assert b.cancelled == 1
    assert b.tokens_produced < 200
    nxt = await _collect(q, GenerateRequest(prompt="next", max_tokens=3))  # the slot is free again
    assert sum(1 for c in nxt if c.text) == 3


async def test_cancelling_the_consumer_task_stops_generation():
    b = _chat(token_delay=0.01, reply_tokens=200)
    q = _queue(b)
    task = asyncio.create_task(_collect(q, GenerateRequest(prompt="long", max_tokens=200)))
    await until(lambda: b.tokens_produced >= 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: b.active == 0)
    assert b.cancelled == 1 and b.tokens_produced < 200


async def test_request_timeout_while_generating():
    b = _chat(token_delay=0.05, reply_tokens=100)
    q = _queue(b, timeout_s=0.2)
    with pytest.raises(RequestTimeout) as ei:
        await _collect(q, GenerateRequest(prompt="slow", max_tokens=100))
    assert "0.2 s" in ei.value.message
    await until(lambda: b.active == 0)
    assert b.cancelled == 1 and b.tokens_produced < 100  # stopped, not run to its end (5 s)


async def test_request_timeout_while_waiting_in_the_queue():
    b = _chat(token_delay=0.05, reply_tokens=20)
    q = _queue(b, timeout_s=0.3)
    running = asyncio.create_task(_collect(q, GenerateRequest(prompt="a", max_tokens=20)))
    await until(lambda: b.active == 1)
    with pytest.raises(RequestTimeout):
        await _collect(q, GenerateRequest(prompt="b", max_tokens=2))
    with pytest.raises(RequestTimeout):
        await running
    assert q.waiting == 0


async def test_backend_error_reaches_the_consumer():
    def broken(req, cancel):
        yield from ()
        raise TarsError("llama exploded")

    q = GenerationQueue(broken, max_waiting=2, timeout_s=5, name="m")
    with pytest.raises(TarsError, match="llama exploded"):
        await _collect(q, GenerateRequest(prompt="x"))
    await until(lambda: q.depth == 0)  # the slot frees when the worker thread has returned


async def test_generation_queue_refuses_a_request_that_would_wait_past_the_bound():
    b = _chat(token_delay=0.05, reply_tokens=20)  # ~1 s a generation
    q = GenerationQueue(b.stream, max_waiting=8, timeout_s=10, name="m", max_wait_s=0.5)
    await _collect(q, GenerateRequest(prompt="warm", max_tokens=20))  # the queue learns ~1 s
    running = asyncio.create_task(_collect(q, GenerateRequest(prompt="a", max_tokens=20)))
    await until(lambda: b.active == 1)
    with pytest.raises(Overloaded, match="would wait about 1 s") as ei:
        await _collect(q, GenerateRequest(prompt="b", max_tokens=2))
    assert ei.value.retry_after >= 1 and q.waiting == 0
    await running


async def test_a_request_right_after_one_that_ended_finds_the_slot_free():
    """The slot frees at the end marker, not only once the worker thread has returned: a
    client that sends its next request at once is never refused for its own previous one
    (requests that took 30 s each would otherwise make it 'wait about 30 s' → 429)."""

    def three(req, cancel):
        yield from ("a", "b", "c")

    q = GenerationQueue(three, max_waiting=4, timeout_s=10, name="m", max_wait_s=1)
    q._slot._learn(30.0)
    for _ in range(20):
        assert [x async for x in q.stream(GenerateRequest(prompt="x"))] == ["a", "b", "c"]
        assert q.depth == 0
