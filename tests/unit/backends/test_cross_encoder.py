"""CrossEncoderBackend: a tiny random BERT cross-encoder through real sentence-transformers,
alone and behind a LocalTarget's micro-batcher; the fake reranker. (rerank.py's own checks:
tests/unit/test_rerank.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.cross_encoder import CrossEncoderBackend, FakeRerankBackend, Pair
from distributed.domain import ModelSpec
from distributed.errors import ModelFailed
from distributed.rerank import score_local
from distributed.targets import LocalTarget
from tests.unit.backends.helpers import assignment_for, loaded

pytestmark = pytest.mark.anyio


def _spec() -> ModelSpec:
    return ModelSpec(id="tiny-ce", kind="rerank", backend="cross_encoder", params_b=0.0001, quant="fp32", context=128)


@pytest.fixture(scope="module")
def tiny(tiny_cross_encoder_dir: Path):
    yield from loaded(_spec(), BackendOptions(context=128, batch_size=8), tiny_cross_encoder_dir, CrossEncoderBackend)


PAIRS = [Pair("what is the capital of france", "paris is the capital of france"),
         Pair("what is the capital of france", "the cat sat on the mat"),
         Pair("where is berlin", "berlin is a city in germany and it is on a river")]


@pytest.mark.slow
def test_scores_one_float_per_pair_in_zero_one(tiny):
    scores = tiny.embed(PAIRS)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))  # one label: sigmoid, like Cohere's relevance_score
    assert tiny.dim == 1 and tiny.max_seq_length == 128
    assert np.allclose(tiny.embed(list(reversed(PAIRS))), scores[::-1], atol=1e-6)  # a pair's score is its own
    assert tiny.embed([]).shape == (0,)


@pytest.mark.slow
def test_token_counts_are_the_pair_encodings(tiny):
    counts = tiny.count_tokens_each(PAIRS)
    tok = tiny._model.tokenizer
    assert counts == [len(tok(q, d)["input_ids"]) for q, d in PAIRS]
    assert tiny.count_tokens(PAIRS) == sum(counts)
    assert tiny.memory_mb()["ram_mb"] > 0


@pytest.mark.slow
def test_missing_folder_is_model_failed(tmp_path: Path):
    b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(), tmp_path / "nope")
    with pytest.raises(ModelFailed, match="folder not found"):
        b.load()


def test_pair_length_is_its_text_length():
    p = Pair("abc", "de")
    q, d = p
    assert (q, d) == ("abc", "de") and len(p) == 5 and p[1] == "de"


@pytest.mark.slow
async def test_concurrent_requests_share_one_predict_through_the_micro_batcher(tiny_cross_encoder_dir: Path):
    calls: list[int] = []

    def factory():
        b = create_backend(_spec(), assignment_for(_spec()), BackendOptions(context=128, batch_size=64),
                           tiny_cross_encoder_dir)
        original = b.embed

        def counting(texts, normalize=True):
            calls.append(len(texts))
            return original(texts, normalize)

        b.embed = counting  # type: ignore[method-assign]
        return b

    target = LocalTarget(_spec(), assignment_for(_spec()), factory, node="t", embed_max_batch=64, embed_max_wait_ms=50)
    target.start()
    assert await target.wait_loaded(60) == "ready"
    calls.clear()
    alone = await score_local(target, PAIRS[0][0], [p[1] for p in PAIRS[:2]])
    results = await asyncio.gather(*(score_local(target, q, [d, "the sky is blue"]) for q, d in PAIRS))
    await target.close()
    # each request's scores are those it would get alone, whatever it was batched with
    assert np.allclose(results[0].scores, [alone.scores[0], results[0].scores[1]], atol=1e-5)
    assert len(calls) < 1 + len(PAIRS)  # the three concurrent requests did not take three predicts
    assert all(r.prompt_tokens > 0 and r.method == "cross-encoder" and r.node == "t" for r in results)


def test_fake_reranker_orders_by_shared_words():
    spec = ModelSpec(id="fake-rr", kind="rerank", backend="fake", params_b=0.001, quant="fp32", context=128)
    b = create_backend(spec, assignment_for(_spec()), BackendOptions(), None, backend="fake")
    assert isinstance(b, FakeRerankBackend)
    b.load()
    scores = b.embed([Pair("capital of France", "Paris is the capital of France."), Pair("capital of France", "cats")])
    assert scores[0] == 1.0 and scores[1] == 0.0
