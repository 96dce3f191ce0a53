"""The runtime choice (backends/runtime.py) with fake candidates: fake timings on a fake clock,
fake outputs for the cosine, fake failures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from distributed.backends import runtime
from distributed.backends.runtime import (MIN_AGREEMENT, Choice, ChoiceCache, RuntimeUnavailable, agreement,
                                          choose)

REF = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
log = logging.getLogger("test.runtime")


@dataclass
class Clock:
    """A fake clock: the fake candidates move it on by each round's seconds."""

    t: float = 0.0

    def __call__(self) -> float:
        return self.t


class FakeCandidates:
    """``seconds``: one workload round per runtime; ``noise``: added to each runtime's output;
    ``broken``: runtimes whose prepare fails with that reason."""

    def __init__(self, clock: Clock, seconds: dict[str, float], noise: dict[str, float] | None = None,
                 broken: dict[str, str] | None = None, names: list[str] | None = None, default: str = "torch"):
        self.clock, self.seconds = clock, seconds
        self.noise = noise or {}
        self.broken = broken or {}
        self._names = names or ["torch", "onnx", "openvino"]
        self._default = default
        self.prepared: list[str] = []
        self.rounds: dict[str, int] = {}
        self.active: str | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def default(self) -> str:
        return self._default

    def prepare(self, name: str) -> None:
        if name in self.broken:
            raise RuntimeUnavailable(self.broken[name])
        self.prepared.append(name)

    def outputs(self, name: str) -> np.ndarray:
        rng = np.random.default_rng(hash(name) % 1000)
        return REF + self.noise.get(name, 0.0) * rng.normal(size=REF.shape).astype(np.float32)

    def run_workload(self, name: str) -> None:
        self.rounds[name] = self.rounds.get(name, 0) + 1
        self.clock.t += self.seconds[name]

    def activate(self, name: str) -> None:
        self.active = name


KEY = {"model": "m", "host": {"cpu": "test cpu"}, "versions": {"torch": "2.13.0", "openvino": "2026.4.1"}}


def _choose(cands: FakeCandidates, clock: Clock, mode: str = "auto", cache: ChoiceCache | None = None,
            key: dict | None = None) -> Choice:
    return choose(mode, cands, cache=cache, key=key or KEY, model="m", log=log, clock=clock)


def test_the_fastest_runtime_that_agrees_wins_and_says_why():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.28, "openvino": 0.10}, noise={"openvino": 0.005})
    choice = _choose(cands, clock)
    assert choice.name == cands.active == "openvino" and choice.source == "measured"
    assert choice.speedup == pytest.approx(3.0)
    assert choice.why.startswith("openvino: 3.0x torch on this host, cosine 0.9999")
    assert {t.name for t in choice.trials} == {"torch", "onnx", "openvino"}
    assert all(t.seconds is not None for t in choice.trials)
    info = choice.info()
    assert info["name"] == "openvino" and info["speedup"] == 3.0 and info["agreement"] >= MIN_AGREEMENT


def test_torch_wins_when_it_is_fastest():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.10, "onnx": 0.20, "openvino": 0.40})
    choice = _choose(cands, clock)
    assert choice.name == cands.active == "torch" and choice.speedup == pytest.approx(1.0)
    assert "the fastest on this host" in choice.why and "onnx 0.50x" in choice.why


def test_a_runtime_that_loses_quality_is_never_picked_however_fast():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.01, "openvino": 0.20}, noise={"onnx": 0.3})
    choice = _choose(cands, clock)
    assert choice.name == "openvino"
    onnx = next(t for t in choice.trials if t.name == "onnx")
    assert onnx.agreement is not None and onnx.agreement < MIN_AGREEMENT and not onnx.eligible
    assert "onnx" not in cands.rounds  # not even timed


def test_a_runtime_that_fails_to_export_or_load_is_skipped_with_its_reason(caplog):
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.05, "openvino": 0.20},
                           broken={"onnx": "the onnx export failed: ValueError: unsupported op"})
    with caplog.at_level(logging.WARNING, logger="test.runtime"):
        choice = _choose(cands, clock)
    assert choice.name == "openvino"
    onnx = next(t for t in choice.trials if t.name == "onnx")
    assert onnx.error == "the onnx export failed: ValueError: unsupported op" and onnx.seconds is None
    assert any("onnx skipped: the onnx export failed" in r.getMessage() for r in caplog.records)


def test_torch_always_works_when_every_other_runtime_fails():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.30}, broken={"onnx": "onnxruntime is not installed",
                                                           "openvino": "openvino is not installed"})
    assert _choose(cands, clock).name == cands.active == "torch"


def test_timing_is_bounded_and_alternates():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 5.0, "onnx": 5.0, "openvino": 5.0})  # a very slow host
    _choose(cands, clock)
    assert cands.rounds == {"torch": 1, "onnx": 1, "openvino": 1}  # one round each, then the budget is spent
    clock2 = Clock()
    fast = FakeCandidates(clock2, {"torch": 0.001, "onnx": 0.001, "openvino": 0.001})
    _choose(fast, clock2)
    assert set(fast.rounds.values()) == {runtime.MAX_ROUNDS}


def test_the_choice_is_cached_and_reused_without_measuring(tmp_path: Path):
    cache = ChoiceCache(tmp_path)
    clock = Clock()
    first = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.10, "openvino": 0.20})
    assert _choose(first, clock, cache=cache).name == "onnx"
    assert cache.path(KEY).exists()
    again = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.10, "openvino": 0.20})
    choice = _choose(again, clock, cache=cache)
    assert choice.name == again.active == "onnx" and choice.source == "cached"
    assert again.rounds == {} and again.prepared == ["onnx"]  # only the winner was made ready
    assert choice.why == "onnx: 3.0x torch on this host, cosine 1.00000"


def test_a_version_change_measures_again(tmp_path: Path):
    cache = ChoiceCache(tmp_path)
    clock = Clock()
    _choose(FakeCandidates(clock, {"torch": 0.30, "onnx": 0.10, "openvino": 0.20}), clock, cache=cache)
    newer = {**KEY, "versions": {**KEY["versions"], "openvino": "2027.0.0"}}
    cands = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.20, "openvino": 0.10})
    choice = _choose(cands, clock, cache=cache, key=newer)
    assert choice.name == "openvino" and choice.source == "measured" and cands.rounds
    assert cache.path(newer) != cache.path(KEY) and cache.get(KEY).name == "onnx"  # each key keeps its own


def test_a_cached_choice_that_no_longer_loads_is_measured_again(tmp_path: Path):
    cache = ChoiceCache(tmp_path)
    clock = Clock()
    _choose(FakeCandidates(clock, {"torch": 0.30, "onnx": 0.10, "openvino": 0.20}), clock, cache=cache)
    cands = FakeCandidates(clock, {"torch": 0.30, "onnx": 0.10, "openvino": 0.20},
                           broken={"onnx": "onnxruntime is not installed"})
    choice = _choose(cands, clock, cache=cache)
    assert choice.name == "openvino" and choice.source == "measured"
    assert cache.get(KEY).name == "openvino"


def test_a_corrupt_or_foreign_cache_file_is_ignored(tmp_path: Path):
    cache = ChoiceCache(tmp_path)
    cache.path(KEY).write_text("{not json")
    assert cache.get(KEY) is None
    cache.path(KEY).write_text('{"key": {"model": "other"}, "choice": {"name": "onnx", "why": "x"}}')
    assert cache.get(KEY) is None


def test_an_unwritable_cache_only_costs_a_warning(tmp_path: Path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    clock = Clock()
    with caplog.at_level(logging.WARNING, logger="test.runtime"):
        choice = _choose(FakeCandidates(clock, {"torch": 0.3, "onnx": 0.1, "openvino": 0.2}), clock,
                         cache=ChoiceCache(blocker / "sub"))
    assert choice.name == "onnx"
    assert any("could not keep the runtime choice" in r.getMessage() for r in caplog.records)


def test_an_explicit_runtime_is_honoured_with_its_cosine():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.3, "onnx": 0.1, "openvino": 0.2})
    choice = _choose(cands, clock, mode="openvino")
    assert choice.name == cands.active == "openvino" and choice.source == "setting"
    assert choice.why == "openvino: TARS_EMBED_RUNTIME=openvino, cosine 1.00000 to torch" and cands.rounds == {}


def test_an_explicit_runtime_that_fails_falls_back_to_torch_saying_why():
    clock = Clock()
    cands = FakeCandidates(clock, {"torch": 0.3}, broken={"onnx": "onnxruntime is not installed"})
    choice = _choose(cands, clock, mode="onnx")
    assert choice.name == cands.active == "torch"
    assert choice.why == "torch: TARS_EMBED_RUNTIME=onnx, but onnxruntime is not installed"


def test_torch_means_the_default_of_the_device():
    clock = Clock()
    gpu = FakeCandidates(clock, {"torch": 0.3}, names=["torch", "torch-fp16"], default="torch-fp16")
    choice = _choose(gpu, clock, mode="torch")
    assert choice.name == gpu.active == "torch-fp16" and gpu.prepared == ["torch-fp16"]
    cpu_only = _choose(gpu, clock, mode="openvino")  # not a runtime of a CUDA device
    assert cpu_only.name == "torch-fp16" and "not a runtime of this device" in cpu_only.why


def test_cuda_candidates_compare_fp16_with_fp32():
    clock = Clock()
    gpu = FakeCandidates(clock, {"torch": 0.3, "torch-fp16": 0.1}, noise={"torch-fp16": 1e-3},
                         names=["torch", "torch-fp16"])
    choice = _choose(gpu, clock)
    assert choice.name == "torch-fp16" and choice.why.startswith("torch-fp16: 3.0x torch on this host")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="not one of auto, torch, onnx, openvino"):
        _choose(FakeCandidates(Clock(), {}), Clock(), mode="tensorrt")


def test_agreement_of_vectors_is_the_lowest_row_cosine():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert agreement(a, a) == pytest.approx(1.0)
    assert agreement(b, a) == pytest.approx(np.sqrt(0.5))
    assert agreement(a, a[:1]) == 0.0  # a shape mismatch never agrees


def test_agreement_of_scores_is_centred():
    ref = np.array([0.1, 0.3, 0.5, 0.9])
    assert agreement(ref + 0.0001, ref) == pytest.approx(1.0)
    assert agreement(ref[::-1], ref) < 0  # the order reversed
    assert agreement(np.full(4, 0.5), np.full(4, 0.5)) == 1.0
    assert agreement(np.full(4, 0.5), ref) == 0.0  # all spread lost
