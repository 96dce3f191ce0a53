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


def _home(path: str) -> str:
    """A path as a person reads it: ~ for the home folder."""
    home = str(Path.home())
    return "~" + path[len(home):] if home != "/" and path.startswith(home + "/") else path


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)  # the terminal's width (COLUMNS, else 80 when piped)


@models_app.command("list")
def list_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Every catalog model, whether it is on disk, and where."""
    from rich import box
    from rich.table import Table

    store = _store(env_file)
    rows = store.list()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"Models in {_home(str(store.models_dir))}", title_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False)
    t.add_column("id", no_wrap=True)
    t.add_column("kind")
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("on disk", overflow="fold", ratio=1)
    missing = []
    for r in rows:
        size = f"{r['size_mb']} MB" if r["size_mb"] is not None else "?"
        if r["on_disk"]:
            where = f"[green]yes[/] {_home(r['path'])}"
        elif r["embedded"]:
            where = "yes, in its package (assembled on first use)"
        else:
            missing.append(r["id"])
            where = f"[yellow]no[/] [dim](hub: {'/'.join(r['source'].removeprefix('hub:').split('/')[:2])})[/]"
        t.add_row(r["id"], f"{r['kind']}\n[dim]{r['backend']}[/]", size, where)
    con = _console()
    con.print(t)
    if missing:
        con.print(f"Get a model: [bold]tars models pull ID[/] (e.g. tars models pull {missing[0]}); "
                  "resumable, verified.")
    con.print("Serve models: TARS_MODELS=id1,id2 in your env file (env/.env.pc1); "
              "`tars plan` says which ones fit your hardware.")


@models_app.command("pull")
def pull_cmd(
    model_id: str = typer.Argument(..., metavar="ID", help="A catalog model id (see `tars models list`)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Download a catalog model from the hub into the models folder (resumable, verified)."""
    from ..errors import DownloadFailed

    store = _store(env_file)
    spec = store.catalog.get(model_id)  # unknown id → ModelNotFound listing the valid ids
    try:
        if store.path_for(spec) is not None or spec.embedded or spec.path:
            path = store.pull(spec, progress=False)
        elif not progress:
            path = store.pull(spec, progress=False)
        else:
            path = _pull_with_bar(store, spec)
    except KeyboardInterrupt:
        raise DownloadFailed(f"pull of '{spec.id}' interrupted; run `tars models pull {spec.id}` again to resume "
                             "where it stopped", model=spec.id) from None
    typer.echo(f"{spec.id}: {path}")
    if not spec.embedded:
        typer.secho(f"to serve it, list it in TARS_MODELS on the server (env/.env.pc1), e.g. "
                    f"TARS_MODELS={spec.id},all-MiniLM-L6-v2; `tars plan` shows where it will run", err=True)


def _pull_with_bar(store: Any, spec: Any) -> Path:
    """The pull with a rich progress bar on stderr, shown once the first bytes arrive."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    con = Console(stderr=True, highlight=False)
    con.print(f"pulling {spec.id} from {spec.repo} …")
    bar = Progress(TextColumn(f"[bold]{spec.id}[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=con, transient=False)
    state: dict[str, Any] = {}

    def report(done: int, total: Optional[int]) -> None:
        if "task" not in state:
            bar.start()
            state["task"] = bar.add_task("pull", total=total)
        bar.update(state["task"], completed=done, total=total)

    try:
        return store.pull(spec, progress=report)
    finally:
        if "task" in state:
            bar.stop()


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
