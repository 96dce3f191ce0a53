"""Hub references resolved once into a ModelSpec, against the hub stand-in (tests/hubstub.py)
serving the real SmolLM2 GGUF under made-up repos: parsing, the quant chosen, the header read
by range (bounded), remembered across a restart, errors naming the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed import modelref
from distributed.catalog import load_catalog
from distributed.errors import ModelGated, ModelNotFound, RefNotFound, ValidationFailed
from distributed.gguf_header import numbers, read_gguf
from distributed.hub import RepoEntry
from tests.hubstub import (GATED_REPO, NODEFAULT_REPO, SMOL_REPO, SPLIT_REPO, VISION_REPO, add_repos, hub,  # noqa: F401
                           projector, smollm2_shards)


# --------------------------------------------------------------------------- names
@pytest.mark.parametrize("text, repo, quant", [
    ("hf.co/bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M", "bartowski/Qwen2.5-7B-Instruct-GGUF", "Q4_K_M"),
    ("huggingface.co/bartowski/Qwen2.5-7B-Instruct-GGUF", "bartowski/Qwen2.5-7B-Instruct-GGUF", None),
    ("https://huggingface.co/unsloth/gemma-3-12b-it-GGUF:q8_0", "unsloth/gemma-3-12b-it-GGUF", "q8_0"),
    ("HF.CO/Org/Repo.v2_x:IQ4_XS", "Org/Repo.v2_x", "IQ4_XS"),
    ("Org/Repo:Q4_1", "Org/Repo", "Q4_1"),
])
def test_references_parse(text: str, repo: str, quant: str | None) -> None:
    ref = modelref.parse(text)
    assert ref is not None and (ref.repo, ref.quant, ref.text) == (repo, quant, text)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-7b-instruct", "Org/Repo", "llama3:8b"])
def test_catalog_ids_are_not_references(name: str) -> None:
    assert modelref.parse(name) is None and not modelref.is_ref(name)


@pytest.mark.parametrize("bad", ["hf.co/justone", "hf.co/a/b/c", "hf.co/../x:Q4", "hf.co/org/repo:Q4 K", "hf.co/-x/y"])
def test_malformed_references_name_the_field(bad: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        modelref.parse(bad)
    assert err.value.field == "model" and bad.split(":")[0].removeprefix("hf.co/") in err.value.message


@pytest.mark.parametrize("name, quant", [
    ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
    ("model-q8_0-00001-of-00003.gguf", "Q8_0"), ("gemma-3-12b-it-IQ4_XS.gguf", "IQ4_XS"),
    ("x_bf16.gguf", "BF16"), ("Qwen3-4B.gguf", None), ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
])
def test_quant_from_the_file_name(name: str, quant: str | None) -> None:
    assert modelref.quant_of(name) == quant


def _files(*names: str) -> list[RepoEntry]:
    return [RepoEntry(n, 1000 + i) for i, n in enumerate(names)]


def test_choice_default_then_nearest_smaller_then_split_and_projector() -> None:
    repo = _files("m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-Q2_K.gguf", "README.md")
    assert modelref.choose(modelref.parse("hf.co/o/r"), repo).quant == "Q4_K_M"
    assert modelref.choose(modelref.parse("hf.co/o/r:q8_0"), repo).files[0].path == "m-Q8_0.gguf"  # case-insensitive
    no_default = _files("m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-IQ4_XS.gguf", "m-Q4_0.gguf", "m-Q2_K.gguf")
    assert modelref.choose(modelref.parse("hf.co/o/r"), no_default).quant == "Q4_0"  # nearest below Q4_K_M
    only_big = _files("m-Q8_0.gguf", "m-Q6_K.gguf")
    assert modelref.choose(modelref.parse("hf.co/o/r"), only_big).quant == "Q6_K"  # none smaller: nearest bigger
    split = _files("Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "m-Q8_0.gguf",
                   "mmproj-m-Q8_0.gguf", "mmproj-m-f16.gguf")
    c = modelref.choose(modelref.parse("hf.co/o/r:Q4_K_M"), split)
    assert [f.path for f in c.files] == ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"]
    assert c.mmproj.path == "mmproj-m-f16.gguf"  # f16 projector first
    broken = _files("m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00002-of-00003.gguf", "m-Q8_0.gguf")
    assert modelref.choose(modelref.parse("hf.co/o/r"), broken).quant == "Q8_0"  # a shard missing: not a choice


def test_a_quant_the_repo_lacks_is_a_404_listing_those_it_has() -> None:
    with pytest.raises(RefNotFound) as err:
        modelref.choose(modelref.parse("hf.co/o/r:Q3_K_S"), _files("m-Q8_0.gguf", "m-Q4_K_M.gguf", "x.txt"))
    e = err.value
    assert e.http_status == 404 and e.available == ["Q8_0", "Q4_K_M"] and "Q3_K_S" in e.message and "o/r" in e.message
    with pytest.raises(RefNotFound, match="no GGUF"):
        modelref.choose(modelref.parse("hf.co/o/r"), _files("model.safetensors", "config.json"))


# --------------------------------------------------------------------------- against the hub stand-in
def _catalog(tmp_path: Path):
    return load_catalog(user_file=tmp_path / "models" / "catalog.toml")


def test_a_reference_resolves_from_a_ranged_read_of_its_header(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf)
    catalog = _catalog(tmp_path)
    spec = modelref.resolve(f"hf.co/{SMOL_REPO}:q8_0", catalog)

    truth = numbers(read_gguf(smollm2_gguf))
    assert spec.id == f"hf.co/{SMOL_REPO}:q8_0"  # served under the reference as given
    assert (spec.repo, spec.file, spec.quant, spec.revision) == (SMOL_REPO, "SmolLM2-135M-Instruct-Q8_0.gguf", "Q8_0",
                                                                 hub.commit(SMOL_REPO))
    assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim, spec.context) == (
        truth["n_layers"], truth["n_embd"], truth["n_head_kv"], truth["head_dim"], truth["context"]) == (
        30, 576, 3, 64, 8192)
    assert spec.params_b == pytest.approx(0.1345, abs=1e-4) and spec.size_mb == 94 and spec.kind == "chat"
    # the header (1.8 MB of a 94 MB file) came by ranged reads, bounded: never the whole file
    served = hub.bytes_served(SMOL_REPO)
    assert 0 < served <= 4 * 2**20 < smollm2_gguf.stat().st_size
    assert all(r["range"] for r in hub.log if r["method"] == "GET" and r["path"].endswith(".gguf"))
    # the catalog knows it now, and a new one over the same folder (a restart) with no hub
    assert catalog.get(spec.id) is spec
    n = len(hub.log)
    again = modelref.resolve(spec.id, _catalog(tmp_path))
    assert again.to_dict() == spec.to_dict() and len(hub.log) == n
    assert (tmp_path / "models" / "refs.json").is_file()


def test_without_a_quant_q4_k_m_else_the_nearest_smaller(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf)
    catalog = _catalog(tmp_path)
    assert modelref.resolve(f"hf.co/{SMOL_REPO}", catalog).file == "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    assert modelref.resolve(f"huggingface.co/{NODEFAULT_REPO}", catalog).file == "smollm2-q4_0.gguf"
    assert modelref.resolve(f"{NODEFAULT_REPO}:iq4_xs", catalog).quant == "IQ4_XS"


def test_bad_references_are_named_with_the_hubs_reason(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf)
    catalog = _catalog(tmp_path)
    with pytest.raises(RefNotFound) as missing:
        modelref.resolve("hf.co/tars-test/No-Such-GGUF:Q4_K_M", catalog)
    assert missing.value.http_status == 404
    assert "tars-test/No-Such-GGUF" in missing.value.message and "Repository not found" in missing.value.message
    with pytest.raises(ModelGated) as gated:
        modelref.resolve(f"hf.co/{GATED_REPO}", catalog)
    assert gated.value.http_status == 403 and GATED_REPO in gated.value.message
    assert "Access to model" in gated.value.message and "HF_TOKEN" in gated.value.message
    with pytest.raises(RefNotFound) as quant:
        modelref.resolve(f"hf.co/{SMOL_REPO}:Q5_K_M", catalog)
    assert quant.value.available == ["Q8_0", "Q4_1", "Q4_K_M"]
    with pytest.raises(ModelNotFound):  # a plain unknown id stays a 404 listing the catalog
        modelref.resolve("no-such-model", catalog)
    assert f"hf.co/{GATED_REPO}" not in catalog and "hf.co/tars-test/No-Such-GGUF:Q4_K_M" not in catalog


def test_no_hub_is_a_502_naming_the_reference(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import socket

    import huggingface_hub.constants as hf_constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    from distributed.errors import DownloadFailed

    with pytest.raises(DownloadFailed) as err:
        modelref.resolve("hf.co/org/repo:Q4_K_M", _catalog(tmp_path))
    assert err.value.http_status == 502 and "hf.co/org/repo:Q4_K_M" in err.value.message


def test_split_files_resolve_together_with_every_shards_tensors(hub, smollm2_gguf: Path, smollm2_shards: list[Path],
                                                                 tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf, shards=smollm2_shards)
    spec = modelref.resolve(f"hf.co/{SPLIT_REPO}", _catalog(tmp_path))
    assert spec.shards == [f"Q4_K_M/{p.name}" for p in smollm2_shards] and spec.file == spec.shards[0]
    assert spec.size_mb == -(-sum(p.stat().st_size for p in smollm2_shards) // 2**20)
    whole = read_gguf(smollm2_gguf)
    cached = read_gguf(modelref.header_cache(tmp_path / "models", SPLIT_REPO, hub.commit(SPLIT_REPO), spec.file))
    assert cached.tensor_bytes == whole.tensor_bytes and cached.n_params == whole.n_params


def test_a_repo_with_a_projector_sees_images(hub, smollm2_gguf: Path, projector: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf, mmproj=projector)
    spec = modelref.resolve(f"hf.co/{VISION_REPO}", _catalog(tmp_path))
    assert spec.vision and spec.mmproj == "mmproj-SmolLM2-f16.gguf" and spec.mmproj_mb == 1
    plain = modelref.resolve(f"hf.co/{SMOL_REPO}", _catalog(tmp_path))
    assert not plain.vision and plain.mmproj is None


def test_plan_specs_carry_references_only(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf)
    catalog = _catalog(tmp_path)
    ref = modelref.resolve(f"hf.co/{SMOL_REPO}", catalog)
    carried = modelref.plan_specs([ref, catalog.get("smollm2-135m-instruct")])
    assert list(carried) == [ref.id]
    other = load_catalog(user_file=tmp_path / "other" / "catalog.toml")  # another host's catalog
    other.learn(carried)
    assert other.get(ref.id).to_dict() == ref.to_dict()
    other.learn({"hf.co/x/y": {**carried[ref.id], "file": "../../etc/passwd"}})  # refused, logged
    assert "hf.co/x/y" not in other


def test_gemma_resolves_from_its_big_header_and_says_it_has_no_template(hub, gemma_gguf: Path, tmp_path: Path) -> None:
    hub.add("tars-test/gemma-3-270m-GGUF", {"gemma-3-270m-Q4_K_M.gguf": gemma_gguf,
                                            "gemma-3-270m-Q8_0.gguf": gemma_gguf})
    spec = modelref.resolve("hf.co/tars-test/gemma-3-270m-GGUF", _catalog(tmp_path))
    assert (spec.n_layers, spec.n_embd, spec.n_head_kv, spec.head_dim, spec.context) == (18, 640, 1, 256, 32768)
    assert spec.quant == "Q4_K_M" and "no chat template in the GGUF" in spec.description
    header = read_gguf(gemma_gguf).header_bytes  # 6.5 MB: its 262k-token vocabulary
    assert header < hub.bytes_served("tars-test/gemma-3-270m-GGUF") <= 2 * header + 2**20 < gemma_gguf.stat().st_size


def test_a_hub_listing_a_file_outside_the_repo_is_refused(hub, smollm2_gguf: Path, tmp_path: Path) -> None:
    from distributed.errors import ConfigError

    hub.add("tars-test/Evil-GGUF", {"../../evil-Q4_K_M.gguf": smollm2_gguf})
    with pytest.raises((ConfigError, RefNotFound)):
        modelref.resolve("hf.co/tars-test/Evil-GGUF", _catalog(tmp_path))
    assert not (tmp_path / "evil-Q4_K_M.gguf").exists() and "hf.co/tars-test/Evil-GGUF" not in _catalog(tmp_path)
