"""targets/served.py: the lifecycle, counters and info() shape that LocalTarget and
EngineTarget share (each holds a ``Served``)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from distributed.domain import Assignment, ModelSpec
from distributed.errors import ModelFailed, ModelLoading, TarsError
from distributed.metrics import Metrics
from distributed.targets.base import TargetState
from distributed.targets.served import LoadedFlag, Served, clamp_notes, served_attr

pytestmark = pytest.mark.anyio
SPEC = ModelSpec(id="m", kind="chat", backend="llama_cpp", params_b=0.1, quant="Q4_K_M", context=512)
A = Assignment(model="m", kind="chat", node="n1", device="cuda:0", quant="", n_gpu_layers=-1, vram_mb=1, reason="t")


def test_info_shape_pulling_and_error() -> None:
    s = Served(SPEC, A, node="n1")
    info = s.info(3, context=512)
    assert info == {"id": "m", "kind": "chat", "backend": "llama_cpp", "quant": "Q4_K_M", "node": "n1",
                    "state": "loading", "local": True, "device": "cuda:0", "n_gpu_layers": -1, "queue_depth": 3,
                    "requests": 0, "tokens_generated": 0, "last_tokens_per_s": 0.0, "embeddings": 0, "load_s": None,
                    "vision": False, "context": 512}
    projector = dataclasses.replace(SPEC, mmproj="mmproj-f16.gguf")  # sees images only where the engine loads it
    assert Served(projector, A, node="n1", sees_images=True).info(0)["vision"] is True
    assert Served(projector, A, node="n1").info(0)["vision"] is False  # the in-process engine loads none
    s.progress = {"done_bytes": 5, "total_bytes": 10, "percent": 50.0}
    assert s.info(0)["state"] == "pulling" and s.info(0)["progress"]["percent"] == 50.0  # routing still sees loading
    assert s.state == TargetState.LOADING
    assert s.failed(TarsError("disk full")) == "disk full" and s.failed(ValueError("bad")) == "ValueError: bad"
    info = s.info(0)
    assert info["state"] == "failed" and info["error"] == "ValueError: bad" and "progress" not in info


def test_not_ready_refusals_and_close() -> None:
    s = Served(SPEC, A, node="n1")
    with pytest.raises(ModelLoading, match="is still loading on n1") as loading:
        s.check_ready()
    assert loading.value.http_status == 503 and loading.value.details["retry_after"] == 2
    with pytest.raises(ModelLoading, match="is restarting its engine on n1"):
        s.check_ready(loading="restarting its engine")
    s.ready(1.5)
    s.check_ready()
    assert s.info(0)["load_s"] == 1.5 and s.error is None
    s.close()
    assert s.state == "unavailable" and s.closed
    with pytest.raises(ModelFailed, match=r"not available on n1 \(unavailable\)"):
        s.check_ready()
    broken = Served(SPEC, A, node="n1")
    broken.failed("llama-server exited")
    broken.close()
    assert broken.state == "failed"  # a failure stays a failure, with its reason
    with pytest.raises(ModelFailed, match="model 'm' failed on n1: llama-server exited"):
        broken.check_ready(failed="failed")


def test_accounting_reaches_the_counters_rates_and_metrics() -> None:
    metrics = Metrics("n1")
    s = Served(SPEC, A, node="n1", metrics=metrics)
    s.generated(10, 0.2, 42.0)
    s.generated(0, None, 99.0)  # an empty answer keeps the last rate
    s.embedded(4)
    assert (s.tokens_generated, s.last_tokens_per_s, s.embeddings) == (10, 42.0, 4)
    assert s.token_rate.per_s() > 0 and s.embed_rate.per_s() > 0
    assert metrics.registry.get_sample_value("tars_tokens_generated_total", {"model": "m"}) == 10
    assert metrics.registry.get_sample_value("tars_embeddings_total", {"model": "m"}) == 4


def test_clamp_notes() -> None:
    assert clamp_notes(100, 400, 512) == []
    assert clamp_notes(200, 400, 512) == ["max_tokens clamped from 200 to 112: the prompt (400 tokens) plus "
                                          "max_tokens must fit the context of 512 tokens"]


def test_served_attr_forwards_reads_and_writes() -> None:
    class T:
        state = served_attr("state")
        requests = served_attr("requests")

        def __init__(self) -> None:
            self.served = Served(SPEC, A, node="n1")

    t = T()
    t.requests += 2
    assert t.served.requests == 2 and t.state == "loading"


async def test_loaded_flag_wakes_waiters_from_another_thread() -> None:
    flag = LoadedFlag()
    assert await flag.wait(0.01) is False
    waiter = asyncio.create_task(flag.wait(10))
    await asyncio.sleep(0)
    threading.Thread(target=flag.set).start()
    assert await waiter is True and flag.is_set() and await flag.wait(0) is True
