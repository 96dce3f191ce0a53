"""The user's catalog files: `tars models add`/`rm` edit one block and keep the rest (comments
too), refs.json remembers resolved references, and a Catalog follows both files while it lives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from distributed import catalog_files
from distributed.catalog import load_catalog, read_catalog_file
from distributed.domain import ModelSpec
from distributed.errors import ConfigError

ENTRY = {"id": "mine", "kind": "chat", "backend": "llama_cpp", "params_b": 0.1, "quant": "Q4_1", "context": 2048,
         "path": "/models/mine.gguf", "description": 'a "quoted" name\twith a tab, ünïcode'}


def test_add_then_remove_keeps_everything_else(tmp_path: Path) -> None:
    user = tmp_path / "catalog.toml"
    user.write_text('# my models, written by hand\n\n# the first one\n[[model]]\nid = "hand"\nkind = "chat"\n'
                    'backend = "llama_cpp"\nparams_b = 1\nquant = "Q4_K_M"\ncontext = 512\npath = "h.gguf"\n')
    catalog_files.add_entry(user, ENTRY, comment="added by a test")
    catalog_files.add_entry(user, {**ENTRY, "id": "second"})
    specs = {s.id: s for s in read_catalog_file(user)}
    assert set(specs) == {"hand", "mine", "second"} and specs["mine"].description == ENTRY["description"]
    with pytest.raises(ConfigError, match="already in"):
        catalog_files.add_entry(user, ENTRY)

    assert catalog_files.remove_entry(user, "mine") and not catalog_files.remove_entry(user, "mine")
    text = user.read_text()
    assert "# my models, written by hand" in text and "# the first one" in text and "added by a test" not in text
    assert [s.id for s in read_catalog_file(user)] == ["hand", "second"]
    assert catalog_files.remove_entry(user, "hand")
    assert "# the first one" not in user.read_text() and "# my models" in user.read_text()


def test_refs_are_put_and_dropped(tmp_path: Path) -> None:
    refs = tmp_path / "refs.json"
    catalog_files.put_ref(refs, "hf.co/a/b:Q4_K_M", {"kind": "chat"})
    catalog_files.put_ref(refs, "hf.co/a/c", {"kind": "chat"})
    assert set(catalog_files.read_refs(refs)) == {"hf.co/a/b:Q4_K_M", "hf.co/a/c"}
    assert catalog_files.drop_ref(refs, "hf.co/a/c") and not catalog_files.drop_ref(refs, "hf.co/a/c")
    refs.write_text("{not json")
    with pytest.raises(ConfigError, match="refs.json"):
        catalog_files.read_refs(refs)


def _ref_spec(**kw) -> ModelSpec:
    base = dict(id="hf.co/org/repo-GGUF:Q4_K_M", kind="chat", backend="llama_cpp", params_b=0.1, quant="Q4_K_M",
                context=2048, repo="org/repo-GGUF", file="sub/m-Q4_K_M-00001-of-00002.gguf",
                shards=["sub/m-Q4_K_M-00001-of-00002.gguf", "sub/m-Q4_K_M-00002-of-00002.gguf"],
                revision="c" * 40, mmproj="mmproj-f16.gguf", mmproj_mb=600, size_mb=100)
    return ModelSpec(**{**base, **kw})


def test_a_catalog_follows_its_files_and_remembers_references(tmp_path: Path, caplog) -> None:
    cat = load_catalog(user_file=tmp_path / "catalog.toml")
    assert "mine" not in cat
    catalog_files.add_entry(tmp_path / "catalog.toml", ENTRY)  # another process: `tars models add`
    assert cat.get("mine").path == "/models/mine.gguf"
    spec = cat.remember(_ref_spec())
    assert spec.vision and cat.get(spec.id).shards == _ref_spec().shards
    again = load_catalog(user_file=tmp_path / "catalog.toml")  # a restart
    assert again.get(spec.id).to_dict() == _ref_spec().to_dict()
    assert json.loads((tmp_path / "refs.json").read_text())["refs"][spec.id]["revision"] == "c" * 40
    # a broken edit while running: logged, the entries read before stay
    caplog.set_level(logging.ERROR, logger="distributed.catalog")
    (tmp_path / "catalog.toml").write_text("[[model]]\nid = 'broken'\n")
    assert "mine" in cat and any("not re-read" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match="missing field"):
        load_catalog(user_file=tmp_path / "catalog.toml")  # at start a broken file stops it
    assert cat.forget(spec.id) and spec.id not in cat and spec.id not in load_catalog(user_file=tmp_path / "x.toml")


@pytest.mark.parametrize("bad", [{"file": "../../etc/passwd", "shards": None}, {"shards": ["a.gguf", "../b.gguf"]},
                                 {"mmproj": "/etc/shadow"}, {"shards": ["x.gguf", "y.gguf"]},
                                 {"id": "not-a-ref/x", "shards": None, "file": "a/b.gguf"}])
def test_files_of_a_reference_never_leave_its_folder(bad: dict, tmp_path: Path) -> None:
    cat = load_catalog(user_file=tmp_path / "catalog.toml")
    cat.learn({bad.get("id", "hf.co/x/y:Q4_K_M"): {**_ref_spec().to_dict(), **bad}})  # refused, logged
    assert cat.ids() == load_catalog().ids()
