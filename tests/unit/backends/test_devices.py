"""Device choice and GPU knobs for the torch backends, with a stand-in for torch."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from distributed.backends.base import BackendOptions
from distributed.backends.devices import apply_cuda_tuning, pick_device, wants_fp16
from distributed.backends.llama_cpp import LlamaCppBackend
from distributed.domain import Assignment, ModelSpec

log = logging.getLogger("test")


def _torch(available: bool, count: int = 1) -> SimpleNamespace:
    calls: list[tuple] = []
    cuda = SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                           set_per_process_memory_fraction=lambda f, i: calls.append(("fraction", f, i)),
                           matmul=SimpleNamespace(allow_tf32=False))
    backends = SimpleNamespace(cuda=SimpleNamespace(matmul=SimpleNamespace(allow_tf32=False)),
                               cudnn=SimpleNamespace(allow_tf32=False, benchmark=False))
    return SimpleNamespace(cuda=cuda, backends=backends, calls=calls)


def test_cpu_is_kept_and_valid_cuda_is_kept():
    notes: list[str] = []
    assert pick_device(_torch(False), "cpu", "m", notes, log) == "cpu"
    assert pick_device(_torch(True, 2), "cuda:1", "m", notes, log) == "cuda:1"
    assert pick_device(_torch(True), "cuda", "m", notes, log) == "cuda:0"
    assert notes == []


def test_cuda_without_cuda_falls_back_to_cpu_and_notes_it(caplog):
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="test"):
        assert pick_device(_torch(False), "cuda:0", "m", notes, log) == "cpu"
    assert notes and "cuda:0" in notes[0] and "running on cpu" in notes[0]
    assert "running on cpu" in caplog.text


def test_missing_gpu_index_falls_back_to_cpu():
    notes: list[str] = []
    assert pick_device(_torch(True, 1), "cuda:3", "m", notes, log) == "cpu"
    assert "1 CUDA device" in notes[0]


def test_cuda_tuning_applies_knobs_only_on_cuda():
    t = _torch(True)
    apply_cuda_tuning(t, "cpu", {"tf32": True, "cudnn_benchmark": True, "memory_fraction": 0.9})
    assert not t.backends.cudnn.benchmark and t.calls == []
    apply_cuda_tuning(t, "cuda:0", {"tf32": True, "cudnn_benchmark": True, "memory_fraction": 0.9})
    assert t.backends.cuda.matmul.allow_tf32 and t.backends.cudnn.benchmark
    assert t.calls == [("fraction", 0.9, 0)]


def test_fp16_only_on_cuda_and_not_on_old_cards():
    assert wants_fp16("cuda:0", {}) and wants_fp16("cuda:0", {"dtype": "float16"})
    assert not wants_fp16("cuda:0", {"dtype": "float32"}) and not wants_fp16("cpu", {})


def test_llama_threads_follow_the_setting_else_the_physical_cores(monkeypatch):
    import distributed.backends.llama_cpp as llama_mod

    monkeypatch.setattr(llama_mod, "physical_cores", lambda: 6)
    spec = ModelSpec(id="g", kind="chat", backend="llama_cpp", params_b=0.3, quant="Q4_K_M", context=2048)
    a = Assignment(model="g", kind="chat", node="n", device="cpu", quant="Q4_K_M", n_gpu_layers=0, vram_mb=0,
                   reason="t")
    assert LlamaCppBackend(spec, a, BackendOptions(threads=3, extra={"threads": 8})).threads == 3
    # 0 = llama.cpp's own rule (the physical cores this process may use), never the profiler's hint
    assert LlamaCppBackend(spec, a, BackendOptions(threads=0, extra={"threads": 8})).threads == 6
    assert LlamaCppBackend(spec, a, BackendOptions()).threads == 6
