"""`tars status` and `tars bench` against a running node.

The node is the real app (create_app + service.build) served by uvicorn on 127.0.0.2 in a
thread of this process (``tests.support.serve_in_thread``), with the fake backends for
speed; one slow test runs the CLI against a node process (``ServerProcess``) with the
real embedded models. The CLI runs as a
subprocess (`python -m distributed ...`), exactly as a user runs it, so its exit
codes and error messages are what is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, free_port, serve_in_thread, tars

HOST = "127.0.0.2"
PORTS = range(18610, 18620)  # this file's share of 18600-18699
API_KEY = "ops-test-key"


@pytest.fixture(scope="module")
def node_url(models_dir: Path):
    """A node with fake backends, a simulated RTX 3060 and an API key, in a uvicorn thread."""
    from distributed.settings import load_settings

    settings = load_settings(None, host=HOST, port=free_port(HOST, PORTS), node_name="opsnode",
                             backend_override="fake", gpu_profile="rtx3060-12gb", models_dir=models_dir,
                             api_key=API_KEY, models=["gemma-3-270m", "all-MiniLM-L6-v2"])
    with serve_in_thread(settings, "ops") as url:
        yield url


def _status(url: str) -> dict:
    return httpx.get(f"{url}/status", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).json()


# ----------------------------------------------------------------------------- status
def test_status_table_shows_node_gpu_models_and_health(node_url: str) -> None:
    r = tars("status", node_url, "--api-key", API_KEY)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ("opsnode", "server", "healthy", "simulated hardware", "RTX 3060", "12.0 GB",
                     "gemma-3-270m", "all-MiniLM-L6-v2", "chat", "embed", "ready", node_url):
        assert expected in out, f"{expected!r} missing from:\n{out}"
    assert "Hosts" in out and "GPUs" in out and "Models" in out


def test_status_fits_a_100_column_terminal_and_labels_simulated_gpus(node_url: str) -> None:
    r = tars("status", node_url, "--api-key", API_KEY, env={"COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    assert max(len(line.rstrip()) for line in r.stdout.splitlines()) <= 100, r.stdout
    assert node_url in r.stdout  # the URL is never folded in the middle
    assert "RTX 3060 (simulated)" in r.stdout


def test_bench_chat_prompts_differ_so_no_run_reuses_the_prompt_cache(node_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from distributed.cli import ops

    prompts: list[str] = []
    real = ops._chat_once

    async def spy(client, model, prompt, max_tokens):  # noqa: ANN001, ANN202
        prompts.append(prompt)
        return await real(client, model, prompt, max_tokens)

    monkeypatch.setattr(ops, "_chat_once", spy)
    result = asyncio.run(ops.run_bench(node_url, api_key=API_KEY, chat_requests=3, max_tokens=8, embed=False))
    measured = prompts[1:]  # the first one is the warm-up
    assert len(result["chat"]["runs"]) == 3 == len(measured) == len(set(measured))
    assert all(p.endswith(ops.DEFAULT_PROMPT) for p in measured)


def test_status_json_is_the_node_status(node_url: str) -> None:
    r = tars("status", node_url, "--json", env={"TARS_API_KEY": API_KEY})  # key from the environment
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    live = _status(node_url)
    assert data["node"] == live["node"] == "opsnode"
    assert {m["id"] for m in data["models"]} == {m["id"] for m in live["models"]}
    assert data["healthy"] is True and data["profile"]["simulated"] is True


def test_status_without_the_api_key_says_how_to_pass_it(node_url: str) -> None:
    r = tars("status", node_url)
    assert r.returncode == 2
    assert "wants an API key" in r.stderr and "--api-key" in r.stderr and "TARS_API_KEY" in r.stderr
    assert "Traceback" not in r.stderr


def test_status_of_an_unreachable_node_is_a_clear_error(node_url: str) -> None:
    port = free_port(HOST, PORTS, {int(node_url.rsplit(":", 1)[1])})
    r = tars("status", f"http://{HOST}:{port}")
    assert r.returncode == 2
    assert f"cannot reach the node at http://{HOST}:{port}" in r.stderr
    assert "is it running?" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- bench
def test_bench_json_measures_chat_and_embeddings_at_each_concurrency(node_url: str) -> None:
    before = {m["id"]: m["requests"] for m in _status(node_url)["models"]}
    r = tars("bench", node_url, "--json", "--requests", "24", "--concurrency", "1,4,8", "--chat-requests", "2",
             "--max-tokens", "16", "--api-key", API_KEY)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["node"] == "opsnode"

    chat = result["chat"]
    assert chat["model"] == "gemma-3-270m" and len(chat["runs"]) == 2
    for run in chat["runs"]:
        assert run["tokens"] > 1
        assert 0 < run["ttft_ms"] <= run["total_ms"]
        assert run["decode_tokens_per_s"] > 0
    assert chat["decode_tokens_per_s_median"] > 0

    emb = result["embeddings"]
    assert emb["model"] == "all-MiniLM-L6-v2"
    assert [lv["concurrency"] for lv in emb["levels"]] == [1, 4, 8]
    for lv in emb["levels"]:
        assert lv["ok"] == 24 and lv["errors"] == 0
        assert lv["embeddings_per_s"] > 0 and 0 < lv["p50_ms"] <= lv["p95_ms"]

    after = {m["id"]: m["requests"] for m in _status(node_url)["models"]}
    # every request the bench reports really reached the node (plus one warm-up each side)
    assert after["all-MiniLM-L6-v2"] - before["all-MiniLM-L6-v2"] >= 3 * 24
    assert after["gemma-3-270m"] - before["gemma-3-270m"] >= 2


def test_bench_table_is_readable(node_url: str) -> None:
    r = tars("bench", node_url, "-n", "8", "-c", "1,2", "--chat-requests", "1", "--max-tokens", "8",
             "--api-key", API_KEY)
    assert r.returncode == 0, r.stderr
    for expected in ("Benchmark of", "TTFT ms", "Decode tok/s", "median", "Concurrency", "Embeddings/s", "p95 ms"):
        assert expected in r.stdout, f"{expected!r} missing from:\n{r.stdout}"


def test_bench_only_embeddings_skips_chat(node_url: str) -> None:
    r = tars("bench", node_url, "--json", "--no-chat", "-n", "4", "-c", "2", "--api-key", API_KEY)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["chat"] is None and result["embeddings"]["levels"][0]["ok"] == 4


@pytest.mark.parametrize("bad", ["0", "1,x", "", "2000"])
def test_bench_rejects_bad_concurrency(node_url: str, bad: str) -> None:
    r = tars("bench", node_url, "--concurrency", bad, "--api-key", API_KEY)
    assert r.returncode == 2
    assert "--concurrency" in r.stderr and "1,8,32" in r.stderr


def test_bench_unknown_model_lists_the_models(node_url: str) -> None:
    r = tars("bench", node_url, "--model", "no-such-model", "--api-key", API_KEY)
    assert r.returncode == 2
    assert "no-such-model" in r.stderr and "gemma-3-270m" in r.stderr and "Traceback" not in r.stderr


def test_bench_unreachable_node_is_a_clear_error(node_url: str) -> None:
    port = free_port(HOST, PORTS, {int(node_url.rsplit(":", 1)[1])})
    r = tars("bench", f"http://{HOST}:{port}")
    assert r.returncode == 2 and "cannot reach the node" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- real models
@pytest.mark.slow
def test_status_and_bench_against_a_node_with_the_real_models(models_dir: Path, gemma_gguf: Path,
                                                              minilm_dir: Path, tmp_path: Path) -> None:
    env = {"TARS_MODELS_DIR": str(models_dir), "TARS_GPU_PROFILE": "cpu",
           "TARS_MODELS": "gemma-3-270m,all-MiniLM-L6-v2"}
    with ServerProcess("realops", HOST, ports=PORTS, env=env, log_dir=tmp_path) as node:
        node.start(timeout=180)
        r = tars("status", node.url)
        assert r.returncode == 0, r.stderr
        assert "realops" in r.stdout and "llama_cpp" in r.stdout and "sentence" in r.stdout

        r = tars("bench", node.url, "--json", "-n", "8", "-c", "1,4", "--chat-requests", "1", "--max-tokens", "16")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        run = result["chat"]["runs"][0]
        assert result["chat"]["model"] == "gemma-3-270m" and run["tokens"] >= 2
        assert run["ttft_ms"] > 0 and run["decode_tokens_per_s"] > 0
        assert [lv["ok"] for lv in result["embeddings"]["levels"]] == [8, 8]
