"""Settings: env file + TARS_* environment (environment wins), loud failures naming the
variable, and env examples that document every variable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from distributed.errors import ConfigError
from distributed.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [ROOT / "env" / ".env.pc1.example", ROOT / "env" / ".env.pc2.example"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no TARS_* variable unless they set it."""
    for name in list(os.environ):
        if name.startswith("TARS_"):
            monkeypatch.delenv(name)


def env_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / ".env"
    f.write_text(text)
    return f


def test_defaults() -> None:
    s = load_settings()
    assert (s.port, s.vram_reserve_mb, s.context, s.heartbeat_s) == (8000, 500, 8192, 2.0)  # SmolLM2 was trained on 8,192
    assert s.peers == [] and s.gpu_profile == "" and s.effective_role == "server"
    assert s.node_name and re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", s.node_name)


def test_env_file_then_environment_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = env_file(tmp_path, "TARS_PORT=8100\nTARS_NODE_NAME=fromfile\nTARS_CONTEXT=4096\n")
    s = load_settings(f)
    assert (s.port, s.node_name, s.context) == (8100, "fromfile", 4096)
    monkeypatch.setenv("TARS_PORT", "8200")
    s = load_settings(f)
    assert (s.port, s.node_name) == (8200, "fromfile")  # the environment wins over the file
    assert load_settings(f, port=8300).port == 8300  # explicit overrides (CLI flags) win over both


def test_peers_are_comma_separated_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_PEERS", " http://10.0.0.2:8000/ , http://10.0.0.3:8001 ,")
    s = load_settings()
    assert s.peers == ["http://10.0.0.2:8000", "http://10.0.0.3:8001"]
    assert s.effective_role == "worker"


def test_models_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_MODELS", "mistral-7b-instruct,all-MiniLM-L6-v2")
    assert load_settings().models == ["mistral-7b-instruct", "all-MiniLM-L6-v2"]


@pytest.mark.parametrize("var, value, says", [
    ("TARS_PORT", "80000", "1-65535"),
    ("TARS_PORT", "eight", "TARS_PORT"),
    ("TARS_PEERS", "10.0.0.2:8000", "http://HOST:PORT"),
    ("TARS_VRAM_RESERVE_MB", "-1", "0-65536"),
    ("TARS_CONTEXT", "64", "128-131072"),
    ("TARS_LOG_LEVEL", "loud", "debug, info, warning or error"),
    ("TARS_NODE_NAME", "pc 1", "letters, digits"),
    ("TARS_HEARTBEAT_S", "0", "TARS_HEARTBEAT_S"),
    ("TARS_FALLBACK", "maybe", "true/false"),
])
def test_bad_value_names_the_variable_and_what_it_accepts(monkeypatch: pytest.MonkeyPatch, var: str, value: str,
                                                          says: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert var in err.value.message and says in err.value.message


def test_missing_env_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/.env.pc9")


def test_serving_with_peers_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_PEERS", "http://10.0.0.2:8000")
    with pytest.raises(ConfigError, match="TARS_CLUSTER_TOKEN"):
        load_settings().check_for_serving()
    monkeypatch.setenv("TARS_CLUSTER_TOKEN", "s3cret")
    load_settings().check_for_serving()


def test_secrets_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TARS_CLUSTER_TOKEN", "s3cret")
    shown = load_settings().redacted()
    assert shown["cluster_token"] == "***" and shown["api_key"] == ""
    assert "s3cret" not in repr(shown)


def test_models_dir_expands_home(tmp_path: Path) -> None:
    s = load_settings(env_file(tmp_path, "TARS_MODELS_DIR=~/tars-models\n"))
    assert s.models_dir == Path.home() / "tars-models"


def test_base_url() -> None:
    assert load_settings(host="0.0.0.0", port=8001).base_url == "http://127.0.0.1:8001"
    assert load_settings(advertise_url="http://192.168.1.10:8000/").base_url == "http://192.168.1.10:8000"


# --------------------------------------------------------------------------- env examples
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_documents_every_variable(example: Path) -> None:
    lines = example.read_text().splitlines()
    assigned = {ln.split("=", 1)[0]: i for i, ln in enumerate(lines) if re.match(r"^TARS_[A-Z_]+=", ln)}
    expected = {"TARS_" + name.upper() for name in Settings.model_fields}
    assert set(assigned) == expected, f"missing: {expected - set(assigned)}, unknown: {set(assigned) - expected}"
    for var, i in assigned.items():
        assert lines[i - 1].startswith("#"), f"{var} has no comment above it"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(example: Path) -> None:
    s = load_settings(example)
    assert s.gpu_profile == "" and s.vram_reserve_mb == 500 and s.context == 2048


def test_pc1_and_pc2_examples_fit_together() -> None:
    pc1, pc2 = (load_settings(e) for e in EXAMPLES)
    assert (pc1.node_name, pc1.host, pc1.port, pc1.peers, pc1.effective_role) == ("pc1", "0.0.0.0", 8000, [], "server")
    assert (pc2.node_name, pc2.port, pc2.peers, pc2.effective_role) == ("pc2", 8001, ["http://PC1_ADDRESS:8000"], "worker")
    pc2.check_for_serving()  # a token is set


def test_state_folder_is_the_models_folder_unless_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed.cluster_state import ClusterState
    from distributed.known_peers import KnownPeers

    monkeypatch.delenv("TARS_STATE_DIR", raising=False)
    s = load_settings(None, node_name="pc1", models_dir=tmp_path / "m")
    assert s.state_folder == tmp_path / "m"
    monkeypatch.setenv("TARS_STATE_DIR", "")  # set but empty: the default
    assert load_settings(None, models_dir=tmp_path / "m").state_folder == tmp_path / "m"
    monkeypatch.setenv("TARS_STATE_DIR", str(tmp_path / "st"))
    s = load_settings(None, node_name="pc1", models_dir=tmp_path / "m")
    assert s.state_folder == tmp_path / "st"
    assert ClusterState.for_settings(s).path == tmp_path / "st" / "tars-state-pc1.json"
    assert KnownPeers.for_settings(s).path == tmp_path / "st" / "tars-known-peers-pc1.json"
