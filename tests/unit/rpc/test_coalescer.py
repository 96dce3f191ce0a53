"""``rpc/coalescer.py``: concurrent embedding requests for one peer share channel calls
(a scripted channel: each call returns when the test releases it)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from distributed.errors import ValidationFailed
from distributed.rpc.coalescer import Coalescer as _Coalescer

pytestmark = pytest.mark.anyio


class Wire:
    """A fake channel: each call waits until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[int]]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def send(self, texts: list[str], normalize: bool, groups: list[int]) -> dict[str, Any]:
        self.calls.append((texts, groups))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None and (len(groups) > 1 or "bad" in texts):
            raise self.fail
        vec = np.array([[float(len(t)), 0.0] for t in texts], dtype=np.float32)
        return {"vectors": vec, "group_tokens": groups and [10 * g for g in groups], "node": "pc2"}

    async def release(self, i: int) -> None:
        self.gates[i].set()
        for _ in range(5):
            await asyncio.sleep(0)


async def spin() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_lone_request_goes_at_once_and_later_ones_coalesce():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=2)
    first = asyncio.ensure_future(co.submit(["a", "bb"], True))
    await spin()
    assert wire.calls == [(["a", "bb"], [2])]  # no waiting for company
    others = [asyncio.ensure_future(co.submit([f"x{i}"], True)) for i in range(3)]
    await spin()
    # x0 waits alone (1 sentence < the 2 in flight); x1 makes a full batch's worth: both leave
    # together; x2 waits, as two calls are in flight
    assert wire.calls[1:] == [(["x0", "x1"], [1, 1])]
    await wire.release(0)
    assert len(wire.calls) == 2  # x2 (1 sentence) is less than the 2 still in flight: it waits
    await wire.release(1)
    assert wire.calls[2:] == [(["x2"], [1])]  # nothing in flight: whatever waits goes
    await wire.release(2)
    assert (await first)[0].tolist() == [[1.0, 0.0], [2.0, 0.0]]
    assert [(await t)[1] for t in others] == [10, 10, 10]


async def test_second_call_leaves_when_a_full_batch_waits_then_the_rest_on_return():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=2)
    a = asyncio.ensure_future(co.submit(["a1", "a2", "a3"], True))
    await spin()
    b = [asyncio.ensure_future(co.submit([f"b{i}"], True)) for i in range(2)]
    await spin()
    assert len(wire.calls) == 1  # 2 waiting < 3 in flight
    b.append(asyncio.ensure_future(co.submit(["b2"], True)))
    await spin()
    assert wire.calls[1] == (["b0", "b1", "b2"], [1, 1, 1])  # pipelined while the first is in flight
    c = [asyncio.ensure_future(co.submit([f"c{i}"], True)) for i in range(4)]
    await spin()
    assert len(wire.calls) == 2  # two in flight: the rest wait
    await wire.release(0)
    assert wire.calls[2][0] == ["c0", "c1", "c2", "c3"]  # sent when a slot freed
    vec, tokens, node = await a
    assert vec.tolist() == [[2.0, 0.0]] * 3 and tokens == 30 and node == "pc2"
    await wire.release(1)
    await wire.release(2)
    for i, t in enumerate(b):
        vec, tokens, _ = await t
        assert vec.tolist() == [[2.0, 0.0]] and tokens == 10
    assert [(await t)[0].shape for t in c] == [(1, 2)] * 4
    assert co.calls == 3


async def test_normalize_flags_never_share_a_call():
    wire = Wire()
    co = _Coalescer(wire.send)
    asyncio.ensure_future(co.submit(["a"], True))
    asyncio.ensure_future(co.submit(["b"], False))
    await spin()
    assert [c[0] for c in wire.calls] == [["a"], ["b"]]
    for i in range(2):
        await wire.release(i)


async def test_a_failing_batch_is_retried_one_request_at_a_time():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=1)
    first = asyncio.ensure_future(co.submit(["ok0"], True))
    await spin()
    good = asyncio.ensure_future(co.submit(["ok"], True))
    bad = asyncio.ensure_future(co.submit(["bad"], True))
    await spin()
    wire.fail = ValidationFailed("input[0] is empty", field="input[0]")
    await wire.release(0)  # first returns; the pair goes out as one call and fails
    assert wire.calls[1][1] == [1, 1]
    await wire.release(1)
    await spin()
    assert [c[0] for c in wire.calls[2:]] == [["ok"], ["bad"]]
    await wire.release(2)
    await wire.release(3)
    assert (await good)[0].tolist() == [[2.0, 0.0]]
    with pytest.raises(ValidationFailed):
        await bad
    assert (await first)[1] == 10


async def test_a_caller_that_left_is_skipped():
    wire = Wire()
    co = _Coalescer(wire.send, max_inflight=1)
    asyncio.ensure_future(co.submit(["a"], True))
    await spin()
    gone = asyncio.ensure_future(co.submit(["gone"], True))
    stay = asyncio.ensure_future(co.submit(["stay"], True))
    await spin()
    gone.cancel()
    await spin()
    await wire.release(0)
    assert wire.calls[1][0] == ["stay"]
    await wire.release(1)
    assert (await stay)[0].tolist() == [[4.0, 0.0]]
