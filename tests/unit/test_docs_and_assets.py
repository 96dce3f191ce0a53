"""README and dashboard assets stay true to the code they describe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "distributed" / "api" / "dashboard"


def test_readme_settings_table_is_generated_from_settings() -> None:
    r = subprocess.run([sys.executable, "scripts/gen_settings_table.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_readme_lists_every_setting_and_the_two_commands() -> None:
    from distributed.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in Settings.model_fields:
        assert f"`TARS_{name.upper()}`" in readme, f"TARS_{name.upper()} missing from README.md"
    assert "bash scripts/setup_pc1.sh && ./run_pc1.sh" in readme
    assert "bash scripts/test.sh" in readme  # CI runs this exact command


def test_quick_start_shows_every_endpoint_with_curl() -> None:
    text = (ROOT / "QUICK_START.md").read_text(encoding="utf-8")
    for path in ("/health", "/status", "/models", "/inference", "/embed", "/config", "/v1/models",
                 "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/metrics", "/rpc"):
        assert re.search(rf"curl[^\n]*\$PC[12]{re.escape(path)}\b", text), f"no curl example for {path}"
    assert '"stream": true' in text and "Authorization: Bearer $TOKEN" in text
    for problem in ("Connection refused", "CUDA not found", "out of memory", "RPC timeout", "already in use",
                    "token rejected"):
        assert problem.lower() in text.lower(), f"troubleshooting lacks {problem!r}"


def test_dashboard_assets_ship_in_the_package_and_load_nothing_external() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"api/dashboard/*"' in pyproject
    for name in ("index.html", "app.js", "style.css"):
        text = (DASHBOARD / name).read_text(encoding="utf-8")
        # no CDN, no web fonts: a home LAN may have no internet
        assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text), f"{name} loads an external URL"
        assert "@import" not in text and "fonts.googleapis" not in text
