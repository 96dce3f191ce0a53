"""SentenceBackend against the real embedded all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.sentence import SentenceBackend
from distributed.domain import ModelSpec
from distributed.errors import ModelFailed
from tests.unit.backends.helpers import assignment_for, loaded


def _spec() -> ModelSpec:
    return ModelSpec(id="minilm-test", kind="embed", backend="sentence", params_b=0.022, quant="fp32",
                     context=256, dim=384)


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path):
    yield from loaded(_spec(), BackendOptions(batch_size=4), minilm_dir, SentenceBackend)


SENTENCES = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today.",
             "Shares dropped as investors panicked.", "How do I bake bread?"]


@pytest.mark.slow
def test_shape_dtype_and_unit_norm(minilm):
    assert minilm.dim == 384 and minilm.max_seq_length == 256
    v = minilm.embed(SENTENCES, normalize=True)
    assert isinstance(v, np.ndarray) and v.dtype == np.float32 and v.shape == (len(SENTENCES), 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    raw = minilm.embed(SENTENCES[:2], normalize=False)
    # all-MiniLM-L6-v2 ends in a Normalize module, so raw vectors are unit length too
    assert raw.shape == (2, 384) and raw.dtype == np.float32 and np.isfinite(raw).all()


@pytest.mark.slow
def test_similar_sentences_are_closer(minilm):
    v = minilm.embed(SENTENCES)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 4]
    assert sim[2, 3] > sim[2, 0] + 0.2 and sim[2, 3] > sim[2, 4]


@pytest.mark.slow
def test_batching_does_not_change_vectors(minilm):
    together = minilm.embed(SENTENCES)  # batch_size 4: two encode batches, padded
    one_by_one = np.vstack([minilm.embed([s]) for s in SENTENCES])
    assert np.allclose(together, one_by_one, atol=1e-5)


@pytest.mark.slow
def test_empty_input_gives_empty_matrix(minilm):
    v = minilm.embed([])
    assert v.shape == (0, 384) and v.dtype == np.float32


@pytest.mark.slow
def test_count_tokens_matches_model_tokenizer(minilm):
    tok = minilm._model.tokenizer
    texts = ["hello world", "Embeddings are vectors.", "x " * 1000]
    expected = sum(len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    got = minilm.count_tokens(texts)
    assert got == expected
    assert minilm.count_tokens(["hello world"]) == 4  # [CLS] hello world [SEP]
    assert minilm.count_tokens(["x " * 1000]) == 256  # truncated like encode()
    assert minilm.count_tokens_each(texts) == [4, len(tok(texts[1])["input_ids"]), 256]


@pytest.mark.slow
def test_memory_reported(minilm):
    mem = minilm.memory_mb()
    assert mem["vram_mb"] == 0.0 and 50 < mem["ram_mb"] < 200  # 22.7M params in fp32 ~ 87 MB


@pytest.mark.slow
def test_cuda_plan_on_cpu_host_runs_on_cpu_and_says_so(minilm_dir: Path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    b = create_backend(_spec(), assignment_for(_spec(), "cuda:0"), BackendOptions(), minilm_dir)
    b.load()
    try:
        assert any("cuda:0" in n and "cpu" in n for n in b.notes)
        assert b.embed(["still works"]).shape == (1, 384)
    finally:
        b.unload()


def test_missing_folder_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(), tmp_path / "nope")
    with pytest.raises(ModelFailed, match="folder not found"):
        b.load()
