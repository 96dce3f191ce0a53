"""Catalog ids and file names name things on disk: no path separators, no '..' (issue 11 §9)."""

from __future__ import annotations

import pytest

from distributed.catalog import read_catalog_file
from distributed.errors import ConfigError

ENTRY = """[[model]]
id = "{id}"
kind = "chat"
backend = "llama_cpp"
params_b = 0.1
quant = "Q4_K_M"
context = 2048
repo = "someone/some-model-GGUF"
file = "{file}"
"""


@pytest.mark.parametrize("field,ident,file", [
    ("id", "../../etc", "m.gguf"), ("id", "a/b", "m.gguf"), ("id", "a\\\\b", "m.gguf"),
    ("file", "ok-model", "../../.ssh/authorized_keys"), ("file", "ok-model", "sub/m.gguf"),
    ("file", "ok-model", ".."),
])
def test_path_like_ids_and_files_are_refused(tmp_path, field, ident, file):
    path = tmp_path / "catalog.toml"
    path.write_text(ENTRY.format(id=ident, file=file))
    with pytest.raises(ConfigError) as err:
        read_catalog_file(path)
    assert f"field '{field}'" in err.value.message and "path separators" in err.value.message


def test_plain_names_are_accepted(tmp_path):
    path = tmp_path / "catalog.toml"
    path.write_text(ENTRY.format(id="my-model.v2_q4", file="My-Model.Q4_K_M.gguf"))
    (spec,) = read_catalog_file(path)
    assert spec.id == "my-model.v2_q4" and spec.file == "My-Model.Q4_K_M.gguf"
