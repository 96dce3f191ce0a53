"""Handing freed memory back to the operating system after a model is unloaded.

A model dropped from this process (a fallback stand-in that is no longer needed, a model
removed or moved elsewhere) frees its tensors, but glibc's allocator keeps most of that
memory in its heaps for reuse, so the node's resident size stays where the model put it.
``give_back()`` collects Python's reference cycles (a model object can sit in one) and
then asks glibc to return its free pages (``malloc_trim``). Elsewhere (musl, macOS) the
second step is skipped; nothing fails.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
from collections.abc import Callable
from functools import cache

log = logging.getLogger(__name__)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def rss_mb() -> float:
    """This process's resident memory, MB (0.0 where /proc is not there)."""
    try:
        with open(f"/proc/{os.getpid()}/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def give_back() -> float:
    """Collect garbage and return free heap pages to the OS; the MB this process shrank by."""
    before = rss_mb()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return max(0.0, before - rss_mb())
