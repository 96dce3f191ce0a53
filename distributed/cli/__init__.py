"""The `tars` command line (``tars serve`` builds a node with ``service.build``, the
composition root).

Each command group lives in its own module and registers itself on ``app``:

- ``hardware.py``  tars profile, tars plan
- ``models.py``    tars models list | pull
- ``serve.py``     tars serve
- ``ops.py``       tars status, tars bench
- ``deploy.py``    tars run, tars stop, tars ps (models at runtime)
"""

from __future__ import annotations

import sys

import typer

from ..errors import TarsError

app = typer.Typer(
    name="tars",
    help="TARS Distributed: your home PCs as one local AI service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from . import deploy, hardware, models, ops, serve

    for mod in (hardware, models, serve, ops, deploy):
        mod.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    from .. import __version__

    typer.echo(__version__)


def main() -> None:
    _register()
    try:
        app()
    except TarsError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(2)
