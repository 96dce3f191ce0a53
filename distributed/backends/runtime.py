"""Which runtime an embedding or rerank model runs on, chosen by measurement.

The same model answers through torch, ONNX Runtime or OpenVINO (``backends/exported.py``
makes and loads the exports; ``backends/st_base.py`` offers them for a sentence-transformers
model as ``Candidates``). ``TARS_EMBED_RUNTIME`` picks one, or ``auto`` (the default) measures
each available runtime on this host at the model's first load and keeps the fastest:

1. every candidate encodes a fixed set of probe sentences (``PROBE_SENTENCES``; pairs of them
   for a reranker) and is compared to torch's output (fp32): the lowest cosine of a row for
   embeddings, the cosine of the centred score vectors for scores (a reranker's scores must
   keep their order and spread). Below ``MIN_AGREEMENT`` it is not a candidate: a runtime that
   loses quality (an int8 model, a broken export) is never picked, however fast;
2. the rest are timed round-robin on the same workload (a batch of 32 and four single
   items: the node's micro-batcher sends both shapes), each at least once, then round after
   round until ``BUDGET_S`` has passed (at most ``MAX_ROUNDS``); a runtime's time is its best
   round, the least disturbed one (about a second in all on an idle 2-core CPU for MiniLM);
3. the fastest wins; torch always works, so there is always a winner.

A candidate that fails to export or load is skipped with a log line naming why. The choice
is cached (``ChoiceCache``: a small JSON beside the exports) under a key naming this host's
CPU and GPU, the device, the library versions and the model files, so the next load reuses
it at once and any change measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..logs import fields

MODES = ("auto", "torch", "onnx", "openvino")
MIN_AGREEMENT = 0.999
BUDGET_S = 2.0  # timing rounds stop after this much time (all candidates together)
MIN_ROUNDS, MAX_ROUNDS = 1, 8

PROBE_SENTENCES = [
    "A cat sits on the warm mat by the window.",
    "The stock market fell sharply today after the announcement.",
    "How do I bake bread at home without a stand mixer?",
    "Graphics cards with more memory can hold larger models.",
    "She walked along the river until the sun went down over the hills behind the old town.",
    "Rain.",
    "The committee will publish its final report on energy prices, housing and public transport next spring.",
    "Ein kleiner Hund spielt im Garten.",
    "Le train pour Lyon part à huit heures.",
    "Which of these two laptops has the longer battery life?",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "error: connection refused (port 8000)",
    "A quick brown fox jumps over the lazy dog while the farmer reads the morning paper in the kitchen "
    "and the radio plays an old song about the sea.",
    "Two home computers can share one local AI service.",
    "I loved this film!",
    "The recipe needs 200 g of flour, two eggs and a pinch of salt.",
]


class RuntimeUnavailable(Exception):
    """A runtime could not be made ready for a model (not installed, export or load failed).
    Not a ``TarsError``: it never leaves ``choose`` — the model runs on another runtime and the
    reason is logged and shown with the choice."""

    @property
    def message(self) -> str:
        return str(self)


class Candidates(Protocol):
    """The runtimes one loaded model can run on."""

    def names(self) -> list[str]:
        """Candidate runtimes, "torch" (the reference, fp32) first."""

    def default(self) -> str:
        """What ``TARS_EMBED_RUNTIME=torch`` runs here ("torch-fp16" on a CUDA card fast at fp16)."""

    def prepare(self, name: str) -> None:
        """Make ``name`` ready (export or load it); raise RuntimeUnavailable saying why."""

    def outputs(self, name: str) -> Any:
        """``name``'s output on the probe inputs: (n, dim) vectors or (n,) scores."""

    def run_workload(self, name: str) -> None:
        """One timing round on ``name``."""

    def activate(self, name: str) -> None:
        """Serve with ``name`` from now on; the others are dropped."""


@dataclass
class Trial:
    """One runtime as measured: its best round, its agreement with torch, or why it was out."""

    name: str
    seconds: float | None = None
    agreement: float | None = None
    error: str | None = None

    @property
    def eligible(self) -> bool:
        return self.error is None and self.agreement is not None and self.agreement >= MIN_AGREEMENT


@dataclass
class Choice:
    """The runtime a model runs on, and why (shown in /models and ``tars ps``)."""

    name: str
    why: str
    source: str  # "measured", "cached" or "setting"
    speedup: float | None = None  # over torch, as measured on this host
    agreement: float | None = None  # with torch's output on the probe set
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Choice:
        trials = [Trial(**t) for t in data.get("trials", ())]
        return cls(name=str(data["name"]), why=str(data["why"]), source=str(data.get("source", "measured")),
                   speedup=data.get("speedup"), agreement=data.get("agreement"), trials=trials)

    def info(self) -> dict[str, Any]:
        """The /models view: name, why, speed-up and agreement."""
        out: dict[str, Any] = {"name": self.name, "why": self.why, "source": self.source}
        if self.speedup is not None:
            out["speedup"] = round(self.speedup, 2)
        if self.agreement is not None:
            out["agreement"] = round(self.agreement, 6)
        return out


def agreement(out: Any, ref: Any) -> float:
    """How closely ``out`` matches ``ref``: vectors → the lowest row cosine; scores → the cosine
    of the two score vectors after centring (order and spread kept; 1.0 = the same)."""
    a = np.asarray(out, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    if a.shape != b.shape:
        return 0.0
    if a.ndim == 1:
        a = (a - a.mean())[None, :]
        b = (b - b.mean())[None, :]
        if not np.any(a) and not np.any(b):  # constant scores on both sides: identical
            return 1.0
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, 1e-30)
    return float(np.clip(cos.min(), -1.0, 1.0)) if cos.size else 1.0


class ChoiceCache:
    """Chosen runtimes as small JSON files in ``folder``, one per key (host, device, library
    versions, model files), named by the key's hash, the key kept inside for a human to read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / f"choice-{digest}.json"

    def get(self, key: dict[str, Any]) -> Choice | None:
        try:
            data = json.loads(self.path(key).read_text())
            if data.get("key") != key:
                return None
            return Choice.from_dict(data["choice"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: dict[str, Any], choice: Choice, log: logging.Logger) -> None:
        target = self.path(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"key": key, "choice": choice.to_dict(),
                                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("could not keep the runtime choice in %s (%s): the next load measures again", target, exc)


def choose(mode: str, cands: Candidates, *, cache: ChoiceCache | None, key: dict[str, Any], model: str,
           log: logging.Logger, clock: Callable[[], float] = time.perf_counter) -> Choice:
    """Make the runtime ``mode`` asks for ready and active; returns what runs and why."""
    if mode not in MODES:
        raise ValueError(f"runtime mode '{mode}' is not one of {', '.join(MODES)}")
    if mode == "auto":
        return _auto(cands, cache, key, model, log, clock)
    if mode == "torch" or mode not in cands.names():
        name = cands.default()
        why = f"{name}: TARS_EMBED_RUNTIME={mode}"
        if mode != "torch":
            why = f"{name}: TARS_EMBED_RUNTIME={mode}, but {mode} is not a runtime of this device"
            log.warning("model %s: %s", model, why, extra=fields(model=model))
        cands.prepare(name)
        cands.activate(name)
        return Choice(name, why, "setting")
    try:
        cands.prepare(mode)
        agree = agreement(cands.outputs(mode), cands.outputs("torch"))
    except RuntimeUnavailable as exc:
        name = cands.default()
        why = f"{name}: TARS_EMBED_RUNTIME={mode}, but {exc.message}"
        log.warning("model %s: %s", model, why, extra=fields(model=model, runtime=mode))
        cands.prepare(name)
        cands.activate(name)
        return Choice(name, why, "setting")
    cands.activate(mode)
    return Choice(mode, f"{mode}: TARS_EMBED_RUNTIME={mode}, cosine {agree:.5f} to torch", "setting",
                  agreement=agree)


def _auto(cands: Candidates, cache: ChoiceCache | None, key: dict[str, Any], model: str, log: logging.Logger,
          clock: Callable[[], float]) -> Choice:
    names = cands.names()
    cached = cache.get(key) if cache is not None else None
    if cached is not None and cached.name in names:
        try:
            cands.prepare(cached.name)
            cands.activate(cached.name)
            cached.source = "cached"
            log.info("model %s runs on %s (measured earlier on this host: %s)", model, cached.name, cached.why,
                     extra=fields(model=model, runtime=cached.name))
            return cached
        except RuntimeUnavailable as exc:
            log.warning("model %s: the runtime chosen earlier, %s, is not available now (%s): measuring again",
                        model, cached.name, exc.message, extra=fields(model=model, runtime=cached.name))
    t0 = clock()
    trials = measure(cands, log, model, clock)
    winner = pick(trials)
    choice = explain(winner, trials)
    cands.activate(winner.name)
    log.info("model %s runs on %s: %s (chosen in %.1f s, exports included; %s)", model, choice.name, choice.why,
             clock() - t0, "; ".join(_trial_text(t) for t in trials), extra=fields(model=model, runtime=choice.name))
    if cache is not None:
        cache.put(key, choice, log)
    return choice


def measure(cands: Candidates, log: logging.Logger, model: str,
            clock: Callable[[], float] = time.perf_counter) -> list[Trial]:
    """Agreement of every candidate with torch, then round-robin timing of those that agree."""
    names = cands.names()
    reference = cands.outputs(names[0])
    trials = [Trial(names[0], agreement=1.0)]
    for name in names[1:]:
        trial = Trial(name)
        trials.append(trial)
        try:
            cands.prepare(name)
            trial.agreement = agreement(cands.outputs(name), reference)
        except RuntimeUnavailable as exc:
            trial.error = exc.message
            log.warning("model %s: runtime %s skipped: %s", model, name, exc.message,
                        extra=fields(model=model, runtime=name))
            continue
        if not trial.eligible:
            log.warning("model %s: runtime %s is not used: its output's cosine to torch's is %.5f (< %g)", model,
                        name, trial.agreement, MIN_AGREEMENT, extra=fields(model=model, runtime=name))
    timed = [t for t in trials if t.eligible]  # the agreement run above was their warm-up
    start = clock()
    for rnd in range(MAX_ROUNDS):
        for t in timed if rnd % 2 == 0 else timed[::-1]:  # alternate who goes first
            t0 = clock()
            cands.run_workload(t.name)
            took = clock() - t0
            t.seconds = took if t.seconds is None else min(t.seconds, took)
        if rnd + 1 >= MIN_ROUNDS and clock() - start >= BUDGET_S:
            break
    return trials


def pick(trials: list[Trial]) -> Trial:
    """The fastest eligible trial (torch, the reference, is always eligible)."""
    timed = [t for t in trials if t.eligible and t.seconds is not None]
    return min(timed, key=lambda t: t.seconds or 0.0)


def explain(winner: Trial, trials: list[Trial]) -> Choice:
    torch = trials[0]
    speedup = (torch.seconds / winner.seconds) if torch.seconds and winner.seconds else None
    if winner is torch:
        others = [f"{t.name} {torch.seconds / t.seconds:.2f}x" for t in trials[1:]
                  if t.eligible and t.seconds and torch.seconds]
        why = f"{winner.name}: the fastest on this host" + (f" ({', '.join(others)} of it)" if others else "")
    else:
        why = f"{winner.name}: {speedup or 0:.1f}x {torch.name} on this host, cosine {winner.agreement:.5f}"
    return Choice(winner.name, why, "measured", speedup=speedup, agreement=winner.agreement, trials=trials)


def _trial_text(t: Trial) -> str:
    if t.error:
        return f"{t.name}: skipped ({t.error})"
    if not t.eligible:
        return f"{t.name}: cosine {t.agreement:.5f}, not used"
    return f"{t.name}: {t.seconds * 1000:.1f} ms a round, cosine {t.agreement:.5f}" if t.seconds else t.name
