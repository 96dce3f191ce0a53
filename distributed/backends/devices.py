"""Torch device choice for the torch-based backends (sentence, hf8bit).

The plan may say "cuda:0" on a host that cannot honour it: a simulated GPU profile on a
CPU machine, a CPU build of torch, a GPU that vanished. Such a model still runs — on the
CPU — and the fallback is never silent: it is logged as a warning and recorded in the
backend's ``notes`` (shown in /status and /models).
"""

from __future__ import annotations

import logging
from typing import Any

from ..logs import fields


def pick_device(torch: Any, requested: str, model_id: str, notes: list[str], log: logging.Logger) -> str:
    """The device to load on: ``requested`` when torch can use it, else "cpu" (noted)."""
    requested = (requested or "cpu").strip() or "cpu"
    if not requested.startswith("cuda"):
        return requested
    index = 0
    if ":" in requested:
        try:
            index = int(requested.split(":", 1)[1])
        except ValueError:
            index = -1
    if not torch.cuda.is_available():
        why = "torch has no CUDA here (CPU build or no NVIDIA driver)"
    elif not 0 <= index < torch.cuda.device_count():
        why = f"only {torch.cuda.device_count()} CUDA device(s) visible"
    else:
        return f"cuda:{index}"
    note = f"plan asked for {requested} but {why}: running on cpu"
    notes.append(note)
    log.warning(note, extra=fields(model=model_id))
    return "cpu"


def apply_cuda_tuning(torch: Any, device: str, extra: dict[str, Any]) -> None:
    """Apply the profiler's GPU knobs (``profiler.tuning``) before a model lands on
    ``device``: TF32 matmuls on Ampere+, cuDNN autotuning, and the share of the card this
    process may take (the rest is the reserve for the desktop and other processes).
    A no-op on the CPU. The first two are process-wide torch switches."""
    if not device.startswith("cuda"):
        return
    if extra.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if extra.get("cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
    fraction = extra.get("memory_fraction")
    if fraction:
        torch.cuda.set_per_process_memory_fraction(float(fraction), int(device.split(":", 1)[1]))


def wants_fp16(device: str, extra: dict[str, Any]) -> bool:
    """fp16 on CUDA unless the profiler says the card is better off in fp32 (pre-Volta
    cards, compute capability < 7.0, have slow fp16 arithmetic)."""
    return device.startswith("cuda") and extra.get("dtype", "float16") != "float32"
