"""`tars models add | rm | pull` and `tars plan --models` with hub references, through typer's
CliRunner against the hub stand-in (tests/hubstub.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distributed.catalog import load_catalog
from distributed.errors import ConfigError, ModelNotFound, RefNotFound, ValidationFailed
from tests.hubstub import SMOL_REPO, VISION_REPO, add_repos, hub, projector  # noqa: F401

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(no_tars_env: Path) -> Path:
    return no_tars_env


def test_add_registers_a_local_gguf_in_place_and_rm_takes_it_out(app, smollm2_gguf: Path, projector: Path,
                                                                  tmp_path: Path) -> None:
    tpl = tmp_path / "my.jinja"
    tpl.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    r = runner.invoke(app, ["models", "add", str(smollm2_gguf), "--id", "my-smol", "--chat-template", str(tpl),
                            "--mmproj", str(projector)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "referenced in place, not copied" in r.output and "POST /models" in r.output
    spec = load_catalog(user_file=tmp_path / "models" / "catalog.toml").get("my-smol")
    assert spec.path == str(smollm2_gguf.resolve()) and spec.chat_template == str(tpl) and spec.vision
    assert (spec.n_layers, spec.context, spec.quant, spec.size_mb) == (30, 8192, "Q4_1", 94)
    assert not (tmp_path / "models" / smollm2_gguf.name).exists()  # nothing copied

    r = runner.invoke(app, ["models", "list", "--json"])
    row = next(x for x in json.loads(r.output) if x["id"] == "my-smol")
    assert row["on_disk"] and row["vision"] and row["source"].startswith("local:")

    r = runner.invoke(app, ["models", "add", str(smollm2_gguf), "--id", "my-smol"])
    assert r.exit_code == 1 and isinstance(r.exception, ConfigError) and "already in" in r.exception.message
    r = runner.invoke(app, ["models", "rm", "my-smol"])
    assert r.exit_code == 0 and "removed" in r.output and "files stay" in r.output
    assert smollm2_gguf.is_file() and "my-smol" not in load_catalog(user_file=tmp_path / "models" / "catalog.toml")


@pytest.mark.parametrize("args, error, words", [
    (["models", "add", "/nope.gguf"], ConfigError, "no such file"),
    (["models", "rm", "nothing-here"], ModelNotFound, "nothing-here"),
    (["models", "rm", "mistral-7b-instruct"], ValidationFailed, "built-in"),
])
def test_bad_adds_and_removes_say_why(app, args, error, words) -> None:
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and isinstance(r.exception, error) and words in r.exception.message


def test_add_refuses_what_is_not_a_model(app, tmp_path: Path, projector: Path, smollm2_gguf: Path) -> None:
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"not a gguf" * 10)
    assert isinstance(runner.invoke(app, ["models", "add", str(junk)]).exception, ConfigError)
    r = runner.invoke(app, ["models", "add", str(projector)])
    assert isinstance(r.exception, ValidationFailed) and "projector" in r.exception.message
    r = runner.invoke(app, ["models", "add", str(smollm2_gguf), "--chat-template", "no-such-template"])
    assert isinstance(r.exception, ValidationFailed) and r.exception.field == "chat_template"


def test_plan_and_pull_take_a_reference(app, hub, smollm2_gguf: Path, projector: Path, tmp_path: Path) -> None:
    add_repos(hub, smollm2_gguf, mmproj=projector)
    ref = f"hf.co/{VISION_REPO}"
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--models", f"{ref},all-MiniLM-L6-v2", "--json"])
    assert r.exit_code == 0, r.output
    placed = {a["model"]: a for a in json.loads(r.output)["assignments"]}
    assert placed[ref]["node"] == "pc1" and placed[ref]["quant"] == "Q4_K_M"
    assert hub.bytes_served(VISION_REPO) <= 4 * 2**20  # planned from the header, before any pull
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--models", ref], env={"COLUMNS": "120"})
    assert r.exit_code == 0 and ref in r.output and "not placed" not in r.output

    r = runner.invoke(app, ["models", "pull", ref, "--no-progress"])
    assert r.exit_code == 0, r.output
    folder = tmp_path / "models" / "hub" / VISION_REPO
    assert (folder / "SmolLM2-135M-Instruct-Q4_K_M.gguf").is_file() and (folder / "mmproj-SmolLM2-f16.gguf").is_file()
    r = runner.invoke(app, ["models", "pull", f"hf.co/{SMOL_REPO}:Q6_K", "--no-progress"])
    assert isinstance(r.exception, RefNotFound) and "Q8_0, Q4_1, Q4_K_M" in r.exception.message
    r = runner.invoke(app, ["models", "rm", ref])
    assert r.exit_code == 0 and "forgotten" in r.output and ref not in load_catalog(
        user_file=tmp_path / "models" / "catalog.toml")
