"""cpus.physical_cores: llama.cpp's rule (distinct thread-sibling masks) within the CPU set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distributed import cpus


def _topology(root: Path, masks: dict[int, str]) -> Path:
    """A fake /sys/devices/system/cpu: cpu<N>/topology/thread_siblings = mask."""
    for cpu, mask in masks.items():
        d = root / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings").write_text(mask + "\n")
    return root


def _pin(monkeypatch: pytest.MonkeyPatch, allowed: set[int]) -> None:
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: allowed, raising=False)


def test_smt_siblings_count_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 cores with 2 hyper-threads each: CPUs n and n+4 share a core
    sysfs = _topology(tmp_path, {n: f"{(1 << n) | (1 << (n + 4)):02x}" for n in range(4)}
                      | {n + 4: f"{(1 << n) | (1 << (n + 4)):02x}" for n in range(4)})
    _pin(monkeypatch, set(range(8)))
    assert cpus.physical_cores(sysfs) == 4
    _pin(monkeypatch, {0, 4, 1})  # a CPU set of 3 logical CPUs on 2 cores
    assert cpus.physical_cores(sysfs) == 2


def test_one_thread_per_core_uses_every_allowed_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sysfs = _topology(tmp_path, {0: "1", 1: "2"})  # the 2-core dev VM: not cpu_count() // 2
    _pin(monkeypatch, {0, 1})
    assert cpus.physical_cores(sysfs) == 2
    _pin(monkeypatch, {1})
    assert cpus.physical_cores(sysfs) == 1


def test_without_topology_psutil_counts_within_the_cpu_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if not logical else 16)
    _pin(monkeypatch, {0, 1, 2})
    assert cpus.physical_cores(tmp_path) == 3
    _pin(monkeypatch, set(range(16)))
    assert cpus.physical_cores(tmp_path) == 8
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 4)
    assert cpus.physical_cores(tmp_path) == 4


def test_this_machine() -> None:
    n = cpus.physical_cores()
    assert 1 <= n <= len(cpus.allowed_cpus()) <= (os.cpu_count() or 1)


def test_the_llama_backend_defaults_to_it_and_keeps_the_setting() -> None:
    from distributed.backends.base import BackendOptions
    from distributed.backends.llama_cpp import LlamaCppBackend
    from distributed.domain import Assignment, ModelSpec

    spec = ModelSpec(id="m", kind="chat", backend="llama_cpp", params_b=0, quant="-", context=512)
    a = Assignment(model="m", kind="chat", node="n", device="cpu", quant="-", n_gpu_layers=0, vram_mb=0, reason="")
    assert LlamaCppBackend(spec, a, BackendOptions()).threads == cpus.physical_cores()
    assert LlamaCppBackend(spec, a, BackendOptions(threads=3)).threads == 3
