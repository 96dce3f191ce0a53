"""`tars run`, `tars stop`, `tars ps` (the real CLI, as a subprocess) against a node served by
uvicorn on 127.0.0.2 in a thread of this process, with the fake backends."""

from __future__ import annotations

import json

import pytest

from tests.support import free_port, serve_in_thread, tars

HOST = "127.0.0.2"
PORTS = range(18660, 18670)
KEY = "deploy-cli-key"
RR = "ms-marco-MiniLM-L-6-v2"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from distributed.settings import load_settings

    settings = load_settings(None, host=HOST, port=free_port(HOST, PORTS), node_name="deploynode",
                             backend_override="fake", gpu_profile="rtx3060-12gb",
                             models_dir=tmp_path_factory.mktemp("models"), api_key=KEY,
                             models=["smollm2-135m-instruct", "all-MiniLM-L6-v2"])
    with serve_in_thread(settings, "deploy") as base:
        yield base


def test_run_ps_stop(url: str) -> None:
    env = {"TARS_API_KEY": KEY}
    r = tars("run", RR, "--url", url, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{RR}: deploying on deploynode (" in r.stdout and f"{RR}: ready on deploynode" in r.stdout
    assert "ready" in r.stderr  # the states it went through, as they changed

    again = tars("run", RR, "--url", url, env=env, timeout=120)
    assert again.returncode == 0 and "already deployed on deploynode" in again.stdout

    ps = tars("ps", "--url", url, env=env)
    assert ps.returncode == 0, ps.stderr
    row = next(line for line in ps.stdout.splitlines() if line.startswith(RR))
    assert "rerank" in row and "deploynode" in row and "ready" in row
    rows = json.loads(tars("ps", "--url", url, "--json", env=env).stdout)
    assert {m["id"] for m in rows} == {"smollm2-135m-instruct", "all-MiniLM-L6-v2", RR}

    r = tars("stop", RR, "--url", url, env=env)
    assert r.returncode == 0 and "removing" in r.stdout and RR not in r.stdout.split("serves")[1]


def test_bad_ids_and_missing_key_are_one_line_errors(url: str) -> None:
    r = tars("run", "no-such-model", "--url", url, env={"TARS_API_KEY": KEY})
    assert r.returncode == 2 and "no-such-model" in r.stderr and "mistral-7b-instruct" in r.stderr
    assert "Traceback" not in r.stderr
    r = tars("stop", "never-deployed", "--url", url, env={"TARS_API_KEY": KEY})
    assert r.returncode == 2 and "never-deployed" in r.stderr
    r = tars("ps", "--url", url)
    assert r.returncode == 2 and "API key" in r.stderr
    r = tars("run", RR, "--url", "http://127.0.0.2:9", env={"TARS_API_KEY": KEY})
    assert r.returncode == 2 and "cannot reach the node" in r.stderr
