"""Ollama's model rows and pull status lines (api/ollama_models.py)."""

from __future__ import annotations

import json

import pytest

from distributed.api.ollama_models import (ModelFacts, PullProgress, capabilities, parameter_size, ps_row,
                                           served_context, show_body)
from distributed.catalog import load_catalog
from distributed.errors import ModelFailed

CATALOG = load_catalog()


def test_parameter_size_in_ollamas_style():
    assert [parameter_size(p) for p in (0.135, 0.0227, 0.268, 7.24, 24.0)] == ["135M", "22.7M", "268M", "7.2B",
                                                                                "24.0B"]


def test_rows_without_the_file_use_the_catalog():
    spec = CATALOG.get("smollm2-135m-instruct")
    facts = ModelFacts(spec, None)
    row = facts.row()
    assert row["name"] == row["model"] == "smollm2-135m-instruct:latest"
    assert row["size"] == spec.size_mb * 2**20 and row["digest"] == spec.sha256
    assert row["details"]["format"] == "gguf" and row["details"]["quantization_level"] == "Q4_1"
    other = ModelFacts(CATALOG.get("all-MiniLM-L6-v2"), None)
    assert other.details()["format"] == "safetensors" and len(other.digest) == 64  # no sha256: a stable hash
    assert other.digest == ModelFacts(CATALOG.get("all-MiniLM-L6-v2"), None).digest


def test_a_folder_model_reads_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    facts = ModelFacts(CATALOG.get("all-MiniLM-L6-v2"), tmp_path)
    assert facts.family == "bert" and facts.size == 1000 + len(json.dumps({"model_type": "bert"}))


def test_show_and_ps_say_the_served_context_and_capabilities():
    spec = CATALOG.get("smollm2-135m-instruct")
    facts = ModelFacts(spec, None)
    info = {"id": spec.id, "node": "pc2", "state": "ready", "context": 1024,
            "engine": {"template_caps": {"supports_tool_calls": True}}}
    ctx = served_context(spec, info, 2048)
    assert ctx == 1024 and served_context(spec, {}, 2048) == 2048 and served_context(spec, {}, 99999) == 8192
    body = show_body(facts, info, ctx)
    arch = body["model_info"]["general.architecture"]
    assert body["model_info"][f"{arch}.context_length"] == 1024
    assert body["model_info"]["tars.trained_context_length"] == 8192
    assert body["capabilities"] == ["completion", "tools"] and body["node"] == "pc2"
    assert capabilities(spec, {}) == ["completion"]
    row = ps_row(facts, {**info, "memory": {"vram_mb": 100, "ram_mb": 20}, "device": "cuda:0"}, ctx)
    assert row["size_vram"] == 100 * 2**20 and row["size"] == 120 * 2**20 and row["context_length"] == 1024
    assert row["expires_at"].startswith("2318")
    assert ps_row(facts, {"device": "cuda:0"}, ctx)["size_vram"] == facts.size


def test_pull_lines_follow_the_models_row():
    spec = CATALOG.get("mistral-7b-instruct")  # not embedded, not on disk: downloaded
    p = PullProgress(ModelFacts(spec, None))
    assert p.first() == {"status": "pulling manifest"}
    assert p.update(None) == ([], False)
    assert p.update({"state": "loading"}) == ([{"status": "loading model"}], False)
    lines, done = p.update({"state": "pulling", "progress": {"done_bytes": 10, "total_bytes": 100}})
    assert not done and lines[0]["completed"] == 10 and lines[0]["total"] == 100
    assert lines[0]["digest"].startswith("sha256:") and lines[0]["status"].startswith("pulling ")
    assert p.update({"state": "pulling", "progress": {"done_bytes": 10, "total_bytes": 100}}) == ([], False)
    assert p.update({"state": "loading"})[0] == [{"status": "verifying sha256 digest"}]
    assert p.update({"state": "ready"}) == ([{"status": "success"}], True)
    with pytest.raises(ModelFailed, match="no space"):
        PullProgress(ModelFacts(spec, None)).update({"id": spec.id, "node": "pc1", "state": "failed",
                                                     "error": "no space"})


def test_pull_of_a_model_on_disk_reports_all_of_it_here():
    spec = CATALOG.get("gemma-3-270m")  # embedded
    p = PullProgress(ModelFacts(spec, None))
    lines, _ = p.update({"state": "loading"})
    assert lines[0]["completed"] == lines[0]["total"] == spec.size_mb * 2**20
    assert lines[1] == {"status": "loading model"}
    assert p.update({"state": "ready"}) == ([{"status": "success"}], True)


def test_template_is_the_catalogs_own_file_when_it_names_one(tmp_path):
    import dataclasses

    spec = CATALOG.get("smollm2-135m-instruct")
    assert "<tool_call>" in ModelFacts(spec, None).template()  # the shipped ChatML template with tools
    facts = ModelFacts(dataclasses.replace(spec, chat_template=None), None)
    facts.fields = {"tokenizer.chat_template": "{{ gguf }}"}
    assert facts.template() == "{{ gguf }}"  # none named: the GGUF's own
    (tmp_path / "mine.jinja").write_text("{{ mine }}")
    assert ModelFacts(dataclasses.replace(spec, chat_template=str(tmp_path / "mine.jinja")), None).template() == \
        "{{ mine }}"
