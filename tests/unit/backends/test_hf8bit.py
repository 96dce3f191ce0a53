"""HF8BitBackend: a tiny random Llama loaded in real LLM.int8 by bitsandbytes on the CPU."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.hf8bit import HF8BitBackend, StopMatcher
from distributed.domain import GenerateRequest, ModelSpec
from distributed.errors import InputTooLong, ModelFailed
from tests.unit.backends.helpers import assignment_for, loaded, run


def _spec() -> ModelSpec:
    return ModelSpec(id="tiny-8bit", kind="chat", backend="hf8bit", params_b=0.0001, quant="int8", context=256)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    yield from loaded(_spec(), BackendOptions(context=2048), tiny_llama_dir, HF8BitBackend)


PROMPT = "the cat is on the"


@pytest.mark.slow
def test_weights_really_are_int8(tiny):
    import bitsandbytes as bnb
    import torch

    linears = [m for m in tiny._model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(linears) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert tiny.notes == []
    assert 0 < tiny.memory_mb()["ram_mb"] < 5


@pytest.mark.slow
def test_context_is_capped_by_the_model(tiny):
    assert tiny.context_length == 256  # max_position_embeddings, below the 2048 asked for


@pytest.mark.slow
def test_generates_text_with_length_finish(tiny):
    text, chunks = run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=6, temperature=0.0))
    assert text.strip()
    assert chunks[-1].finish_reason == "length" and chunks[-1].text == ""
    assert all(c.finish_reason is None for c in chunks[:-1])
    # every generated token of this word-level vocabulary is one word
    assert len(text.split()) == 6


@pytest.mark.slow
def test_greedy_and_seeded_sampling_are_reproducible(tiny):
    greedy = [run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=0.0))[0] for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=7))[0]
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    other = run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=8))[0]
    assert other != seeded[0]  # a random 60-word vocabulary: 12 equal draws is out of reach


@pytest.mark.slow
def test_stop_string_cuts_output(tiny):
    free, _ = run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3))
    words = free.split()
    stop = " ".join(words[3:5])
    cut = free.index(stop)
    text, chunks = run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, stop=[stop]))
    assert text == free[:cut]
    assert chunks[-1].finish_reason == "stop"


@pytest.mark.slow
def test_cancel_stops_within_a_token_or_two(tiny):
    cancel = threading.Event()
    chunks = []
    for c in tiny.stream(GenerateRequest(prompt=PROMPT, max_tokens=200, temperature=0.0), cancel):
        chunks.append(c)
        if len(chunks) == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert len(chunks) <= 3 + 2


@pytest.mark.slow
def test_abandoned_stream_stops_the_generation_thread(tiny):
    gen = tiny.stream(GenerateRequest(prompt=PROMPT, max_tokens=200, temperature=0.0), threading.Event())
    next(gen)
    gen.close()  # joins the worker: nothing left running
    assert not [t for t in threading.enumerate() if t.name.startswith("hf8bit-")]
    text, _ = run(tiny, GenerateRequest(prompt=PROMPT, max_tokens=3, temperature=0.0))
    assert text


@pytest.mark.slow
def test_chat_without_template_uses_role_lines(tiny):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]
    text, has_special = tiny.format_chat(msgs)
    assert text == "system: be brief\nuser: the cat\nassistant:" and not has_special
    req = GenerateRequest(messages=msgs, max_tokens=3, temperature=0.0)
    assert tiny.prompt_tokens(req) == len(tiny._tok(text)["input_ids"])
    out, chunks = run(tiny, req)
    assert out and chunks[-1].finish_reason == "length"


@pytest.mark.slow
def test_chat_with_template_uses_it(tiny):
    tok = tiny._tok
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}you {% endif %}")
    try:
        msgs = [{"role": "user", "content": "the cat"}]
        text, has_special = tiny.format_chat(msgs)
        assert text == "<s>user the cat you " and has_special
        req = GenerateRequest(messages=msgs, max_tokens=2, temperature=0.0)
        assert tiny.prompt_tokens(req) == len(tok(text, add_special_tokens=False)["input_ids"]) == 5
        assert run(tiny, req)[1][-1].finish_reason == "length"
    finally:
        tok.chat_template = None


@pytest.mark.slow
def test_prompt_longer_than_context_is_input_too_long(tiny):
    with pytest.raises(InputTooLong) as err:
        list(tiny.stream(GenerateRequest(prompt="the " * 300, max_tokens=4), threading.Event()))
    assert err.value.limit == 256 and err.value.got == 300


def test_missing_folder_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(), tmp_path / "nope")
    with pytest.raises(ModelFailed, match="folder not found"):
        b.load()


@pytest.mark.parametrize("pieces, stops, expected, hit", [
    (["hello ", "wor", "ld"], ["world"], "hello ", True),
    (["ab", "c", "d"], ["cx"], "abcd", False),          # "c" is held back, then released
    (["one. two"], ["."], "one", True),
    (["x", "y"], [], "xy", False),
    (["say <|e", "nd|> more"], ["<|end|>"], "say ", True),
])
def test_stop_matcher(pieces, stops, expected, hit):
    m = StopMatcher(stops)
    out, got_hit = "", False
    for p in pieces:
        text, got_hit = m.feed(p)
        out += text
        if got_hit:
            break
    if not got_hit:
        out += m.flush()
    assert (out, got_hit) == (expected, hit)


def test_stop_matcher_never_emits_a_partial_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("x") == ("STOx", False)
