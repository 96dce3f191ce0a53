"""The profiler under WSL2 (Windows): NVML there is the Windows driver's, which answers the
figures a plan needs (name, memory, compute capability) and NotSupported for most others;
the host's RAM is the WSL VM's share. Faked at the library boundary as in test_profiler.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed import profiler
from tests.unit.test_profiler import Card, fake_nvml, real_nvml, use


def wsl_nvml() -> object:
    nv = fake_nvml([Card("NVIDIA GeForce RTX 3060", 12)])

    def unsupported(*_: object) -> None:
        raise real_nvml.NVMLError(real_nvml.NVML_ERROR_NOT_SUPPORTED)

    for fn in ("nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetTemperature",
               "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetUUID", "nvmlSystemGetCudaDriverVersion"):
        setattr(nv, fn, unsupported)
    return nv


@pytest.fixture
def osrelease(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    f = tmp_path / "osrelease"
    monkeypatch.setattr(profiler, "OSRELEASE", f)
    monkeypatch.setattr(profiler, "_nvml_state", {})
    return f


def test_wsl_nvml_with_most_figures_unsupported_still_profiles_the_gpu(monkeypatch: pytest.MonkeyPatch,
                                                                      osrelease: Path) -> None:
    osrelease.write_text("5.15.153.1-microsoft-standard-WSL2\n")
    use(monkeypatch, wsl_nvml(), None)
    prof = profiler.profile_host(node_name="pc1")
    assert prof.source == "nvml" and len(prof.gpus) == 1
    gpu = prof.gpus[0]
    assert gpu.vram_total_mb == 12288 and gpu.compute_capability == "8.6"
    assert gpu.temperature_c is None and gpu.power_w is None and gpu.uuid == "" and gpu.cuda_version is None
    assert prof.notes == [profiler.WSL_NOTE]
    assert profiler.live_gpus(prof)[0].vram_free_mb == 12288 - 300  # /status keeps working


def test_no_wsl_note_elsewhere_or_without_proc(monkeypatch: pytest.MonkeyPatch, osrelease: Path) -> None:
    use(monkeypatch, wsl_nvml(), None)
    osrelease.write_text("6.8.0-45-generic\n")
    assert profiler.profile_host(node_name="pc1").notes == []
    osrelease.unlink()  # no /proc (another OS, a sandbox): not WSL, nothing fails
    assert not profiler.on_wsl()
