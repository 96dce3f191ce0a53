"""A model unloaded from the node hands its memory back to the OS (issue 11.2: RSS back
within 10% after a fallback stand-in is dropped).

Runs in a fresh interpreter so the figures are that process's alone: a resident
all-MiniLM-L6-v2 (the node's own model), then rounds of a second copy (a stand-in) loaded
through ``LocalTarget``, used for 30 batches, and closed. The first round is a warm-up and
sets the base: its hand-back also returns what loading the resident model left in the heap
(14-43 MB), which would otherwise hide what the later stand-ins leave behind.

Measured with ``python -m benchmarks.memory_spread`` (docs/BENCHMARKS.md): the highest RSS
after a stand-in closed, over three more rounds, less the base, is +2 to +28 MB with
``memory.give_back`` on close (median +10, 14 runs, base 527-548 MB), and +147 to +192 MB
without it (7 runs; glibc keeps the freed heap pages: about 60 MB a round). The bound, the
issue's 10% of the base (~53 MB), sits between the two with a margin on each side; the
stand-ins peak about 100 MB over the base.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROUNDS = 3  # after the warm-up
BOUND = 0.10  # of the base RSS (issue 11.2)

# argv: the model folder, the rounds after the warm-up, and "give-back" or "keep" ("keep"
# takes the hand-back out, to measure what the bound must stay below)
SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path
from distributed import memory
from distributed.backends.base import BackendOptions, create_backend
from distributed.domain import Assignment, EmbedRequest, ModelSpec
from distributed.memory import rss_mb
from distributed.targets.local import LocalTarget

folder, rounds, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if mode == "keep":
    memory.give_back = lambda: 0.0
spec = ModelSpec(id="minilm", kind="embed", backend="sentence", params_b=0.022, quant="fp32", context=256, dim=384)
a = Assignment(model="minilm", kind="embed", node="t", device="cpu", quant="fp32", n_gpu_layers=0, vram_mb=0,
               reason="test", backend="sentence")

def factory():
    return create_backend(spec, a, BackendOptions(batch_size=64), folder)

async def use(target, batches):
    for i in range(batches):
        out = await target.embed(EmbedRequest(input=[f"sentence {j} about thing {i} " * 3 for j in range(64)]))
        assert out.vectors.shape == (64, 384)

async def standin():
    t = LocalTarget(spec, a, factory, node="t")
    t.start()
    assert (await t.wait_loaded(300)).value == "ready"
    await use(t, 30)
    peak = rss_mb()
    await t.close()
    return peak

async def main():
    resident = LocalTarget(spec, a, factory, node="t")
    resident.start()
    assert (await resident.wait_loaded(300)).value == "ready"
    await use(resident, 20)
    await standin()  # the warm-up round
    base = rss_mb()
    peaks, afters = [], []
    for _ in range(rounds):
        peaks.append(await standin())
        afters.append(rss_mb())
    print(json.dumps({"mode": mode, "base": base, "peaks": peaks, "afters": afters}))
    await resident.close()

asyncio.run(main())
"""


def rounds_of_standins(minilm_dir: Path, rounds: int = ROUNDS, mode: str = "give-back") -> dict[str, Any]:
    """The figures of one fresh process (MB): ``base`` after the warm-up, then each round's
    ``peaks`` (stand-in loaded and used) and ``afters`` (stand-in closed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(minilm_dir), str(rounds), mode], capture_output=True,
                       text=True, timeout=900, env=env, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_closing_a_model_hands_its_memory_back(minilm_dir: Path) -> None:
    got = rounds_of_standins(minilm_dir)
    bound = BOUND * got["base"]
    assert max(got["peaks"]) > got["base"] + bound, got  # the stand-ins really took memory
    assert max(got["afters"]) <= got["base"] + bound, got  # ... and gave it back
