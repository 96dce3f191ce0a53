"""LlamaCppBackend against the real embedded Gemma 3 270M Q4_K_M GGUF."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.llama_cpp import LlamaCppBackend
from distributed.domain import GenerateRequest, ModelSpec
from distributed.errors import ConfigError, InputTooLong, MissingDependency, ModelFailed
from tests.unit.backends.helpers import assignment_for, loaded, run

CONTEXT = 1024


def _spec(chat_format: str | None = "gemma") -> ModelSpec:
    return ModelSpec(id="gemma-test", kind="chat", backend="llama_cpp", params_b=0.27, quant="Q4_K_M",
                     context=32768, chat_format=chat_format)


@pytest.fixture(scope="module")
def gemma(gemma_gguf: Path):
    yield from loaded(_spec(), BackendOptions(context=CONTEXT), gemma_gguf, LlamaCppBackend)


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
    text, chunks = run(gemma, GenerateRequest(messages=CHAT, max_tokens=24, temperature=0.0))
    assert text.strip()
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].text == "" and chunks[-1].finish_reason in ("stop", "length")
    assert "<start_of_turn>" not in text and "<end_of_turn>" not in text


@pytest.mark.slow
def test_seed_makes_output_reproducible_whatever_ran_before(gemma):
    for temperature in (0.0, 0.9):
        req = GenerateRequest(prompt="Once upon a time", max_tokens=16, temperature=temperature, seed=42)
        first, _ = run(gemma, req)
        run(gemma, GenerateRequest(prompt="A different prompt entirely", max_tokens=4, temperature=0.0))
        second, _ = run(gemma, GenerateRequest(prompt="Once upon a time", max_tokens=16,
                                                temperature=temperature, seed=42))
        assert first and first == second


@pytest.mark.slow
def test_max_tokens_gives_length(gemma):
    text, chunks = run(gemma, GenerateRequest(prompt="Count: one, two, three,", max_tokens=5, temperature=0.0))
    assert chunks[-1].finish_reason == "length"
    assert 1 <= len(chunks) - 1 <= 5
    assert len(gemma._llm.tokenize(text.encode(), add_bos=False)) <= 6  # re-tokenizing may split differently


@pytest.mark.slow
def test_stop_string_cuts_output(gemma):
    req = dict(prompt="The days of the week are Monday, Tuesday,", max_tokens=24, temperature=0.0)
    free, _ = run(gemma, GenerateRequest(**req))
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    cut = free.index(stop)
    text, chunks = run(gemma, GenerateRequest(**req, stop=[stop]))
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
    text, chunks = run(gemma, GenerateRequest(messages=CHAT, max_tokens=8, temperature=0.0, seed=1))
    assert text and chunks[-1].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_prompt_longer_than_context_is_input_too_long(gemma):
    with pytest.raises(InputTooLong) as err:
        list(gemma.stream(GenerateRequest(prompt="word " * (CONTEXT + 50), max_tokens=4), threading.Event()))
    assert err.value.limit == CONTEXT and err.value.got > CONTEXT


@pytest.mark.slow
def test_fallback_format_and_gpu_request_on_cpu_build(gemma_gguf: Path):
    import llama_cpp

    b = create_backend(_spec(chat_format=None), assignment_for(_spec(), n_gpu_layers=-1), BackendOptions(context=256),
                       gemma_gguf)
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
    b = create_backend(_spec(chat_format="no-such-format"), assignment_for(_spec()), BackendOptions(context=256),
                       gemma_gguf)
    with pytest.raises(ConfigError, match="no-such-format"):
        b.load()


def test_missing_or_broken_file_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(context=256), tmp_path / "absent.gguf")
    with pytest.raises(ModelFailed, match="not found"):
        b.load()
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(context=256), junk)
    with pytest.raises(ModelFailed, match="failed to load"):
        b.load()


def test_stream_before_load_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(), tmp_path / "x.gguf")
    with pytest.raises(ModelFailed, match="not loaded"):
        b.prompt_tokens(GenerateRequest(prompt="hi"))


def test_missing_llama_cpp_says_what_to_install(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(), tmp_path / "x.gguf")
    with pytest.raises(MissingDependency) as err:
        b.load()
    assert "pip install llama-cpp-python" in err.value.message
    assert err.value.http_status == 500


# A node process whose cluster thread logs while a model loads in another thread. The
# model load itself is hooked so that the other thread writes exactly while llama.cpp is
# inside its load call (where llama-cpp-python's verbose=False used to point fd 1 and 2
# at /dev/null for the whole process).
_LOAD_WHILE_LOGGING = r"""
import os, sys, threading
from pathlib import Path
import llama_cpp.llama_cpp as native
from distributed import logs
from distributed.backends.base import BackendOptions, create_backend
from distributed.domain import Assignment, ModelSpec

logs.configure("pc1", sys.argv[2])
cluster_log = logs.get_logger("cluster")
real_load = native.llama_model_load_from_file

def other_thread():
    cluster_log.info("peer pc2 joined")
    os.write(2, b"raw stderr from another thread\n")
    os.write(1, b"raw stdout from another thread\n")

def load_while_another_thread_writes(*args):
    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    return real_load(*args)

native.llama_model_load_from_file = load_while_another_thread_writes
spec = ModelSpec(id="gemma-test", kind="chat", backend="llama_cpp", params_b=0.27, quant="Q4_K_M",
                 context=32768, chat_format="gemma")
a = Assignment(model="gemma-test", kind="chat", node="pc1", device="cpu", quant="Q4_K_M",
               n_gpu_layers=0, vram_mb=0, reason="test", backend="llama_cpp")
b = create_backend(spec, a, BackendOptions(context=256, threads=1), Path(sys.argv[1]))
b.load()
b.unload()
print("done")
"""

_OUR_LINE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) +pc1 "


@pytest.mark.slow
@pytest.mark.parametrize("level", ["info", "debug"])
def test_loading_never_swallows_other_threads_output(gemma_gguf: Path, level: str):
    import re
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _LOAD_WHILE_LOGGING, str(gemma_gguf), level],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(re.match(_OUR_LINE + r"cluster: peer pc2 joined$", line) for line in err_lines), proc.stderr
    assert "raw stderr from another thread" in err_lines, proc.stderr
    assert proc.stdout.splitlines() == ["raw stdout from another thread", "done"], proc.stdout
    # llama.cpp's own output never reaches the console raw: only through our logger
    stray = [line for line in err_lines if line != "raw stderr from another thread" and not re.match(_OUR_LINE, line)]
    assert not stray, stray
    native = [line for line in err_lines if re.match(_OUR_LINE + r"backends\.llama_cpp\.native: ", line)]
    if level == "info":
        assert not native, native  # quiet at info: llama.cpp's load chatter is debug
    else:
        assert any("llama_model_loader" in line for line in native), err_lines


def test_llama_cpp_python_can_no_longer_repoint_fd_1_and_2():
    import os

    from distributed.backends import llama_cpp as ours

    lib = ours._import_llama_cpp()
    import llama_cpp._internals
    import llama_cpp.llama

    for module in (llama_cpp.llama, llama_cpp._internals):
        before = (os.fstat(1).st_ino, os.fstat(2).st_ino, sys.stdout, sys.stderr)
        with module.suppress_stdout_stderr(disable=False):  # what verbose=False runs around a load
            inside = (os.fstat(1).st_ino, os.fstat(2).st_ino, sys.stdout, sys.stderr)
        assert inside == before
    assert ours._callback and lib.llama_log_callback is type(ours._callback[0])


def test_native_log_lines_are_joined_and_levelled():
    import logging

    from distributed.backends import llama_cpp as ours

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    native = ours._native_log
    old_level = native.level
    native.addHandler(handler)
    native.setLevel(logging.DEBUG)
    try:
        # ggml levels: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous message
        for level, text in [(2, b"load_tensors: buffer"), (5, b" size = 235 MiB\n"), (2, b"."), (5, b"."),
                            (5, b"\n"), (3, b"using full-size SWA cache\n"), (4, b"error loading model\n"),
                            (2, b"two\nlines\n"), (2, None)]:
            ours._on_native_log(level, text, None)
    finally:
        native.removeHandler(handler)
        native.setLevel(old_level)
    got = [(r.levelno, r.getMessage()) for r in records]
    assert got == [(logging.DEBUG, "load_tensors: buffer size = 235 MiB"),
                   (logging.DEBUG, "using full-size SWA cache"),
                   (logging.WARNING, "error loading model"),
                   (logging.DEBUG, "two"), (logging.DEBUG, "lines")]


@pytest.mark.slow
def test_sampler_extras_are_honoured_in_process(gemma):
    """top_k=1 keeps only the most probable token: at a high temperature, with different
    seeds, the answer is the greedy one (llama-cpp-python's own top-k sampler)."""
    greedy, _ = run(gemma, GenerateRequest(messages=CHAT, max_tokens=12, temperature=0.0, seed=0))
    for seed in (1, 2):
        text, _ = run(gemma, GenerateRequest(messages=CHAT, max_tokens=12, temperature=1.5, seed=seed,
                                              sampling={"top_k": 1, "min_p": 0.0, "repeat_last_n": 8}))
        assert text == greedy
    assert gemma._llm.last_n_tokens_size == 64  # the per-request look-back is put back
    loose = {run(gemma, GenerateRequest(messages=CHAT, max_tokens=12, temperature=1.5, seed=s,
                                         sampling={"top_k": 0, "min_p": 0.0, "mirostat": 0}))[0] for s in (1, 2, 3)}
    assert loose != {greedy}  # without the cut the samples differ from the greedy answer


@pytest.mark.slow
def test_template_inputs_need_a_jinja_template(gemma):
    from distributed.errors import ValidationFailed

    for name, value in (("reasoning_effort", "low"), ("chat_template_kwargs", {"enable_thinking": False})):
        with pytest.raises(ValidationFailed) as err:
            gemma.check_request(GenerateRequest(messages=CHAT, **{name: value}))
        assert err.value.field == name and "built-in chat format" in err.value.message
