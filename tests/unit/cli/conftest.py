"""Fixtures of the CLI tests: the ``hardware`` and ``models`` commands on one Typer app, and
an environment with no TARS_* setting from the caller."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer

from distributed.cli import hardware, models


@pytest.fixture
def app() -> typer.Typer:
    a = typer.Typer()
    hardware.register(a)
    models.register(a)
    return a


@pytest.fixture
def no_tars_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No TARS_* from the caller; the models folder is ``tmp_path/models`` (returned)."""
    for name in list(os.environ):
        if name.startswith("TARS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TARS_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"
