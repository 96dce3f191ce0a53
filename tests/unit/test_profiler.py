"""The profiler, with NVML (and torch.cuda) faked at the library boundary: a stand-in
``pynvml`` module in ``sys.modules`` whose functions return figures or raise the real
``pynvml.NVMLError`` subclasses. Our own code is never mocked."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from distributed import cpus, profiler
from distributed.domain import HostProfile
from distributed.errors import ConfigError

real_nvml = pytest.importorskip("pynvml")
GIB = 1024**3


class Card:
    """One fake GPU as NVML would describe it."""

    def __init__(self, name: str, total_gib: int, used_mib: int = 300, cc=(8, 6), power_mw: int | None = 18500,
                 limit_mw: int = 170000, temp: int = 41, util: int = 3, uuid: str = "GPU-0000") -> None:
        self.name, self.total, self.used = name, total_gib * GIB, used_mib * 1024 * 1024
        self.cc, self.power, self.limit, self.temp, self.util, self.uuid = cc, power_mw, limit_mw, temp, util, uuid


def fake_nvml(cards: list[Card], init_error: int | None = None, memory_error: int | None = None) -> types.ModuleType:
    """A ``pynvml`` stand-in. Errors are raised as the real library raises them:
    ``pynvml.NVMLError(code)`` builds the matching NVMLError_* subclass."""
    m = types.ModuleType("pynvml")
    m.NVMLError = real_nvml.NVMLError
    m.NVML_TEMPERATURE_GPU = real_nvml.NVML_TEMPERATURE_GPU
    m.calls = []

    def err(code: int):
        return real_nvml.NVMLError(code)

    def nvmlInit() -> None:
        m.calls.append("init")
        if init_error is not None:
            raise err(init_error)

    def nvmlShutdown() -> None:
        m.calls.append("shutdown")

    def handle(i: int) -> Card:
        return cards[i]

    def memory(h: Card) -> Any:
        if memory_error is not None:
            raise err(memory_error)
        return types.SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used)

    def power(h: Card) -> int:
        if h.power is None:
            raise err(real_nvml.NVML_ERROR_NOT_SUPPORTED)
        return h.power

    m.nvmlInit, m.nvmlShutdown = nvmlInit, nvmlShutdown
    m.nvmlDeviceGetCount = lambda: len(cards)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetName = lambda h: h.name
    m.nvmlDeviceGetUUID = lambda h: h.uuid
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetTemperature = lambda h, sensor: h.temp
    m.nvmlDeviceGetPowerUsage = power
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: h.limit
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h.util, memory=1)
    m.nvmlDeviceGetCudaComputeCapability = lambda h: h.cc
    m.nvmlSystemGetDriverVersion = lambda: "550.54.14"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    return m


def fake_torch(devices: list[tuple[str, int]]) -> types.ModuleType:
    """A ``torch`` stand-in with just the torch.cuda calls the fallback makes."""
    t = types.ModuleType("torch")
    t.version = types.SimpleNamespace(cuda="12.1")
    props = [types.SimpleNamespace(name=n, major=7, minor=5, uuid=f"uuid-{i}", total_memory=g * GIB)
             for i, (n, g) in enumerate(devices)]
    t.cuda = types.SimpleNamespace(
        is_available=lambda: bool(devices),
        device_count=lambda: len(devices),
        get_device_properties=lambda i: props[i],
        mem_get_info=lambda i: (props[i].total_memory - GIB, props[i].total_memory),
    )
    return t


@pytest.fixture(autouse=True)
def fresh_live_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiler, "_nvml_state", {})


def use(monkeypatch: pytest.MonkeyPatch, nvml: types.ModuleType | None, torch: types.ModuleType | None) -> None:
    # None in sys.modules makes `import x` raise ImportError, like a missing package
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setitem(sys.modules, "torch", torch)


# --------------------------------------------------------------------------- NVML
def test_nvml_reports_every_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_nvml([Card("NVIDIA GeForce RTX 3060", 12, uuid="GPU-aaa"),
                    Card("NVIDIA GeForce GTX 1660 SUPER", 6, cc=(7, 5), power_mw=None, uuid="GPU-bbb")])
    use(monkeypatch, nv, None)
    prof = profiler.profile_host(node_name="pc1")
    assert prof.source == "nvml" and prof.hostname == "pc1" and not prof.simulated
    assert prof.notes == []
    a, b = prof.gpus
    assert (a.index, a.name, a.uuid) == (0, "NVIDIA GeForce RTX 3060", "GPU-aaa")
    assert (a.vram_total_mb, a.vram_used_mb, a.vram_free_mb) == (12288, 300, 11988)
    assert (a.temperature_c, a.power_w, a.power_limit_w, a.utilization_pct) == (41, 18.5, 170.0, 3.0)
    assert (a.compute_capability, a.driver_version, a.cuda_version) == ("8.6", "550.54.14", "12.4")
    assert b.vram_total_mb == 6144 and b.compute_capability == "7.5"
    assert b.power_w is None  # NotSupported on this card: reported as unknown, not an error
    assert prof.best_gpu is a
    assert nv.calls == ["init", "shutdown"]
    assert prof.cpu_cores >= 1 and prof.ram_total_mb > 0 and prof.cpu_model


def test_nvml_failing_falls_back_to_torch_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fake_nvml([], init_error=real_nvml.NVML_ERROR_DRIVER_NOT_LOADED),
        fake_torch([("NVIDIA GeForce GTX 1660 SUPER", 6)]))
    prof = profiler.profile_host()
    assert prof.source == "torch"
    assert prof.notes == ["NVML failed: Driver Not Loaded; fell back to torch.cuda"]
    (g,) = prof.gpus
    assert (g.name, g.vram_total_mb, g.vram_free_mb, g.compute_capability, g.cuda_version) == (
        "NVIDIA GeForce GTX 1660 SUPER", 6144, 5120, "7.5", "12.1")


def test_nvml_mismatch_and_no_cuda_gives_a_cpu_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fake_nvml([], init_error=real_nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH), fake_torch([]))
    prof = profiler.profile_host()
    assert prof.source == "cpu" and prof.gpus == []
    assert "NVML failed" in prof.notes[0] and "mismatch" in prof.notes[0].lower()
    assert prof.notes[-1] == "no GPU: CPU mode"
    assert profiler.tuning(prof)["device"] == "cpu"


def test_nvml_permission_error_on_a_device_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fake_nvml([Card("X", 8)], memory_error=real_nvml.NVML_ERROR_NO_PERMISSION), fake_torch([]))
    prof = profiler.profile_host()
    assert prof.gpus == [] and "Insufficient Permissions" in prof.notes[0]


def test_nvml_and_torch_missing_gives_a_cpu_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, None, None)
    prof = profiler.profile_host()
    assert prof.source == "cpu"
    assert prof.notes[0] == "NVML failed: not installed (nvidia-ml-py); fell back to torch.cuda"
    assert prof.notes[1].startswith("torch.cuda failed: not installed")
    assert prof.notes[-1] == "no GPU: CPU mode"


def test_nvml_with_zero_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fake_nvml([]), None)
    prof = profiler.profile_host()
    assert prof.source == "cpu" and prof.notes == ["NVML: no NVIDIA GPU found", "no GPU: CPU mode"]


def test_real_host_never_crashes() -> None:
    prof = profiler.profile_host()
    assert isinstance(prof, HostProfile) and prof.ram_total_mb > 0
    if not prof.gpus:
        assert "no GPU: CPU mode" in prof.notes


# --------------------------------------------------------------------------- live figures
def test_live_gpus_reads_nvml_and_keeps_it_initialised(monkeypatch: pytest.MonkeyPatch) -> None:
    nv = fake_nvml([Card("NVIDIA GeForce RTX 3060", 12, util=55)])
    use(monkeypatch, nv, None)
    first = profiler.live_gpus()
    assert [(g.name, g.utilization_pct) for g in first] == [("NVIDIA GeForce RTX 3060", 55.0)]
    profiler.live_gpus()
    assert nv.calls == ["init"]  # cheap: NVML initialised once


def test_live_gpus_without_nvml_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    use(monkeypatch, fake_nvml([], init_error=real_nvml.NVML_ERROR_LIBRARY_NOT_FOUND), None)
    assert profiler.live_gpus() == []
    use(monkeypatch, None, None)
    assert profiler.live_gpus() == []


def test_live_gpus_of_a_simulated_profile_are_the_presets() -> None:
    prof = profiler.profile_host("rtx3060-12gb")
    assert [g.name for g in profiler.live_gpus(prof)] == ["NVIDIA GeForce RTX 3060"]


# --------------------------------------------------------------------------- simulated
@pytest.mark.parametrize("name", sorted(profiler.PRESETS))
def test_every_preset_loads_and_is_labelled(name: str) -> None:
    prof = profiler.profile_host(name, node_name="sim")
    assert prof.simulated and prof.source == f"simulated:{name}" and prof.hostname == "sim"
    assert "simulated" in prof.notes[0]
    assert HostProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof


def test_required_presets_have_the_right_cards() -> None:
    assert {"rtx3060-12gb", "gtx1660s-6gb", "cpu"} <= set(profiler.PRESETS)
    assert profiler.profile_host("rtx3060-12gb").gpus[0].vram_total_mb == 12288
    assert profiler.profile_host("gtx1660s-6gb").gpus[0].vram_total_mb == 6144
    cpu = profiler.profile_host("cpu")
    assert cpu.gpus == [] and cpu.notes[-1] == "no GPU: CPU mode"


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        profiler.profile_host("rtx9090-99gb")
    for name in ("rtx3060-12gb", "gtx1660s-6gb", "cpu"):
        assert name in err.value.message
    assert "rtx9090-99gb" in err.value.message


def test_json_profile_file(tmp_path: Path) -> None:
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"cpu_cores": 4, "ram_total_mb": 8192,
                             "gpus": [{"name": "Tesla T4", "vram_total_mb": 15360}]}))
    prof = profiler.profile_host(str(f), node_name="lab")
    assert prof.source == "simulated:mine" and prof.hostname == "lab"
    assert prof.gpus[0].vram_free_mb == 15360 and prof.ram_free_mb == 8192


def test_malformed_json_names_the_file_and_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "broken.json"
    f.write_text('{"cpu_cores": 4,\n "ram_total_mb": }')
    with pytest.raises(ConfigError) as err:
        profiler.profile_host(str(f))
    assert str(f) in err.value.message and "not valid JSON" in err.value.message and "line 2" in err.value.message


@pytest.mark.parametrize("doc, problem", [
    ([1, 2], "JSON object"),
    ({"ram_total_mb": 1024}, "missing field 'cpu_cores'"),
    ({"cpu_cores": 2, "ram_total_mb": "lots"}, "'ram_total_mb' must be an integer"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"name": "x"}]}, "gpus[0]"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": {"name": "x"}}, "'gpus' must be a list"),
    # every field is type-checked: a wrong one is named, never a traceback later in a table
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"vram_total_mb": 6000, "vram_used_mb": "x"}]},
     "gpus[0]: field 'vram_used_mb' must be an integer"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"vram_total_mb": 6000, "name": 5}]},
     "gpus[0]: field 'name' must be a string"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"vram_total_mb": 6000, "temperature_c": "hot"}]},
     "field 'temperature_c' must be a number"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"vram_total_mb": 6000, "vram_free_mb": 9000}]},
     "'vram_free_mb' (9000) is more than vram_total_mb (6000)"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "ram_free_mb": 4096}, "'ram_free_mb' (4096) is more than"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "hostname": 3}, "field 'hostname' must be a string"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "notes": "x"}, "'notes' must be a list of strings"),
    ({"cpu_cores": 2, "ram_total_mb": 1024, "gpus": [{"vram_total_mb": 6000, "index": 0},
                                                      {"vram_total_mb": 6000, "index": 0}]}, "share an index"),
])
def test_wrong_shape_names_the_field(tmp_path: Path, doc: Any, problem: str) -> None:
    f = tmp_path / "p.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as err:
        profiler.profile_host(str(f))
    assert problem in err.value.message and str(f) in err.value.message


def test_missing_json_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        profiler.profile_host(str(tmp_path / "nope.json"))


def test_a_folder_is_not_a_profile(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder, not a JSON file"):
        profiler.profile_host(str(tmp_path))


def test_a_saved_profile_json_is_a_valid_profile(tmp_path: Path) -> None:
    """What `tars profile --json` prints on one machine plans that machine from another."""
    saved = profiler.profile_host("gtx1660s-6gb", "pc2")
    f = tmp_path / "pc2.json"
    f.write_text(json.dumps({**saved.to_dict(), "tuning": profiler.tuning(saved)}))
    prof = profiler.profile_host(str(f))
    assert prof.simulated and prof.source == "simulated:pc2" and prof.hostname == "pc2"
    assert [g.to_dict() for g in prof.gpus] == [g.to_dict() for g in saved.gpus]
    assert prof.notes == ["simulated profile 'pc2': no hardware was queried"]  # not the old note again
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps(profiler.profile_host("cpu").to_dict()))
    assert profiler.profile_host(str(cpu)).notes.count(profiler.CPU_NOTE) == 1


# --------------------------------------------------------------------------- tuning
def test_tuning_by_vram() -> None:
    t12 = profiler.tuning(profiler.profile_host("rtx3060-12gb"))
    t6 = profiler.tuning(profiler.profile_host("gtx1660s-6gb"))
    tcpu = profiler.tuning(profiler.profile_host("cpu"))
    assert (t12["embed_batch_size"], t6["embed_batch_size"], tcpu["embed_batch_size"]) == (128, 64, 32)
    assert t12["cudnn_benchmark"] and t6["cudnn_benchmark"] and not tcpu["cudnn_benchmark"]
    assert t12["memory_fraction"] == pytest.approx((12288 - 500) / 12288, abs=1e-3)
    assert t12["tf32"] and not t6["tf32"] and t6["dtype"] == "float16"
    assert tcpu["memory_fraction"] is None and tcpu["threads"] == min(8, profiler.usable_cores())


def test_tuning_respects_the_reserve() -> None:
    prof = profiler.profile_host("gtx1660s-6gb")
    assert profiler.tuning(prof, reserve_mb=1024)["memory_fraction"] == pytest.approx((6144 - 1024) / 6144, abs=1e-3)
    assert profiler.tuning(prof, reserve_mb=10_000)["memory_fraction"] == 0.0


def test_tuning_threads_never_exceed_the_real_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    # A simulated preset describes another machine's CPU (6 cores): on a 2-core host the
    # threads it suggests are this host's 2, on a 16-core host the profile's 6.
    prof = profiler.profile_host("rtx3060-12gb")
    assert prof.cpu_cores == 6
    monkeypatch.setattr(profiler, "usable_cores", lambda: 2)
    assert profiler.tuning(prof)["threads"] == 2
    assert profiler.tuning(profiler.profile_host("cpu"))["threads"] == 2
    monkeypatch.setattr(profiler, "usable_cores", lambda: 16)
    assert profiler.tuning(prof)["threads"] == 6


def test_tuning_threads_on_this_machine_fit_its_cpus() -> None:
    import os

    real = profiler.usable_cores()
    assert 1 <= real <= (os.cpu_count() or 1)
    for preset in profiler.PRESETS:
        assert profiler.tuning(profiler.profile_host(preset))["threads"] <= real


def test_usable_cores_is_physical_cores_within_the_cpu_set(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(cpus, "SYSFS_CPUS", tmp_path)  # no topology files: psutil's count (tests/unit/test_cpus.py)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8 if not logical else 16)
    monkeypatch.setattr(profiler.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert profiler.usable_cores() == 3  # pinned (taskset / container) to 3 CPUs
    monkeypatch.setattr(profiler.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert profiler.usable_cores() == 8  # the physical cores, not the SMT siblings
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: None)  # psutil cannot tell
    monkeypatch.setattr(profiler.os, "cpu_count", lambda: 4)
    assert profiler.usable_cores() == 4
