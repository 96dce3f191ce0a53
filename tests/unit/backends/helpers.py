"""What the backend tests share: a CPU assignment for a spec, a backend loaded (and
warmed up) for a module's tests, and one generation run to the end."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from distributed.backends.base import BackendOptions, create_backend
from distributed.domain import Assignment, GenerateRequest, ModelSpec, TokenChunk

B = TypeVar("B")


def assignment_for(spec: ModelSpec, device: str = "cpu", n_gpu_layers: int = 0) -> Assignment:
    """``spec`` placed on this host (node "t") with no VRAM, as the planner would for a test."""
    return Assignment(model=spec.id, kind=spec.kind, node="t", device=device, quant=spec.quant,
                      n_gpu_layers=n_gpu_layers, vram_mb=0, reason="test", backend=spec.backend)


def loaded(spec: ModelSpec, options: BackendOptions, path: Path, kind: type[B]) -> Iterator[B]:
    """For a module-scoped fixture: the real backend of ``spec`` from ``path``, which must
    be a ``kind``, loaded and warmed up; unloaded after the module's tests."""
    b = create_backend(spec, assignment_for(spec), options, path)
    assert isinstance(b, kind)
    b.load()
    b.warmup()
    yield b
    b.unload()


def run(b: Any, req: GenerateRequest, cancel: threading.Event | None = None) -> tuple[str, list[TokenChunk]]:
    """One generation to its end: the joined text and the chunks."""
    chunks = list(b.stream(req, cancel or threading.Event()))
    return "".join(c.text for c in chunks), chunks
