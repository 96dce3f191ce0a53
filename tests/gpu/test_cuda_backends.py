"""The real backends on an NVIDIA GPU. Skips itself on hosts without one.

Run on a CUDA host with: ``pytest tests/gpu -q``. Needs a CUDA build of torch, and for the
llama test a CUDA build of llama-cpp-python (CMAKE_ARGS=-DGGML_CUDA=on).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.domain import Assignment, GenerateRequest, ModelSpec


def _nvidia_gpu() -> str | None:
    """Why there is no usable NVIDIA GPU, or None when there is one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() < 1:
                return "NVML sees no GPU"
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means no GPU for us
        if shutil.which("nvidia-smi") is None:
            return f"no NVIDIA driver (NVML: {exc})"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch has no CUDA (CPU build or driver mismatch)"
    return None


_WHY = _nvidia_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=f"no NVIDIA GPU: {_WHY}")]


def _assignment(model: str, kind: str, backend: str, quant: str, n_gpu_layers: int = 0) -> Assignment:
    return Assignment(model=model, kind=kind, node="gpu", device="cuda:0", quant=quant,  # type: ignore[arg-type]
                      n_gpu_layers=n_gpu_layers, vram_mb=0, reason="gpu test", backend=backend)


def test_llama_offloads_every_layer(gemma_gguf: Path):
    import llama_cpp

    spec = ModelSpec(id="gemma-gpu", kind="chat", backend="llama_cpp", params_b=0.27, quant="Q4_K_M",
                     context=32768, chat_format="gemma")
    b = create_backend(spec, _assignment("gemma-gpu", "chat", "llama_cpp", "Q4_K_M", -1),
                       BackendOptions(context=1024), gemma_gguf)
    b.load()
    try:
        if not llama_cpp.llama_supports_gpu_offload():
            assert any("GGML_CUDA" in n for n in b.notes)
            pytest.skip("llama-cpp-python here is a CPU build; reinstall with CMAKE_ARGS=-DGGML_CUDA=on")
        assert b.notes == []
        assert b.memory_mb()["vram_mb"] > 100
        chunks = list(b.stream(GenerateRequest(prompt="The sky is", max_tokens=8, temperature=0.0),
                               threading.Event()))
        assert "".join(c.text for c in chunks).strip() and chunks[-1].finish_reason in ("stop", "length")
    finally:
        b.unload()


def test_sentence_on_cuda_in_fp16(minilm_dir: Path):
    import numpy as np
    import torch

    spec = ModelSpec(id="minilm-gpu", kind="embed", backend="sentence", params_b=0.022, quant="fp16",
                     context=256, dim=384)
    b = create_backend(spec, _assignment("minilm-gpu", "embed", "sentence", "fp16"), BackendOptions(), minilm_dir)
    b.load()
    try:
        assert b.notes == []
        param = next(b._model.parameters())
        assert param.device.type == "cuda" and param.dtype == torch.float16
        v = b.embed(["A cat sits on the mat.", "A kitten rests on a rug.", "Stocks fell today."])
        assert v.dtype == np.float32 and v.shape == (3, 384)
        assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)
        assert v[0] @ v[1] > v[0] @ v[2]
        assert b.memory_mb()["vram_mb"] > 0
    finally:
        b.unload()


def test_hf8bit_on_cuda(tiny_llama_dir: Path):
    import bitsandbytes as bnb
    import torch

    spec = ModelSpec(id="tiny-gpu", kind="chat", backend="hf8bit", params_b=0.0001, quant="int8", context=256)
    b = create_backend(spec, _assignment("tiny-gpu", "chat", "hf8bit", "int8"), BackendOptions(), tiny_llama_dir)
    b.load()
    try:
        assert b.notes == []
        linears = [m for m in b._model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
        assert linears and all(m.weight.dtype == torch.int8 and m.weight.device.type == "cuda" for m in linears)
        chunks = list(b.stream(GenerateRequest(prompt="the cat is on the", max_tokens=5, temperature=0.0),
                               threading.Event()))
        assert "".join(c.text for c in chunks).strip() and chunks[-1].finish_reason == "length"
        assert b.memory_mb()["vram_mb"] > 0
    finally:
        b.unload()
