"""A model unloaded from the node hands its memory back to the OS (issue 11.2: RSS back
within 10% after a fallback stand-in is dropped).

Runs in a fresh interpreter so the figures are that process's alone: a resident
all-MiniLM-L6-v2 (the node's own model), then three rounds of a second copy (a stand-in)
loaded through ``LocalTarget``, used for 30 batches, and closed. Without handing memory
back (glibc keeps freed heap pages) the process grows by ~30 MB over the three rounds;
with ``memory.give_back`` on close it ends where it began.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path
from distributed.backends.base import BackendOptions, create_backend
from distributed.domain import Assignment, EmbedRequest, ModelSpec
from distributed.memory import rss_mb
from distributed.targets.local import LocalTarget

folder = Path(sys.argv[1])
spec = ModelSpec(id="minilm", kind="embed", backend="sentence", params_b=0.022, quant="fp32", context=256, dim=384)
a = Assignment(model="minilm", kind="embed", node="t", device="cpu", quant="fp32", n_gpu_layers=0, vram_mb=0,
               reason="test", backend="sentence")

def factory():
    return create_backend(spec, a, BackendOptions(batch_size=64), folder)

async def use(target, rounds):
    for i in range(rounds):
        out = await target.embed(EmbedRequest(input=[f"sentence {j} about thing {i} " * 3 for j in range(64)]))
        assert out.vectors.shape == (64, 384)

async def main():
    resident = LocalTarget(spec, a, factory, node="t")
    resident.start()
    assert (await resident.wait_loaded(300)).value == "ready"
    await use(resident, 20)
    base = rss_mb()
    peaks = []
    for _ in range(3):
        standin = LocalTarget(spec, a, factory, node="t")
        standin.start()
        assert (await standin.wait_loaded(300)).value == "ready"
        await use(standin, 30)
        peaks.append(rss_mb())
        await standin.close()
    print(json.dumps({"base": base, "peaks": peaks, "after": rss_mb()}))
    await resident.close()

asyncio.run(main())
"""


def test_closing_a_model_hands_its_memory_back(minilm_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(minilm_dir)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert max(got["peaks"]) > got["base"] + 20, got  # the stand-in really took memory
    assert got["after"] <= got["base"] + 15, got  # ... and gave it back
