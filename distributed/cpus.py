"""How many CPU cores this process may really use — llama.cpp's own rule for its threads.

llama.cpp defaults its thread count to the physical cores: on Linux it counts the
distinct ``/sys/devices/system/cpu/cpu<N>/topology/thread_siblings`` masks (SMT siblings
share one mask, so two hyper-threads count once). We apply the same rule to the CPUs
this process is allowed on (``os.sched_getaffinity``: a taskset or a container's CPU
set), so a node pinned to 3 CPUs runs 3 threads, and a VM with one thread per core uses
all of its cores. llama-cpp-python's own default (``cpu_count() // 2``) halves that on
such a VM: 1 thread of 2 there.

Where the topology files are absent (macOS, Windows, some sandboxes) psutil's count of
physical cores is used, capped by the allowed CPUs, then ``os.cpu_count()``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MissingDependency
from .optional import require

SYSFS_CPUS = Path("/sys/devices/system/cpu")


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux; absent on macOS and Windows
        allowed = sorted(os.sched_getaffinity(0))
        if allowed:
            return allowed
    return list(range(os.cpu_count() or 1))


def physical_cores(sysfs: Path | None = None) -> int:
    """The physical cores among the CPUs this process may use (at least 1); ``sysfs``:
    the folder holding ``cpu<N>/topology`` (default ``SYSFS_CPUS``)."""
    sysfs = sysfs or SYSFS_CPUS
    allowed = allowed_cpus()
    masks: set[str] = set()
    for cpu in allowed:
        try:
            masks.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings").read_text().strip())
        except OSError:
            masks.clear()  # incomplete topology: count another way
            break
    if masks:
        return len(masks)
    try:
        psutil = require("psutil", "psutil", "counting CPU cores")
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except MissingDependency:
        cores = os.cpu_count() or 1
    return max(1, min(int(cores), len(allowed)))
