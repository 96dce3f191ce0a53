"""LlamaCppBackend against the real embedded Gemma 3 270M Q4_K_M GGUF."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.llama_cpp import LlamaCppBackend
from distributed.domain import Assignment, GenerateRequest, ModelSpec
from distributed.errors import ConfigError, InputTooLong, MissingDependency, ModelFailed

CONTEXT = 1024


def _spec(chat_format: str | None = "gemma") -> ModelSpec:
    return ModelSpec(id="gemma-test", kind="chat", backend="llama_cpp", params_b=0.27, quant="Q4_K_M",
                     context=32768, chat_format=chat_format)


def _assignment(n_gpu_layers: int = 0) -> Assignment:
    return Assignment(model="gemma-test", kind="chat", node="t", device="cpu", quant="Q4_K_M",
                      n_gpu_layers=n_gpu_layers, vram_mb=0, reason="test", backend="llama_cpp")


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path):
    b = create_backend(_spec(), _assignment(), BackendOptions(context=CONTEXT), gemma_gguf)
    assert isinstance(b, LlamaCppBackend)
    b.load()
    b.warmup()
    yield b
    b.unload()


def _run(b, req: GenerateRequest, cancel: threading.Event | None = None):
    chunks = list(b.stream(req, cancel or threading.Event()))
    return "".join(c.text for c in chunks), chunks


CHAT = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.mark.slow
def test_loads_with_configured_context(gemma):
    assert gemma.context_length == CONTEXT
    mem = gemma.memory_mb()
    assert mem["vram_mb"] == 0.0 and 150 < mem["ram_mb"] < 400  # the 4-bit 270M file is ~240 MB


@pytest.mark.slow
def test_gemma_chat_format_and_system_folded(gemma):
    text, stops, added_special = gemma.format_chat(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}])
    assert text.startswith("<start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\n")
    assert "<end_of_turn>\n" in stops and not added_special


@pytest.mark.slow
def test_prompt_tokens_match_what_llama_cpp_python_evaluates(gemma):
    req = GenerateRequest(messages=CHAT, max_tokens=1, temperature=0.0)
    n = gemma.prompt_tokens(req)
    text, _, _ = gemma.format_chat(CHAT)
    llm = gemma._llm
    assert n == len(llm.tokenize(text.encode(), add_bos=True, special=True))
    # llama-cpp-python's own chat path with the same format evaluates exactly these tokens
    llm.reset()
    llm.create_chat_completion(messages=CHAT, max_tokens=1, temperature=0.0)
    ours = llm.tokenize(text.encode(), add_bos=True, special=True)
    assert list(llm._input_ids[:n]) == ours
    assert ours[0] == llm.token_bos()


@pytest.mark.slow
def test_prompt_tokens_for_plain_prompt(gemma):
    req = GenerateRequest(prompt="The capital of France is", max_tokens=4)
    assert gemma.prompt_tokens(req) == len(gemma._llm.tokenize(b"The capital of France is", add_bos=True))


@pytest.mark.slow
def test_chat_stream_produces_text_and_ends_with_finish_reason(gemma):
    text, chunks = _run(gemma, GenerateRequest(messages=CHAT, max_tokens=24, temperature=0.0))
    assert text.strip()
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].text == "" and chunks[-1].finish_reason in ("stop", "length")
    assert "<start_of_turn>" not in text and "<end_of_turn>" not in text


@pytest.mark.slow
def test_seed_makes_output_reproducible_whatever_ran_before(gemma):
    for temperature in (0.0, 0.9):
        req = GenerateRequest(prompt="Once upon a time", max_tokens=16, temperature=temperature, seed=42)
        first, _ = _run(gemma, req)
        _run(gemma, GenerateRequest(prompt="A different prompt entirely", max_tokens=4, temperature=0.0))
        second, _ = _run(gemma, GenerateRequest(prompt="Once upon a time", max_tokens=16,
                                                temperature=temperature, seed=42))
        assert first and first == second


@pytest.mark.slow
def test_max_tokens_gives_length(gemma):
    text, chunks = _run(gemma, GenerateRequest(prompt="Count: one, two, three,", max_tokens=5, temperature=0.0))
    assert chunks[-1].finish_reason == "length"
    assert 1 <= len(chunks) - 1 <= 5
    assert len(gemma._llm.tokenize(text.encode(), add_bos=False)) <= 6  # re-tokenizing may split differently


@pytest.mark.slow
def test_stop_string_cuts_output(gemma):
    req = dict(prompt="The days of the week are Monday, Tuesday,", max_tokens=24, temperature=0.0)
    free, _ = _run(gemma, GenerateRequest(**req))
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    cut = free.index(stop)
    text, chunks = _run(gemma, GenerateRequest(**req, stop=[stop]))
    assert text == free[:cut]
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.slow
def test_cancel_stops_promptly(gemma):
    cancel = threading.Event()
    seen_after = 0
    chunks = []
    for c in gemma.stream(GenerateRequest(prompt="List the numbers from 1 to 100:", max_tokens=200,
                                          temperature=0.0), cancel):
        chunks.append(c)
        if cancel.is_set() and c.text:
            seen_after += 1
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert seen_after <= 1
    assert len(chunks) <= 5


@pytest.mark.slow
def test_abandoned_stream_leaves_model_usable(gemma):
    gen = gemma.stream(GenerateRequest(prompt="Tell me a long story.", max_tokens=100, temperature=0.0),
                       threading.Event())
    next(gen)
    gen.close()
    text, chunks = _run(gemma, GenerateRequest(messages=CHAT, max_tokens=8, temperature=0.0, seed=1))
    assert text and chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_prompt_longer_than_context_is_input_too_long(gemma):
    with pytest.raises(InputTooLong) as err:
        list(gemma.stream(GenerateRequest(prompt="word " * (CONTEXT + 50), max_tokens=4), threading.Event()))
    assert err.value.limit == CONTEXT and err.value.got > CONTEXT


@pytest.mark.slow
def test_fallback_format_and_gpu_request_on_cpu_build(gemma_gguf: Path):
    import llama_cpp

    b = create_backend(_spec(chat_format=None), _assignment(n_gpu_layers=-1), BackendOptions(context=256), gemma_gguf)
    b.load()
    try:
        # no template in the GGUF and none configured: llama-cpp-python's fallback format
        assert b._chat_format == "llama-2"
        assert b.prompt_tokens(GenerateRequest(messages=CHAT)) > 5
        if not llama_cpp.llama_supports_gpu_offload():
            assert any("GGML_CUDA" in n for n in b.notes)
            assert b.memory_mb()["vram_mb"] == 0.0
    finally:
        b.unload()


@pytest.mark.slow
def test_unknown_chat_format_is_config_error(gemma_gguf: Path):
    b = create_backend(_spec(chat_format="no-such-format"), _assignment(), BackendOptions(context=256), gemma_gguf)
    with pytest.raises(ConfigError, match="no-such-format"):
        b.load()


def test_missing_or_broken_file_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), _assignment(), BackendOptions(context=256), tmp_path / "absent.gguf")
    with pytest.raises(ModelFailed, match="not found"):
        b.load()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    b = create_backend(_spec(), _assignment(), BackendOptions(context=256), junk)
    with pytest.raises(ModelFailed, match="failed to load"):
        b.load()


def test_stream_before_load_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), _assignment(), BackendOptions(), tmp_path / "x.gguf")
    with pytest.raises(ModelFailed, match="not loaded"):
        b.prompt_tokens(GenerateRequest(prompt="hi"))


def test_missing_llama_cpp_says_what_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    b = create_backend(_spec(), _assignment(), BackendOptions(), tmp_path / "x.gguf")
    with pytest.raises(MissingDependency) as err:
        b.load()
    assert "pip install llama-cpp-python" in err.value.message
    assert err.value.http_status == 500
