"""``tars serve``: run one node — ``service.build`` (the composition root) makes its parts,
``create_app`` serves them under uvicorn.

Settings come from ``--env-file`` + ``TARS_*`` + the flags here (flags win). On a
fresh machine with no env file this serves the embedded default models on
127.0.0.1:8000. Bad settings stop start-up with exit code 2 and the message
naming the variable; the models load in the background after the socket is
open, so ``/health`` answers 503 "loading" until they are ready.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError, TarsError


def serve(env_file: Optional[Path] = None, host: Optional[str] = None, port: Optional[int] = None,
          name: Optional[str] = None, gpu_profile: Optional[str] = None, peers: Optional[str] = None,
          models: Optional[str] = None, models_dir: Optional[Path] = None, backend: Optional[str] = None,
          log_level: Optional[str] = None, log_format: Optional[str] = None) -> None:
    """Build settings, the node and the app, then run uvicorn until interrupted."""
    from .. import logs
    from ..settings import load_settings

    try:
        settings = load_settings(env_file, host=host, port=port, node_name=name, gpu_profile=gpu_profile,
                                 peers=peers, models=models, models_dir=models_dir, backend_override=backend,
                                 log_level=log_level, log_format=log_format)
        settings.check_for_serving()
        if settings.gpu_profile:  # a bad preset or JSON file stops start-up here, not in the app's lifespan
            from ..profiler import load_simulated

            try:
                load_simulated(settings.gpu_profile)
            except TarsError as exc:
                raise ConfigError(f"TARS_GPU_PROFILE={settings.gpu_profile!r}: {exc.message}", **exc.details) from None
    except TarsError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(2)

    logs.configure(settings.node_name, settings.log_level, settings.log_format)
    log = logs.get_logger("serve")

    from ..api.app import create_app
    from ..service import build

    try:
        service = build(settings)  # one catalog (built-in + TARS_MODELS_DIR/catalog.toml) for every part
        service.node.model_specs()  # an unknown model in TARS_MODELS stops here, before the socket opens
    except TarsError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(2)
    app = create_app(service)
    log.info("starting node %s on %s://%s:%d (role %s)", settings.node_name, "https" if settings.tls_cert else "http",
             settings.host, settings.port, settings.effective_role)
    from .http_server import build_server

    server = build_server(app, settings, log)  # connection deadlines and bound, TLS (cli/http_server.py)
    from .ollama_port import sockets

    server.run(sockets=sockets(server.config, settings, log))  # + TARS_OLLAMA_PORT's socket when set
    if getattr(server, "started", True) is False:  # e.g. the port is taken: uvicorn logged why
        sys.exit(1)


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        env_file: Optional[Path] = typer.Option(None, "--env-file", help="Env file with TARS_* settings (e.g. env/.env.pc1)."),
        host: Optional[str] = typer.Option(None, help="Address to bind (TARS_HOST); 0.0.0.0 for the LAN."),
        port: Optional[int] = typer.Option(None, help="TCP port (TARS_PORT, default 8000)."),
        name: Optional[str] = typer.Option(None, "--name", help="Node name in the cluster (TARS_NODE_NAME)."),
        gpu_profile: Optional[str] = typer.Option(None, "--gpu-profile",
                                                  help="Simulated hardware preset or JSON file (TARS_GPU_PROFILE)."),
        peers: Optional[str] = typer.Option(None, help="Comma-separated peer URLs to join (TARS_PEERS)."),
        models: Optional[str] = typer.Option(None, help="Comma-separated model ids to serve (TARS_MODELS)."),
        models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Models folder (TARS_MODELS_DIR)."),
        backend: Optional[str] = typer.Option(None, help="Force one backend for every model, e.g. 'fake' "
                                                         "(TARS_BACKEND_OVERRIDE)."),
        log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning or error."),
        log_format: Optional[str] = typer.Option(None, "--log-format", help="text or json."),
    ) -> None:
        """Serve this node: native REST API, OpenAI-compatible /v1, /rpc for peers, dashboard."""
        serve(env_file, host, port, name, gpu_profile, peers, models, models_dir, backend, log_level, log_format)
