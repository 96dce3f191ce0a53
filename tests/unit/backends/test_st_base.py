"""The real models on ONNX Runtime and OpenVINO (backends/st_base.py, exported.py): exported once
under the models folder, reused on the next load, made again when the model changes, and
answering like torch — the embedded MiniLM, a MiniLM-sized cross-encoder and the tiny one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distributed.backends import exported
from distributed.backends.base import BackendOptions, create_backend
from distributed.backends.cross_encoder import Pair
from distributed.backends.runtime import MIN_AGREEMENT, agreement
from distributed.backends.st_base import STBackend, runtimes_root
from distributed.domain import Assignment, ModelSpec

SENTENCES = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today.",
             "Shares dropped as investors panicked.", "How do I bake bread?", "Wie backe ich Brot?"]
PAIRS = [Pair("what is the capital of france", "paris is the capital of france"),
         Pair("what is the capital of france", "the cat sat on the mat"),
         Pair("where is berlin", "berlin is a city in germany and it is on a river"),
         Pair("how do i bake bread", "mix flour, water, yeast and salt, then bake for forty minutes")]


def _embed_spec(model_id: str = "minilm-rt") -> ModelSpec:
    return ModelSpec(id=model_id, kind="embed", backend="sentence", params_b=0.022, quant="fp32", context=256, dim=384)


def _rerank_spec(model_id: str, context: int = 256) -> ModelSpec:
    return ModelSpec(id=model_id, kind="rerank", backend="cross_encoder", params_b=0.022, quant="fp32",
                     context=context)


def _load(spec: ModelSpec, folder: Path, runtime: str, runtime_dir: Path | None) -> STBackend:
    a = Assignment(model=spec.id, kind=spec.kind, node="t", device="cpu", quant="fp32", n_gpu_layers=0, vram_mb=0,
                   reason="test", backend=spec.backend)
    b = create_backend(spec, a, BackendOptions(batch_size=8, runtime=runtime, runtime_dir=runtime_dir), folder)
    assert isinstance(b, STBackend)
    b.load()
    return b


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models") / "runtimes"


@pytest.fixture(scope="module")
def torch_vectors(minilm_dir: Path) -> np.ndarray:
    b = _load(_embed_spec(), minilm_dir, "torch", None)
    try:
        assert b.runtime is not None and b.runtime.name == "torch" and b.runtime.source == "setting"
        return b.embed(SENTENCES)
    finally:
        b.unload()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_minilm_exports_once_and_answers_like_torch(runtime, minilm_dir, runtime_dir, torch_vectors):
    b = _load(_embed_spec(), minilm_dir, runtime, runtime_dir)
    try:
        info = b.runtime_info()
        assert info is not None and info["name"] == runtime and info["source"] == "setting"
        assert info["agreement"] >= MIN_AGREEMENT and "cosine" in info["why"]
        vectors = b.embed(SENTENCES)
        assert vectors.shape == (len(SENTENCES), 384) and vectors.dtype == np.float32
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        assert agreement(vectors, torch_vectors) >= MIN_AGREEMENT
        assert b.embed(SENTENCES[:1]).shape == (1, 384) and b.embed([]).shape == (0, 384)
        assert b.count_tokens_each(["a cat"]) == [4]  # [CLS] a cat [SEP]: the counter is the tokenizer's
        assert b.memory_mb()["ram_mb"] > 50  # the export's weights
    finally:
        b.unload()
    package = "onnxruntime" if runtime == "onnx" else "openvino"
    folder = runtime_dir / "minilm-rt" / f"{runtime}-{exported.version(package)}"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["torch"] == exported.version("torch") and meta["inputs"][0] == "input_ids"
    weights = next(f for f in folder.iterdir() if f.suffix in (".onnx", ".bin"))
    before = weights.stat().st_mtime_ns

    again = _load(_embed_spec(), minilm_dir, runtime, runtime_dir)  # the second load reuses the export
    try:
        assert again.runtime is not None and again.runtime.name == runtime
        assert agreement(again.embed(SENTENCES), torch_vectors) >= MIN_AGREEMENT
    finally:
        again.unload()
    assert weights.stat().st_mtime_ns == before
    assert not any(p.name in ("onnx", "openvino", "runtimes") for p in minilm_dir.iterdir())  # nothing in site-packages


@pytest.mark.slow
def test_auto_measures_once_then_reuses_its_choice(tiny_cross_encoder_dir, tmp_path):
    spec = _rerank_spec("tiny-ce-auto", context=128)
    first = _load(spec, tiny_cross_encoder_dir, "auto", tmp_path)
    try:
        choice = first.runtime
        assert choice is not None and choice.source == "measured" and choice.name in ("torch", "onnx", "openvino")
        assert {t.name for t in choice.trials} == {"torch", "onnx", "openvino"}
        assert all(t.error is None and t.agreement is not None for t in choice.trials), choice.trials
        trials = {t.name: t for t in choice.trials}
        assert trials["onnx"].agreement >= MIN_AGREEMENT and trials[choice.name].eligible
        # (OpenVINO computes in bf16 on CPUs with AMX: on this tiny random model, whose scores
        # barely differ, that can lose their order — then it is measured and left out)
        scores = first.embed(PAIRS)
    finally:
        first.unload()
    files = list((tmp_path / "tiny-ce-auto").glob("choice-*.json"))
    assert len(files) == 1
    key = json.loads(files[0].read_text())["key"]
    assert key["versions"]["openvino"] == exported.version("openvino") and key["device"] == "cpu"
    second = _load(spec, tiny_cross_encoder_dir, "auto", tmp_path)
    try:
        assert second.runtime is not None and second.runtime.source == "cached"
        assert second.runtime.name == choice.name and second.runtime.why == choice.why
        assert np.allclose(second.embed(PAIRS), scores, atol=1e-3)
    finally:
        second.unload()


@pytest.mark.slow
def test_a_changed_model_is_exported_again(tiny_cross_encoder_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_cross_encoder_dir, model)
    spec = _rerank_spec("tiny-ce-changed", context=128)
    _load(spec, model, "onnx", tmp_path / "runtimes").unload()
    meta = next((tmp_path / "runtimes" / "tiny-ce-changed").glob("onnx-*/meta.json"))
    first = json.loads(meta.read_text())["source"]
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config, indent=4))  # the model's files changed
    b = _load(spec, model, "onnx", tmp_path / "runtimes")
    try:
        assert b.runtime is not None and b.runtime.name == "onnx"
    finally:
        b.unload()
    assert json.loads(meta.read_text())["source"] != first


@pytest.mark.slow
def test_an_unwritable_runtimes_folder_leaves_the_model_on_torch(tiny_cross_encoder_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    b = _load(_rerank_spec("tiny-ce-ro", context=128), tiny_cross_encoder_dir, "openvino", blocker / "runtimes")
    try:
        assert b.runtime is not None and b.runtime.name == "torch"
        assert "TARS_EMBED_RUNTIME=openvino, but cannot write the openvino export" in b.runtime.why
        assert b.notes == [b.runtime.why]  # shown with the model in /models and /status
        assert b.embed(PAIRS).shape == (len(PAIRS),)
    finally:
        b.unload()


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_a_minilm_sized_cross_encoder_scores_like_torch(runtime, minilm_cross_encoder_dir, runtime_dir):
    spec = _rerank_spec("minilm-ce-rt", context=512)
    ref = _load(spec, minilm_cross_encoder_dir, "torch", None)
    try:
        expected = ref.embed(PAIRS)
    finally:
        ref.unload()
    b = _load(spec, minilm_cross_encoder_dir, runtime, runtime_dir)
    try:
        assert b.runtime is not None and b.runtime.name == runtime
        scores = b.embed(PAIRS)
        assert scores.shape == (len(PAIRS),) and scores.dtype == np.float32
        assert np.allclose(scores, expected, atol=5e-3)
        assert b.embed([]).shape == (0,) and b.max_seq_length == 512
    finally:
        b.unload()


def test_runtimes_live_under_the_models_folder_or_a_temporary_one(tmp_path):
    assert runtimes_root(tmp_path / "runtimes", "org/model name") == tmp_path / "runtimes" / "org_model_name"
    assert runtimes_root(None, "m").name == "m" and runtimes_root(None, "m").parent.name == "tars-runtimes"
