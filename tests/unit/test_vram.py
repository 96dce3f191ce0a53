"""VRAM estimates: the real embedded GGUF checked against its own metadata (read with the
gguf package's reader), GGUF files written with the gguf package, and catalog fallbacks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distributed.catalog import load_catalog
from distributed.domain import ModelSpec
from distributed.errors import ConfigError
from distributed.vram import MIB, estimate, layers_that_fit, read_gguf

gguf = pytest.importorskip("gguf")
CATALOG = load_catalog()


@pytest.fixture(scope="module")
def reference(gemma_gguf: Path):
    """The gguf package's own full reader (slow: it parses the whole 262k-token vocabulary)."""
    return gguf.GGUFReader(str(gemma_gguf))


def field(reader, key: str):
    return reader.fields[key].contents()


@pytest.mark.slow
def test_header_reader_matches_the_gguf_package(gemma_gguf: Path, reference) -> None:
    meta = read_gguf(gemma_gguf)
    for key in ("general.architecture", "gemma3.block_count", "gemma3.embedding_length",
                "gemma3.attention.head_count", "gemma3.attention.head_count_kv", "gemma3.attention.key_length",
                "gemma3.attention.value_length", "gemma3.context_length"):
        assert meta.fields[key] == field(reference, key), key
    assert meta.tensor_bytes == {t.name: int(t.n_bytes) for t in reference.tensors}
    assert meta.data_offset == reference.data_offset
    assert meta.data_offset + sum(meta.tensor_bytes.values()) == os.path.getsize(gemma_gguf)


@pytest.mark.slow
def test_embedded_gguf_estimate_follows_its_metadata(gemma_gguf: Path, reference) -> None:
    spec = CATALOG.get("gemma-3-270m")
    est = estimate(spec, 2048, gemma_gguf)
    layers = field(reference, "gemma3.block_count")
    kv_heads = field(reference, "gemma3.attention.head_count_kv")
    k_len = field(reference, "gemma3.attention.key_length")
    v_len = field(reference, "gemma3.attention.value_length")
    assert est.source == "gguf"
    assert est.n_layers == layers == 18
    assert est.weights_mb == math.ceil(sum(int(t.n_bytes) for t in reference.tensors) / MIB)
    # f16 K and V for every layer at the configured context
    assert est.kv_mb == math.ceil(layers * kv_heads * (k_len + v_len) * 2048 * 2 / MIB)
    assert est.total_mb == est.weights_mb + est.kv_mb + est.overhead_mb
    assert est.weights_mb <= os.path.getsize(gemma_gguf) / MIB + 1
    # the catalog's hints agree with the file (so plans before and after download match)
    assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim) == (
        layers, field(reference, "gemma3.embedding_length"), kv_heads, k_len)
    assert abs(estimate(spec, 2048).total_mb - est.total_mb) < 0.05 * est.total_mb


def test_context_is_capped_at_the_models_own(gemma_gguf: Path) -> None:
    spec = CATALOG.get("gemma-3-270m")
    assert estimate(spec, 1_000_000, gemma_gguf).context == 32768
    a, b = estimate(spec, 2048, gemma_gguf), estimate(spec, 4096, gemma_gguf)
    assert b.kv_mb == pytest.approx(2 * a.kv_mb, abs=1)


def write_gguf(path: Path, *, layers: int, embd: int, heads: int, kv_heads, key_length: int | None = None) -> Path:
    np = pytest.importorskip("numpy")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_embedding_length(embd)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_context_length(4096)
    if key_length:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    w.add_tensor("token_embd.weight", np.zeros((100, embd), dtype=np.float32))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((embd, embd), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_spec(**kw) -> ModelSpec:
    return ModelSpec(**{"id": "tiny", "kind": "chat", "backend": "llama_cpp", "params_b": 0.01, "quant": "F16",
                        "context": 4096, "file": "t.gguf", "repo": "x/y", **kw})


def test_gguf_without_key_length_uses_embedding_over_heads(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "t.gguf", layers=4, embd=256, heads=8, kv_heads=2)
    est = estimate(tiny_spec(), 1024, p)
    head_dim = 256 // 8
    assert est.kv_mb == math.ceil(4 * 2 * 2 * head_dim * 1024 * 2 / MIB)
    assert est.weights_mb == math.ceil((100 * 256 * 4 + 4 * 256 * 256 * 2) / MIB)
    assert est.n_layers == 4


def test_gguf_with_per_layer_kv_heads(tmp_path: Path) -> None:
    p = write_gguf(tmp_path / "t.gguf", layers=3, embd=512, heads=8, kv_heads=[8, 2, 2], key_length=64)
    est = estimate(tiny_spec(), 2048, p)
    assert est.kv_mb == math.ceil((8 + 2 + 2) * (64 + 64) * 2048 * 2 / MIB)


def test_unreadable_or_missing_gguf_falls_back_to_the_catalog(tmp_path: Path) -> None:
    spec = CATALOG.get("mistral-7b-instruct")
    missing = estimate(spec, 2048, tmp_path / "nope.gguf")
    assert missing.source == "catalog" and "not on disk" in missing.notes[0]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    bad = estimate(spec, 2048, junk)
    assert bad.source == "catalog" and "unreadable" in bad.notes[0]
    assert bad.total_mb == estimate(spec, 2048).total_mb


def test_read_gguf_errors_name_the_file(tmp_path: Path, gemma_gguf: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(ConfigError, match="junk.bin.*not a GGUF"):
        read_gguf(junk)
    cut = tmp_path / "cut.gguf"
    with gemma_gguf.open("rb") as fh:
        cut.write_bytes(fh.read(4096))  # header cut short inside the vocabulary
    with pytest.raises(ConfigError, match="cut.gguf.*malformed"):
        read_gguf(cut)


def test_catalog_estimates_use_the_architecture_hints() -> None:
    mistral = estimate(CATALOG.get("mistral-7b-instruct"), 2048)
    llama2 = estimate(CATALOG.get("llama2-7b-chat"), 2048)
    assert mistral.source == "catalog" and mistral.weights_mb == 4166
    assert mistral.kv_mb == 256  # 32 layers x 8 KV heads x 128 x (K+V) x 2048 x 2 bytes
    assert llama2.kv_mb == 1024  # no grouped-query attention: 4x Mistral's
    phi = estimate(CATALOG.get("phi-2"), 2048)
    assert 2.78e9 / MIB <= phi.weights_mb <= 2.78e9 * 1.2 / MIB  # int8 ≈ one byte per parameter
    minilm = estimate(CATALOG.get("all-MiniLM-L6-v2"), 2048)
    assert minilm.kv_mb == 0 and minilm.total_mb < 500 and not minilm.partial_ok


@given(budget=st.integers(min_value=0, max_value=8000))
def test_layers_that_fit_is_the_most_that_fit(budget: int) -> None:
    est = estimate(CATALOG.get("mistral-7b-instruct"), 2048)
    n = layers_that_fit(est, budget)
    if n == -1:
        assert est.total_mb <= budget
        return
    assert 0 <= n < est.n_layers
    if n > 0:
        assert est.vram_for_layers(n) <= budget
    assert est.vram_for_layers(n + 1) > budget
    assert est.ram_for_layers(n) + est.vram_for_layers(n) >= est.weights_mb + est.kv_mb


def test_non_gguf_models_are_all_or_nothing() -> None:
    est = estimate(CATALOG.get("phi-2"), 2048)
    assert layers_that_fit(est, est.total_mb) == -1
    assert layers_that_fit(est, est.total_mb - 1) == 0
