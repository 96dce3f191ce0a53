"""`tars models list | pull | add | rm`: what is on disk, what the catalog offers, getting it,
and the user's own entries.

    tars models pull ID|hf.co/ORG/REPO[:QUANT]    download (resumable, verified); a reference is resolved once
    tars models add FILE.gguf [--id ID] [--chat-template FILE|NAME] [--mmproj FILE]
                                                  register a local GGUF (referenced in place, not copied)
    tars models rm ID|REFERENCE                   take an entry out of the user catalog / the references

Entries go to ``TARS_MODELS_DIR/catalog.toml`` (``catalog_files.py``); a running node sees the
change at its next lookup (``POST /models {"model": ID}`` serves it), with no restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

EnvFile = typer.Option(None, "--env-file", help="Env file to read settings from (e.g. env/.env.pc1).")

models_app = typer.Typer(help="Models on disk and in the catalog: list, pull, add, rm.", no_args_is_help=True)


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
        kind = r["kind"] + (" +vision" if r.get("vision") else "")
        t.add_row(r["id"], f"{kind}\n[dim]{r['backend']}[/]", size, where)
    con = _console()
    con.print(t)
    if missing:
        con.print(f"Get a model: [bold]tars models pull ID[/] (e.g. tars models pull {missing[0]}); "
                  "resumable, verified.")
    con.print("Serve models: TARS_MODELS=id1,id2 in your env file (env/.env.pc1); "
              "`tars plan` says which ones fit your hardware.")


@models_app.command("pull")
def pull_cmd(
    model_id: str = typer.Argument(..., metavar="ID", help="A catalog model id (see `tars models list`) or a hub "
                                                         "reference hf.co/ORG/REPO[:QUANT]."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Download a catalog model or a hub reference into the models folder (resumable, verified)."""
    from ..errors import DownloadFailed
    from ..modelref import resolve

    store = _store(env_file)
    spec = resolve(model_id, store.catalog)  # unknown id → ModelNotFound listing the valid ids
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
    con.print(f"pulling {spec.id} from {spec.repo}" + (f" ({', '.join(_files(spec))})" if spec.shards or spec.mmproj
                                                       else "") + " …")
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


@models_app.command("add")
def add_cmd(
    file: Path = typer.Argument(..., metavar="FILE.gguf", help="A GGUF on this disk (the first file of a split one)."),
    model_id: Optional[str] = typer.Option(None, "--id", help="The id to serve it under (default: the file name)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template",
                                                help="A Jinja chat template file, or a shipped template's name, in "
                                                     "place of the GGUF's own."),
    mmproj: Optional[Path] = typer.Option(None, "--mmproj", help="Its vision projector GGUF (mmproj-*.gguf)."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Register a local GGUF in your catalog (its numbers read from its header). The file is
    referenced where it is, not copied."""
    from .. import catalog_files
    from ..modelref import local_entry
    from ..settings import load_settings

    settings = load_settings(env_file)
    entry = local_entry(file, model_id=model_id, chat_template=chat_template, mmproj=mmproj)
    user = settings.models_dir / catalog_files.USER_FILE
    builtin = _store(env_file).catalog
    note = ""
    if entry["id"] in builtin and not _in_user_file(user, entry["id"]):
        note = f" (it replaces the entry '{entry['id']}' had; `tars models rm {entry['id']}` restores it)"
    catalog_files.add_entry(user, entry, comment=f"added by `tars models add {file}`")
    typer.echo(f"{entry['id']}: registered in {_home(str(user))}{note}")
    typer.echo(f"  file: {entry['path']} — referenced in place, not copied: moving or deleting it breaks the entry; "
               f"`tars models rm {entry['id']}` removes the entry, never the file")
    typer.echo(f"  {entry['quant']}, {entry['size_mb']} MB, {entry.get('n_layers')} layers, context {entry['context']}"
               + (f", chat template {entry['chat_template']}" if entry.get("chat_template")
                  else ", its own chat template")
               + (", sees images" if entry.get("mmproj") else ""))
    typer.secho(f"a running node serves it with POST /models {{\"model\": \"{entry['id']}\"}} (`tars run "
                f"{entry['id']}`), no restart needed", err=True)


@models_app.command("rm")
def rm_cmd(
    model_id: str = typer.Argument(..., metavar="ID", help="An entry of your catalog, or a hub reference."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Take a model out of your catalog (a `tars models add` entry) or forget a hub reference.
    Files stay where they are."""
    from .. import catalog_files
    from ..errors import ModelNotFound, ValidationFailed
    from ..settings import load_settings

    settings = load_settings(env_file)
    store = _store(env_file)
    spec = store.catalog.get(model_id) if model_id in store.catalog else None
    where = store.path_for(spec) if spec is not None else None
    user = settings.models_dir / catalog_files.USER_FILE
    if catalog_files.remove_entry(user, model_id):
        typer.echo(f"{model_id}: removed from {_home(str(user))}")
    elif store.catalog.forget(model_id):
        typer.echo(f"{model_id}: reference forgotten (resolved again from the hub when next asked for)")
    elif spec is not None:
        raise ValidationFailed(f"'{model_id}' is a built-in catalog model: it cannot be removed (nothing of it is "
                               "served unless TARS_MODELS or a deploy names it)", field="model")
    else:
        raise ModelNotFound(model_id, store.catalog.ids())
    if where is not None:
        typer.echo(f"  its files stay: {_home(str(where))}")
    typer.secho("a running node sees the change at its next lookup; a model it serves keeps running until "
                f"`tars stop {model_id}`", err=True)


def _in_user_file(user: Path, model_id: str) -> bool:
    from ..catalog import read_catalog_file

    return user.is_file() and any(s.id == model_id for s in read_catalog_file(user))


def _files(spec: Any) -> list[str]:
    from ..hub import gguf_files

    return gguf_files(spec)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
