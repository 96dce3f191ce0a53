"""What hardware this host has: NVML → torch.cuda → CPU, or a simulated preset.

Order of trust: NVML (nvidia-ml-py) knows everything about an NVIDIA GPU — VRAM,
temperature, power, utilisation, compute capability, driver and CUDA versions. When NVML
is missing or fails (no driver library, driver/library mismatch, no permission), torch's
CUDA runtime still gives names and memory. With neither, the host is profiled as a CPU
host. Each step down says why in ``HostProfile.notes``; profiling never raises for lack
of hardware.

For machines without the hardware, ``gpu_profile`` (``TARS_GPU_PROFILE`` /
``tars profile --simulate``) names a preset from ``presets/*.json`` or a path to a JSON
file in the same shape (``HostProfile.to_dict()``); such a profile has
``simulated=True`` and ``source="simulated:<name>"`` so that every view can label it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

from . import cpus
from .domain import GPUInfo, HostProfile
from .errors import ConfigError, MissingDependency
from .optional import require

PRESETS_DIR = Path(__file__).with_name("presets")
PRESETS: dict[str, Path] = {p.stem: p for p in sorted(PRESETS_DIR.glob("*.json"))}
MIB = 1024 * 1024
CPU_NOTE = "no GPU: CPU mode"
OSRELEASE = Path("/proc/sys/kernel/osrelease")
WSL_NOTE = ("WSL2: the RAM shown is the WSL VM's share of this PC (memory= in %UserProfile%\\.wslconfig); "
            "the GPU is the Windows driver's (NVML answers fewer figures there)")


def on_wsl() -> bool:
    """Running under WSL (Windows): its kernel release names Microsoft."""
    try:
        release = OSRELEASE.read_text().lower()
    except OSError:
        return False
    return "microsoft" in release or "wsl" in release


# --------------------------------------------------------------------------- simulated
def _bad(where: str, problem: str) -> ConfigError:
    return ConfigError(f"GPU profile {where}: {problem}", file=where)


def _check_int(where: str, obj: dict[str, Any], key: str, minimum: int, required: bool = True) -> None:
    if key not in obj:
        if required:
            raise _bad(where, f"missing field '{key}'")
        return
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise _bad(where, f"field '{key}' must be an integer >= {minimum}, got {v!r}")


def _check_types(where: str, obj: dict[str, Any], strings: tuple[str, ...], numbers: tuple[str, ...]) -> None:
    """Optional fields: text fields must be strings, figures numbers (null allowed)."""
    for key in strings:
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise _bad(where, f"field '{key}' must be a string, got {obj[key]!r}")
    for key in numbers:
        v = obj.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise _bad(where, f"field '{key}' must be a number >= 0 (or null), got {v!r}")


_GPU_STRINGS = ("name", "uuid", "compute_capability", "driver_version", "cuda_version")
_GPU_NUMBERS = ("temperature_c", "power_w", "power_limit_w", "utilization_pct")


def _gpu_from_json(g: Any, i: int, where: str) -> GPUInfo:
    at = f"{where} gpus[{i}]"
    if not isinstance(g, dict):
        raise _bad(at, "each GPU must be a JSON object")
    _check_int(at, g, "vram_total_mb", 1)
    g = {"index": i, "name": f"GPU {i}", **g}
    _check_int(at, g, "index", 0)
    _check_int(at, g, "vram_used_mb", 0, required=False)
    _check_int(at, g, "vram_free_mb", 0, required=False)
    _check_types(at, g, _GPU_STRINGS, _GPU_NUMBERS)
    total = g["vram_total_mb"]
    g.setdefault("vram_used_mb", 0)
    g.setdefault("vram_free_mb", total - g["vram_used_mb"])
    for key in ("vram_used_mb", "vram_free_mb"):
        if g[key] > total:
            raise _bad(at, f"field '{key}' ({g[key]}) is more than vram_total_mb ({total})")
    return GPUInfo.from_dict(g)


def _profile_from_json(data: Any, where: str) -> HostProfile:
    if not isinstance(data, dict):
        raise _bad(where, f"the top level must be a JSON object, got {type(data).__name__}")
    _check_int(where, data, "cpu_cores", 1)
    _check_int(where, data, "ram_total_mb", 1)
    _check_int(where, data, "ram_free_mb", 0, required=False)
    _check_types(where, data, ("hostname", "cpu_model", "description"), ())
    if data.get("ram_free_mb", 0) > data["ram_total_mb"]:
        raise _bad(where, f"field 'ram_free_mb' ({data['ram_free_mb']}) is more than ram_total_mb ({data['ram_total_mb']})")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _bad(where, "field 'notes' must be a list of strings")
    gpus = data.get("gpus", [])
    if not isinstance(gpus, list):
        raise _bad(where, "field 'gpus' must be a list of GPU objects")
    parsed = [_gpu_from_json(g, i, where) for i, g in enumerate(gpus)]
    indexes = [g.index for g in parsed]
    if len(set(indexes)) != len(indexes):
        raise _bad(where, f"two GPUs share an index ({indexes}); each GPU needs its own 'index'")
    d = {"hostname": "simulated", "cpu_model": "simulated CPU", **data}
    d.setdefault("ram_free_mb", d["ram_total_mb"])
    prof = HostProfile.from_dict({**d, "gpus": []})
    prof.gpus = parsed
    prof.notes = list(notes)
    return prof


def load_simulated(gpu_profile: str) -> HostProfile:
    """A preset name or a path to a JSON profile → a HostProfile marked simulated."""
    value = gpu_profile.strip()
    looks_like_path = value.endswith(".json") or os.sep in value or "/" in value or Path(value).is_file()
    if looks_like_path:
        path = Path(value).expanduser()
        name = path.stem
        if path.is_dir():
            raise ConfigError(f"GPU profile '{path}' is a folder, not a JSON file (or give a preset: "
                              f"{', '.join(PRESETS)})", file=str(path))
        if not path.is_file():
            raise ConfigError(f"GPU profile file '{path}' does not exist (or give a preset: {', '.join(PRESETS)})",
                              file=str(path))
    elif value in PRESETS:
        path, name = PRESETS[value], value
    else:
        raise ConfigError(f"unknown GPU profile preset '{value}'; valid presets: {', '.join(PRESETS)} "
                          "(or a path to a JSON profile)", preset=value, valid=list(PRESETS))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"GPU profile '{path}' is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"GPU profile '{path}' cannot be read: {exc}", file=str(path)) from None
    prof = _profile_from_json(data, f"'{path}'")
    prof.simulated = True
    prof.source = f"simulated:{name}"
    # a saved `tars profile --json` is a valid profile: drop the notes of its own simulation
    notes = [f"simulated profile '{name}': no hardware was queried",
             *(n for n in prof.notes if not n.startswith("simulated profile '") and n != CPU_NOTE)]
    if not prof.gpus:
        notes.append(CPU_NOTE)
    prof.notes = list(dict.fromkeys(notes))
    return prof


# --------------------------------------------------------------------------- NVML
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _nvml_gpu(nv: Any, i: int, driver: str | None, cuda: str | None) -> GPUInfo:
    """One GPU through NVML. Memory is required; every other figure is best effort
    (consumer cards answer NotSupported for some of them)."""

    def opt(fn: str, *args: Any) -> Any:
        try:
            return getattr(nv, fn)(*args)
        except nv.NVMLError:
            return None

    h = nv.nvmlDeviceGetHandleByIndex(i)
    mem = nv.nvmlDeviceGetMemoryInfo(h)
    power, limit = opt("nvmlDeviceGetPowerUsage", h), opt("nvmlDeviceGetEnforcedPowerLimit", h)
    util = opt("nvmlDeviceGetUtilizationRates", h)
    cc = opt("nvmlDeviceGetCudaComputeCapability", h)
    uuid = opt("nvmlDeviceGetUUID", h)
    return GPUInfo(
        index=i, name=_s(nv.nvmlDeviceGetName(h)), uuid=_s(uuid) if uuid is not None else "",
        vram_total_mb=int(mem.total // MIB), vram_used_mb=int(mem.used // MIB), vram_free_mb=int(mem.free // MIB),
        temperature_c=opt("nvmlDeviceGetTemperature", h, getattr(nv, "NVML_TEMPERATURE_GPU", 0)),
        power_w=round(power / 1000, 1) if power is not None else None,
        power_limit_w=round(limit / 1000, 1) if limit is not None else None,
        utilization_pct=float(util.gpu) if util is not None else None,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        driver_version=driver, cuda_version=cuda,
    )


def _nvml_versions(nv: Any) -> tuple[str | None, str | None]:
    try:
        driver: str | None = _s(nv.nvmlSystemGetDriverVersion())
    except nv.NVMLError:
        driver = None
    try:
        v = int(nv.nvmlSystemGetCudaDriverVersion())
        cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
    except nv.NVMLError:
        cuda = None
    return driver, cuda


def _nvml_gpus() -> list[GPUInfo]:
    """All GPUs through NVML; raises on any NVML failure (the caller falls back)."""
    nv = require("pynvml", "nvidia-ml-py", "reading GPUs through NVML")
    nv.nvmlInit()
    try:
        driver, cuda = _nvml_versions(nv)
        return [_nvml_gpu(nv, i, driver, cuda) for i in range(int(nv.nvmlDeviceGetCount()))]
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass


def _torch_gpus() -> list[GPUInfo]:
    torch = require("torch", "torch", "reading GPUs through torch.cuda")
    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GPUInfo(
            index=i, name=str(props.name), uuid=str(getattr(props, "uuid", "") or ""),
            vram_total_mb=int(total // MIB), vram_used_mb=int((total - free) // MIB), vram_free_mb=int(free // MIB),
            compute_capability=f"{props.major}.{props.minor}", cuda_version=getattr(torch.version, "cuda", None),
        ))
    return gpus


# --------------------------------------------------------------------------- CPU
def cpu_model() -> str:
    """The CPU's model name ("AMD Ryzen 5 3600 6-Core Processor"; the machine type where unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_profile(hostname: str) -> HostProfile:
    psutil = require("psutil", "psutil", "reading CPU cores and RAM")
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return HostProfile(hostname=hostname, cpu_model=cpu_model(), cpu_cores=int(cores),
                       ram_total_mb=int(vm.total // MIB), ram_free_mb=int(vm.available // MIB), source="cpu")


def _reason(exc: Exception) -> str:
    if isinstance(exc, MissingDependency):
        return f"not installed ({exc.package})"
    return str(exc) or type(exc).__name__  # NVMLError_* strings already say what failed


def profile_host(gpu_profile: str = "", node_name: str | None = None) -> HostProfile:
    """This host's profile, or the simulated one named by ``gpu_profile``.

    Raises ConfigError only for a bad ``gpu_profile``; real detection never raises.
    """
    hostname = node_name or socket.gethostname().split(".")[0] or "localhost"
    if gpu_profile and gpu_profile.strip():
        prof = load_simulated(gpu_profile)
        if node_name:
            prof.hostname = node_name
        return prof
    prof = _cpu_profile(hostname)
    notes: list[str] = []
    try:
        gpus = _nvml_gpus()
        source = "nvml"
        if not gpus:
            notes.append("NVML: no NVIDIA GPU found")
    except Exception as exc:  # noqa: BLE001 - any NVML failure means: try the next way
        notes.append(f"NVML failed: {_reason(exc)}; fell back to torch.cuda")
        try:
            gpus, source = _torch_gpus(), "torch"
            if not gpus:
                notes.append("torch.cuda: no CUDA device available")
        except Exception as exc2:  # noqa: BLE001
            gpus, source = [], "cpu"
            notes.append(f"torch.cuda failed: {_reason(exc2)}")
    prof.gpus = gpus
    prof.source = source if gpus else "cpu"
    if not gpus:
        notes.append(CPU_NOTE)
    if on_wsl():
        notes.append(WSL_NOTE)
    prof.notes = notes
    return prof


# --------------------------------------------------------------------------- live
_nvml_state: dict[str, Any] = {}


def live_gpus(profile: HostProfile | None = None) -> list[GPUInfo]:
    """Current GPU figures for /status (VRAM used, temperature, power, utilisation).

    A simulated profile reports its own GPUs. Without NVML this is an empty list:
    live figures are a nicety and never worth an error. NVML is initialised once and
    kept, so a call costs a few microseconds per GPU.
    """
    if profile is not None and profile.simulated:
        return [GPUInfo.from_dict(g.to_dict()) for g in profile.gpus]
    try:
        nv = _nvml_state.get("nv")
        if nv is None:
            nv = require("pynvml", "nvidia-ml-py", "live GPU figures")
            nv.nvmlInit()
            _nvml_state["nv"] = nv
            _nvml_state["versions"] = _nvml_versions(nv)
        driver, cuda = _nvml_state["versions"]
        return [_nvml_gpu(nv, i, driver, cuda) for i in range(int(nv.nvmlDeviceGetCount()))]
    except Exception:  # noqa: BLE001 - see docstring
        _nvml_state.clear()
        return []


# --------------------------------------------------------------------------- tuning
def usable_cores() -> int:
    """The CPU cores this process can really run on, whatever profile is in use: the
    physical cores within the CPUs the process is allowed on (``cpus.physical_cores``,
    llama.cpp's rule — also the llama backend's default thread count)."""
    return cpus.physical_cores()


def tuning(profile: HostProfile, reserve_mb: int = 500) -> dict[str, Any]:
    """Runtime knobs derived from the profile (reported by ``tars profile``, used by backends).

    - ``cudnn_benchmark``: on with a GPU — cuDNN picks its fastest kernels per shape once.
    - ``memory_fraction``: the share of the GPU one process may take in torch, leaving the
      reserve (``TARS_VRAM_RESERVE_MB``) for the desktop and other processes.
    - ``embed_batch_size``: bigger batches on bigger cards (6 GB → 64, 12 GB → 128), 32 on CPU.
    - ``threads``: the profile's physical cores, capped by the cores this process really
      has (``usable_cores()``): a simulated profile describes another machine's GPUs *and*
      CPU, and running 6 threads on a 2-core VM only makes them wait for each other.
    - ``dtype``/``tf32``: fp16 from compute capability 7.0, TF32 matmuls from 8.0 (Ampere).
    """
    threads = max(1, min(int(profile.cpu_cores or 1), usable_cores()))
    best = profile.best_gpu
    if best is None:
        return {"device": "cpu", "cudnn_benchmark": False, "memory_fraction": None, "embed_batch_size": 32,
                "threads": threads, "dtype": "float32", "tf32": False, "reserve_mb": reserve_mb}
    total = max(1, best.vram_total_mb)
    vram = best.vram_total_mb
    batch = 32 if vram < 4096 else 64 if vram < 8192 else 128 if vram < 16384 else 256
    try:
        cc = float(best.compute_capability) if best.compute_capability else 0.0
    except ValueError:
        cc = 0.0
    return {
        "device": f"cuda:{best.index}",
        "cudnn_benchmark": True,
        "memory_fraction": round(max(0.0, (total - reserve_mb) / total), 3),
        "embed_batch_size": batch,
        "threads": threads,
        "dtype": "float16" if cc == 0.0 or cc >= 7.0 else "float32",
        "tf32": cc >= 8.0,
        "reserve_mb": reserve_mb,
    }
