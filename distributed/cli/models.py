"""`tars models list | pull`: what is on disk, what the catalog offers, and getting it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

EnvFile = typer.Option(None, "--env-file", help="Env file to read settings from (e.g. env/.env.pc1).")

models_app = typer.Typer(help="Models on disk and in the catalog: list, pull.", no_args_is_help=True)


def _store(env_file: Optional[Path]) -> Any:
    from ..catalog import load_catalog
    from ..settings import load_settings
    from ..store import ModelStore

    settings = load_settings(env_file)
    return ModelStore(settings.models_dir, load_catalog(user_file=settings.models_dir / "catalog.toml"))


@models_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Every catalog model, whether it is on disk, and where."""
    from rich.console import Console
    from rich.table import Table

    store = _store(env_file)
    rows = store.list()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"Models ({store.models_dir})")
    for col in ("id", "kind", "backend", "on disk", "size", "source", "path"):
        t.add_column(col, overflow="fold")
    for r in rows:
        size = f"{r['size_mb']} MB" if r["size_mb"] is not None else "?"
        t.add_row(r["id"], r["kind"], r["backend"], "yes" if r["on_disk"] else "no", size, r["source"],
                  r["path"] or ("assembled from its package on first use" if r["embedded"]
                                else f"tars models pull {r['id']}"))
    Console(width=160, highlight=False).print(t)


@models_app.command("pull")
def pull_cmd(
    model_id: str = typer.Argument(..., metavar="ID", help="A catalog model id (see `tars models list`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Download a catalog model from the hub into the models folder (resumable, verified)."""
    store = _store(env_file)
    spec = store.catalog.get(model_id)  # unknown id → ModelNotFound listing the valid ids
    if not progress:
        path = store.pull(spec, progress=False)
    else:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        with Progress(TextColumn(f"[bold]{spec.id}[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn()) as bar:
            task = bar.add_task("pull", total=None)

            def report(done: int, total: Optional[int]) -> None:
                bar.update(task, completed=done, total=total)

            path = store.pull(spec, progress=report)
    typer.echo(f"{spec.id}: {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
