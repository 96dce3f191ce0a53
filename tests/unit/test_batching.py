"""MicroBatcher (batching.py): merging, bounds, sorting, timeouts and the burst window on fake time."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from distributed.batching import BURST_WINDOW_S, MicroBatcher
from distributed.errors import Overloaded, RequestTimeout, TarsError
from tests.support import until

pytestmark = pytest.mark.anyio


class FakeClock:
    """The running loop's clock, frozen until the test moves it. Every loop timer — the
    batcher's max_wait and burst window, ``asyncio.sleep``, ``wait_for`` — fires only when
    ``advance`` passes it, so a test of a time window cannot be raced by a busy machine:
    however long the machine stalls, no loop time passes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        monkeypatch.setattr(loop, "time", lambda: self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @staticmethod
    async def settle(cond, timeout: float = 10.0) -> None:
        """``until`` for a frozen clock (``asyncio.sleep`` would never return): lets the loop
        run, and the encoder thread finish, without moving loop time."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            await asyncio.sleep(0)
            time.sleep(0.0005)


# --------------------------------------------------------------------------- micro-batcher
class Encoder:
    """Deterministic vectors (first component = text length) and a record of every call."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.delay = delay
        self.fail = fail

    def __call__(self, texts: list[str], normalize: bool):
        self.calls.append(list(texts))
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise TarsError("encode failed")
        v = np.zeros((len(texts), 4), dtype=np.float32)
        for i, t in enumerate(texts):
            v[i] = [len(t), sum(map(ord, t)) % 97, 1.0, 2.0]
        if normalize:
            v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, [len(t.split()) for t in texts]


def _batcher(enc: Encoder, max_batch: int = 8, max_wait_ms: float = 2.0, max_queue: int = 1000) -> MicroBatcher:
    return MicroBatcher(enc, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, timeout_s=10, name="e")


async def test_concurrent_requests_are_merged_while_the_worker_is_busy():
    enc = Encoder(delay=0.05)
    mb = _batcher(enc, max_batch=64)
    first = asyncio.create_task(mb.embed(["warm"], False))
    await until(lambda: len(enc.calls) == 1)  # the first batch is running (alone: the worker was idle)
    rest = [asyncio.create_task(mb.embed([f"text {i}"], False)) for i in range(10)]
    await asyncio.gather(first, *rest)
    assert [len(c) for c in enc.calls] == [1, 10]
    assert mb.batches == 2


async def test_max_batch_is_respected_and_results_map_back_to_their_callers():
    enc = Encoder(delay=0.01)
    mb = _batcher(enc, max_batch=8)
    texts = [("x" * (i % 7 + 1)) + f" {i}" for i in range(30)]
    results = await asyncio.gather(*(mb.embed([t], False) for t in texts))
    assert all(len(c) <= 8 for c in enc.calls)
    assert sum(len(c) for c in enc.calls) == 30
    for t, (vecs, counts) in zip(texts, results):
        assert vecs.shape == (1, 4)
        assert vecs[0, 0] == len(t) and vecs[0, 1] == sum(map(ord, t)) % 97
        assert counts == [len(t.split())]


async def test_each_batch_is_sorted_by_length_and_multi_text_requests_keep_their_order():
    enc = Encoder(delay=0.02)
    mb = _batcher(enc, max_batch=64)
    blocker = asyncio.create_task(mb.embed(["b"], False))
    await until(lambda: len(enc.calls) == 1)
    a = asyncio.create_task(mb.embed(["s", "a much longer text here", "mid text"], False))
    b = asyncio.create_task(mb.embed(["tiny", "the longest text of them all, really"], False))
    await blocker
    (va, ca), (vb, cb) = await asyncio.gather(a, b)
    second = enc.calls[1]
    assert [len(t) for t in second] == sorted((len(t) for t in second), reverse=True)
    assert [int(x) for x in va[:, 0]] == [1, 23, 8]
    assert [int(x) for x in vb[:, 0]] == [4, 36]
    assert ca == [1, 5, 2] and cb == [1, 7]


async def test_idle_worker_starts_at_once_without_waiting_for_the_batch_to_fill(monkeypatch):
    clock = FakeClock(monkeypatch)
    enc = Encoder()
    mb = _batcher(enc, max_wait_ms=3000)
    alone = asyncio.create_task(mb.embed(["alone"], True))
    await clock.settle(alone.done)  # no loop time passes: it did not wait for max_wait
    assert alone.result()[0].shape == (1, 4) and enc.calls == [["alone"]]


async def test_mixed_normalize_flags_in_one_batch():
    enc = Encoder(delay=0.02)
    mb = _batcher(enc)
    blocker = asyncio.create_task(mb.embed(["b"], False))
    await until(lambda: len(enc.calls) == 1)
    raw, unit = await asyncio.gather(mb.embed(["hello"], False), mb.embed(["hello"], True))
    await blocker
    assert raw[0][0, 0] == 5
    assert np.isclose(np.linalg.norm(unit[0][0]), 1.0)
    assert np.allclose(unit[0][0], raw[0][0] / np.linalg.norm(raw[0][0]))


async def test_full_batcher_queue_raises_overloaded():
    enc = Encoder(delay=0.1)
    mb = _batcher(enc, max_batch=4, max_queue=6)
    running = asyncio.create_task(mb.embed(["a"], False))
    await until(lambda: len(enc.calls) == 1)
    waiting = [asyncio.create_task(mb.embed([f"w{i}"], False)) for i in range(6)]
    await until(lambda: mb.depth == 7)  # 1 encoding, 6 waiting: the queue is full
    with pytest.raises(Overloaded) as ei:
        await mb.embed(["one too many"], False)
    assert ei.value.retry_after >= 1
    await asyncio.gather(running, *waiting)


async def test_encode_error_reaches_every_caller_of_the_batch():
    enc = Encoder(fail=True)
    mb = _batcher(enc)
    results = await asyncio.gather(mb.embed(["a"], False), mb.embed(["b"], False), return_exceptions=True)
    assert all(isinstance(r, TarsError) and "encode failed" in r.message for r in results)


async def test_embed_timeout():
    enc = Encoder(delay=0.3)
    mb = MicroBatcher(enc, max_batch=4, max_wait_ms=1, max_queue=100, timeout_s=0.1, name="e")
    with pytest.raises(RequestTimeout):
        await mb.embed(["slow"], False)


async def test_during_a_burst_the_next_batch_waits_up_to_max_wait_to_fill(monkeypatch):
    clock = FakeClock(monkeypatch)
    enc = Encoder()
    mb = _batcher(enc, max_batch=8, max_wait_ms=400)
    first = asyncio.create_task(mb.embed(["first"], False))
    await clock.settle(first.done)  # a batch just ended: we are in a burst
    a = asyncio.create_task(mb.embed(["a"], False))
    await clock.settle(lambda: mb._full is not None)  # the batch of a waits to fill
    clock.advance(0.3)  # 300 ms later, within max_wait
    b = asyncio.create_task(mb.embed(["b"], False))
    await clock.settle(lambda: mb.depth == 2)
    assert len(enc.calls) == 1  # a is still waiting for the batch to fill
    clock.advance(0.2)  # past max_wait: the batch goes
    await clock.settle(lambda: a.done() and b.done())
    assert [len(c) for c in enc.calls] == [1, 2]  # a waited for b
    clock.advance(BURST_WINDOW_S * 2)  # the burst is over: a lone request goes at once
    c = asyncio.create_task(mb.embed(["c"], False))
    await clock.settle(c.done)
    assert [len(x) for x in enc.calls] == [1, 2, 1]


async def test_a_full_batch_does_not_wait(monkeypatch):
    clock = FakeClock(monkeypatch)
    enc = Encoder()
    mb = _batcher(enc, max_batch=4, max_wait_ms=3000)
    first = asyncio.create_task(mb.embed(["first"], False))
    await clock.settle(first.done)  # in a burst from here on (the clock does not move)
    four = [asyncio.create_task(mb.embed([f"t{i}"], False)) for i in range(4)]
    await clock.settle(lambda: all(t.done() for t in four))  # no loop time passes: none waited
    assert [len(c) for c in enc.calls] == [1, 4]
