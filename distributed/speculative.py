"""Speculative decoding: which kind a GGUF chat model's engine runs, and whether a draft
model may serve it (the same vocabulary, read from both GGUF headers).

llama-server verifies several guessed tokens in one batch and keeps those the model would
have produced itself (greedy output is unchanged, up to how llama.cpp's CPU kernels round a
batch: docs/BENCHMARKS.md). The guesses come from

- **n-gram** (``ngram``): llama-server's own draftless lookup, ``--spec-type ngram-mod``:
  a rolling hash of the last ``n_match`` (24) tokens maps to the token that followed them,
  in one pool (~16 MB) shared by every slot; a draft is taken only where a whole 24-token
  run was seen before, and is 48-64 tokens long on a GPU (``CPU_NGRAM``, 8-16, elsewhere).
  No second model, no VRAM. It pays where
  the answer repeats text already in the context (rewriting given code, quoting) and costs
  next to nothing where nothing matches;
- **a draft model** (``draft``): a small model with the target's vocabulary (the catalog's
  or ``POST /models``' ``draft``), ``--spec-type draft-simple -md FILE``; its weights and
  a KV cache per slot are planned beside the target (``drafts.py``, the planner's rule 7).

``TARS_SPECULATIVE``:

- ``off``: none; ``ngram``: n-gram for every GGUF chat engine; ``draft``: the planned
  draft where the model has one, else none;
- ``auto`` (default): the planned draft where the model has one (its user asked for it);
  else n-gram for every GGUF chat engine, whatever its slots.

Why at any number of slots. llama-server speculates per slot inside the one batch it
decodes for all its slots: at N streams every slot's draft joins that batch, so a step with
drafts takes longer for every stream, and on a CPU a verified token costs about half a
decode step. Measured through the node on the 2-core dev VM (``benchmarks/bench_spec.py``,
docs/BENCHMARKS.md, runs E-G), on a quiet machine n-gram paid everywhere:

- 1 slot: copy-heavy 1.62× (medians) / 1.63× (paired), free-form 1.17× / 1.19×, 4 queued
  free-form streams 1.02× / 1.01×;
- 4 slots, two runs: 1 stream copy-heavy 1.77-1.82×, free-form 1.03-1.09×; 4 streams
  aggregate tokens/s copy-heavy 1.08-1.18×, free-form 1.08-1.18×, every round at or
  above off's; engine CPU per token lower at every level.

Under heavy outside load (load average 4-9 on the 2 cores) two earlier runs lost aggregate
throughput with 4 copy-heavy streams (0.87×): other processes preempted the engine's
threads in the middle of its longer verifying batches. A host whose CPU is that busy with
other work can set ``TARS_SPECULATIVE=off``; ``auto`` follows the quiet measurements. A GPU,
where a 16-token batch costs about one decode step, gains more.
n-gram drafts are ``CPU_NGRAM`` long (8-16 tokens) unless every layer is on a GPU: with
llama.cpp's 48-64, copy-heavy answers at 1 stream went 0.82× through the node and 0.83-1.18×
on the bare engine; with 8-16, 1.13-1.14× on the bare engine (paired medians of 8-12 prompts).

API::

    decide(mode, spec, draft=None) -> Speculation          # the kind one engine runs, and why
    Speculation.argv(draft_path, device, whole_on_gpu=) -> [flags]   # llama-server's flags for it
    read_vocab(path) -> Vocab                               # from the GGUF header (cached)
    vocab_mismatch(target, draft) -> str | None             # what differs, as llama.cpp checks
    check_draft(model, model_path, draft, draft_path)       # ValidationFailed (400) naming "draft"
    DraftStats: .add(timings) from each answer, .info()      # acceptance in GET /models
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import ModelSpec
from .errors import ValidationFailed
from .gguf_header import read_gguf
from .vram import has_slots

MODES = ("auto", "off", "ngram", "draft")
NGRAM_TYPE = "ngram-mod"  # llama-server's --spec-type for draftless speculation
DRAFT_TYPE = "draft-simple"  # llama-server's --spec-type for a standalone draft model
# n-gram drafts of 8-16 tokens where the model runs (partly) on a CPU: there verifying a draft
# costs in proportion to its length, and a rejected 48-64-token draft (llama.cpp's lengths, made
# for GPUs) cost more than the accepted ones gained (docs/BENCHMARKS.md, speculative decoding)
CPU_NGRAM = ("--spec-ngram-mod-n-min", "8", "--spec-ngram-mod-n-max", "16")
AUTO_RULE = ("n-gram for every GGUF chat engine: it paid at 1 and 4 slots, 1 and 4 streams, copy-heavy and "
             "free-form, on a quiet host (docs/BENCHMARKS.md)")


@dataclass(frozen=True)
class Speculation:
    """How one engine speculates: ``kind`` "off" | "ngram" | "draft", and why."""

    kind: str = "off"
    reason: str = ""
    draft: str | None = None  # the draft model's id (kind "draft")
    draft_device: str | None = None  # "cuda:N": the draft's own GPU (--device-draft); None: beside the model

    @property
    def spec_type(self) -> str | None:
        return {"ngram": NGRAM_TYPE, "draft": DRAFT_TYPE}.get(self.kind)

    def argv(self, draft_path: Path | None, device: str, *, whole_on_gpu: bool = False) -> list[str]:
        """llama-server's flags for an engine on ``device`` ("cuda:N" or "cpu"): none when off;
        a draft without its file runs as off. The draft follows the model's GPU unless the
        plan gave it another (``-devd CUDAk``, ggml's name of that GPU). n-gram drafts are
        ``CPU_NGRAM`` long unless every layer is on a GPU (``whole_on_gpu``: llama.cpp's own
        lengths, 48-64, where verifying a long draft costs about one decode step)."""
        if self.kind == "ngram":
            return ["--spec-type", NGRAM_TYPE] + ([] if whole_on_gpu else list(CPU_NGRAM))
        if self.kind != "draft" or draft_path is None:
            return []
        where = self.draft_device or device
        out = ["--spec-type", DRAFT_TYPE, "-md", str(draft_path), "-ngld", "999" if where.startswith("cuda:") else "0"]
        if where.startswith("cuda:") and where != device:
            out += ["-devd", "CUDA" + where.split(":", 1)[1]]
        return out

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "type": self.spec_type, "draft": self.draft, "draft_device": self.draft_device,
                "reason": self.reason}


def decide(mode: str, spec: ModelSpec, draft: dict[str, Any] | None = None) -> Speculation:
    """The speculation of ``spec``'s engine under ``TARS_SPECULATIVE=mode``; ``draft``: the
    plan's ``Assignment.draft`` (the draft it found room for)."""
    if not has_slots(spec):
        return Speculation("off", "not a GGUF chat model on llama-server")
    if mode == "off":
        return Speculation("off", "TARS_SPECULATIVE=off")
    if mode == "ngram":
        return Speculation("ngram", "TARS_SPECULATIVE=ngram")
    if draft and mode in ("auto", "draft"):
        return Speculation("draft", f"TARS_SPECULATIVE={mode}: draft model {draft['model']}",
                           draft=draft["model"], draft_device=draft.get("device"))
    if mode == "draft":
        why = "no draft planned (out of room)" if spec.draft else "the model names no draft"
        return Speculation("off", f"TARS_SPECULATIVE=draft but {why}")
    return Speculation("ngram", f"TARS_SPECULATIVE=auto: {AUTO_RULE}")


# --------------------------------------------------------------------------- vocabulary
VOCAB_MAX_SIZE_DIFFERENCE = 128  # llama.cpp's own bounds (common/speculative.cpp)
VOCAB_CHECK_START = 5  # token ids below this are not compared (special tokens)
_TOKENS = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class Vocab:
    """A model's tokenizer as its GGUF header states it."""

    kind: str  # tokenizer.ggml.model: "gpt2", "llama", ...
    tokens: tuple[bytes, ...] = field(repr=False)
    bos: int | None = None
    eos: int | None = None
    add_bos: bool | None = None  # None: not stated in the file
    add_eos: bool | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the token list (length-prefixed pieces), short."""
        h = hashlib.sha256()
        for t in self.tokens:
            h.update(len(t).to_bytes(4, "little") + t)
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.kind} tokenizer, {self.n_tokens} tokens, digest {self.digest}"


def read_vocab(path: str | Path) -> Vocab:
    """The vocabulary in ``path``'s GGUF header (cached per file, size and mtime)."""
    p = Path(path)
    st = p.stat()
    return _read_vocab(str(p.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_vocab(path: str, size: int, mtime_ns: int) -> Vocab:
    f = read_gguf(path, keep=(_TOKENS,)).fields

    def opt(key: str) -> Any:
        return f.get(f"tokenizer.ggml.{key}")

    tokens = f.get(_TOKENS)
    return Vocab(kind=str(opt("model") or "?"), tokens=tuple(tokens) if isinstance(tokens, list) else (),
                 bos=opt("bos_token_id"), eos=opt("eos_token_id"), add_bos=opt("add_bos_token"),
                 add_eos=opt("add_eos_token"))


def _special_differs(name: str, add_t: bool | None, add_d: bool | None, id_t: int | None,
                     id_d: int | None) -> str | None:
    if add_t is not None and add_d is not None and add_t != add_d:
        return f"one adds a {name} token to every prompt and the other does not"
    if (add_t or add_d) and id_t != id_d:
        return f"{name} token {id_t} vs {id_d}"
    return None


def vocab_mismatch(target: Vocab, draft: Vocab) -> str | None:
    """What makes ``draft`` unusable for ``target``, or None — the checks llama.cpp makes
    before it speculates: the same tokenizer type, the same BOS/EOS handling, token counts
    within 128 and the same text for every token id from 5 up (the header's token list)."""
    if target.kind != draft.kind:
        return f"tokenizer {target.kind} vs {draft.kind}"
    for name, a, b, i, j in (("BOS", target.add_bos, draft.add_bos, target.bos, draft.bos),
                             ("EOS", target.add_eos, draft.add_eos, target.eos, draft.eos)):
        why = _special_differs(name, a, b, i, j)
        if why:
            return why
    if not target.tokens or not draft.tokens:
        return "a token list is missing from a GGUF header"
    if abs(target.n_tokens - draft.n_tokens) > VOCAB_MAX_SIZE_DIFFERENCE:
        return f"{target.n_tokens} vs {draft.n_tokens} tokens (llama.cpp allows {VOCAB_MAX_SIZE_DIFFERENCE} apart)"
    if target.digest == draft.digest:
        return None
    n = min(target.n_tokens, draft.n_tokens)
    for i in range(VOCAB_CHECK_START, n):
        if target.tokens[i] != draft.tokens[i]:
            t, d = (x.decode("utf-8", "replace")[:40] for x in (target.tokens[i], draft.tokens[i]))
            return f"token {i} is {t!r} vs {d!r}"
    return None


def check_draft(model: str, model_path: str | Path, draft: str, draft_path: str | Path) -> None:
    """Raise ``ValidationFailed`` (400, field ``draft``) unless ``draft`` shares ``model``'s vocabulary."""
    target, candidate = read_vocab(model_path), read_vocab(draft_path)
    why = vocab_mismatch(target, candidate)
    if why is not None:
        raise ValidationFailed(
            f"draft '{draft}' cannot speculate for '{model}': their vocabularies differ ({why}); '{model}' has a "
            f"{target.describe()}, '{draft}' a {candidate.describe()}. A draft model must share its target's "
            "tokenizer (usually a smaller model of the same family)", field="draft", model=model, draft=draft)


# --------------------------------------------------------------------------- acceptance
@dataclass
class DraftStats:
    """Draft tokens proposed and accepted, summed over answers (llama-server's ``timings``)."""

    drafted: int = 0
    accepted: int = 0

    def add(self, timings: dict[str, Any] | None) -> None:
        t = timings or {}
        self.drafted += int(t.get("draft_n") or 0)
        self.accepted += int(t.get("draft_n_accepted") or 0)

    def info(self) -> dict[str, Any]:
        rate = round(self.accepted / self.drafted, 4) if self.drafted else None
        return {"draft_tokens": self.drafted, "accepted_tokens": self.accepted, "acceptance": rate}
