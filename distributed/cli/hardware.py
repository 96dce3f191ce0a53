"""`tars profile` and `tars plan`: what this hardware is, and what each host should serve.

Both read settings (env file + ``TARS_*``) for the simulated profile, the VRAM reserve,
the context and the models folder; flags override them. Errors are ``TarsError`` and are
printed by the CLI root without a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import typer

from ..domain import HostProfile, Plan
from ..errors import ConfigError

EnvFile = typer.Option(None, "--env-file", help="Env file to read settings from (e.g. env/.env.pc1).")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _settings(env_file: Optional[Path]) -> Any:
    from ..settings import load_settings

    return load_settings(env_file)


def _console() -> Any:
    """Rich console at the terminal's width (COLUMNS, else 80 when piped): every view here
    is laid out to read well from 80 columns up."""
    from rich.console import Console

    return Console(highlight=False)


def _kv_table(title: str = "") -> Any:
    from rich import box
    from rich.table import Table

    t = Table(title=title or None, title_justify="left", box=box.SIMPLE_HEAD, show_header=False, pad_edge=False)
    t.add_column("key", style="bold", no_wrap=True)
    t.add_column("value", overflow="fold")
    return t


def _fmt_mb(mb: Optional[float]) -> str:
    return "n/a" if mb is None else f"{mb / 1024:.1f} GB"


def _opt(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v}{unit}"


# --------------------------------------------------------------------------- profile
def render_profile(prof: HostProfile, tune: dict[str, Any]) -> None:
    con = _console()
    label = f"  [bold yellow]SIMULATED ({prof.source.split(':', 1)[-1]})[/]" if prof.simulated else ""
    con.print(f"[bold]{prof.hostname}[/]{label}   source: {prof.source}")
    con.print(f"CPU: {prof.cpu_model} · {prof.cpu_cores} cores · RAM {_fmt_mb(prof.ram_total_mb)} "
              f"({_fmt_mb(prof.ram_free_mb)} free)")
    for g in prof.gpus:
        con.print(f"[bold]GPU {g.index}: {g.name}[/]" + (" [yellow](SIMULATED)[/]" if prof.simulated else ""))
        t = _kv_table()
        t.add_row("VRAM", f"{_fmt_mb(g.vram_total_mb)} total · {_fmt_mb(g.vram_used_mb)} used · "
                          f"{_fmt_mb(g.vram_free_mb)} free")
        t.add_row("now", f"{_opt(g.temperature_c, ' °C')} · {_opt(g.power_w, ' W')} of "
                         f"{_opt(g.power_limit_w, ' W')} · {_opt(g.utilization_pct, ' %')} busy")
        t.add_row("compute", f"capability {_opt(g.compute_capability)} · driver {_opt(g.driver_version)} · "
                             f"CUDA {_opt(g.cuda_version)}")
        t.add_row("UUID", g.uuid or "n/a")
        con.print(t)
    for note in prof.notes:
        con.print(f"[bold]{note}[/]" if note.startswith("no GPU") else f"note: {note}")
    con.print("[bold]Tuning[/] (derived from this profile)")
    t = _kv_table()
    for k, v in tune.items():
        t.add_row(k, "n/a" if v is None else str(v))
    con.print(t)


def profile_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print the profile (with tuning) as JSON."),
    simulate: str = typer.Option("", "--simulate", help="A preset (rtx3060-12gb, gtx1660s-6gb, cpu, ...) or a JSON profile path."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Show this host's hardware (NVML → torch.cuda → CPU) and the GPU tuning derived from it."""
    from .. import profiler

    settings = _settings(env_file)
    prof = profiler.profile_host(simulate or settings.gpu_profile, settings.node_name)
    tune = profiler.tuning(prof, settings.vram_reserve_mb)
    from ..engine.choice import decide

    eng = decide(settings)  # which GGUF chat engine a node started with these settings runs
    engine = {"engine": eng.engine, "reason": eng.reason, "binary": eng.binary.to_dict() if eng.binary else None}
    if as_json:
        typer.echo(json.dumps({**prof.to_dict(), "tuning": tune, "chat_engine": engine}, indent=2))
    else:
        render_profile(prof, tune)
        what = "llama-server" if eng.engine == "server" and eng.binary else eng.engine
        from rich.console import Console

        Console().print(f"Chat engine (GGUF): {what} — {eng.reason}", markup=False, overflow="fold")  # fits COLUMNS


# --------------------------------------------------------------------------- plan
def parse_hosts(specs: list[str]) -> dict[str, HostProfile]:
    """``["pc1=rtx3060-12gb", "pc2=/path/p.json"]`` → {name: simulated profile}."""
    from .. import profiler

    hosts: dict[str, HostProfile] = {}
    for item in specs:
        name, sep, prof = item.partition("=")
        name, prof = name.strip(), prof.strip()
        if not sep or not name or not prof:
            raise ConfigError(f"--host '{item}' must be NAME=PRESET_OR_JSON, e.g. pc1=rtx3060-12gb; "
                              f"presets: {', '.join(profiler.PRESETS)}")
        if not _NAME.match(name):
            raise ConfigError(f"--host '{item}': host name '{name}' may use letters, digits, '.', '_' and '-'")
        if name in hosts:
            raise ConfigError(f"--host: host name '{name}' is given twice")
        hosts[name] = profiler.profile_host(prof, name)
    return hosts


def plan_json(plan: Plan) -> dict[str, Any]:
    """The documented `tars plan --json` shape (a split model adds "split": [{node, device, layers, vram_mb}];
    a GGUF chat model adds "slots", its engine's slots as planned)."""
    keys = ("model", "kind", "node", "device", "quant", "n_gpu_layers", "vram_mb", "reason")
    return {"assignments": [{**{k: getattr(a, k) for k in keys}, **({"split": a.split} if a.split else {}),
                             **({"slots": a.slots} if a.slots else {})}
                            for a in plan.assignments],
            "unplaced": [{"model": u.model, "reason": u.reason} for u in plan.unplaced]}


def _layers(a: Any, n_layers: dict[str, int]) -> str:
    if a.device == "cpu":
        return "CPU"
    if a.split:
        return " + ".join(f"{s['layers']} {s['node']}" for s in a.split)
    if a.n_gpu_layers < 0:
        return "all"
    return f"{a.n_gpu_layers} of {n_layers.get(a.model, '?')}"


def _needs(a: Any) -> str:
    if a.device == "cpu":
        return f"{a.ram_mb} MB RAM"
    if a.split:
        return " + ".join(f"{s['vram_mb']} MB" for s in a.split) + " VRAM"
    return f"{a.vram_mb} MB VRAM" + (f" + {a.ram_mb} MB RAM" if a.ram_mb else "")


def _plan_table(con: Any, title: str, p: Plan, n_layers: dict[str, int]) -> None:
    """Where each model goes (a table that fits 80 columns), then why, one line each."""
    from rich import box
    from rich.table import Table

    con.print(f"[bold]{title}[/]")
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("model", "kind", "host", "device", "quant", "GPU layers", "needs"):
        t.add_column(col, overflow="fold")
    for a in p.assignments:
        t.add_row(a.model, a.kind, a.node, a.device, a.quant, _layers(a, n_layers), _needs(a))
    con.print(t)
    why = Table.grid(padding=(0, 1))
    why.add_column(no_wrap=True)
    why.add_column(overflow="fold")
    for a in p.assignments:
        why.add_row(f"  [bold]{a.model}[/]", a.reason)
    for u in p.unplaced:
        why.add_row(f"  [bold red]{u.model}[/]", f"[red]not placed:[/] {u.reason}")
    if why.row_count:
        con.print("Why:")
        con.print(why)


def render_plan(hosts: dict[str, HostProfile], plan: Plan, settings: Any,
                rec: list[Any], rec_plan: Plan, on_disk: dict[str, bool], specs: dict[str, Any],
                this_host: bool = False, paths: dict[str, Path] | None = None) -> None:
    from rich import box
    from rich.table import Table

    from ..planner import usable_vram_mb
    from ..vram import estimate

    reserve_mb, context = settings.vram_reserve_mb, settings.context
    con = _console()
    con.print(f"[bold]Hosts[/] (reserve {reserve_mb} MB per GPU, context {context} tokens)")
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("host", "profile", "GPU", "usable VRAM", "RAM"):
        t.add_column(col, overflow="fold")
    for name, prof in hosts.items():
        gpu = prof.best_gpu
        src = f"[yellow]SIMULATED {prof.source.split(':', 1)[-1]}[/]" if prof.simulated else prof.source
        t.add_row(name, src, gpu.name if gpu else "none (CPU mode)", _fmt_mb(usable_vram_mb(prof, reserve_mb)),
                  _fmt_mb(prof.ram_total_mb))
    con.print(t)

    def layers_of(p: Plan) -> dict[str, int]:
        return {a.model: estimate(specs[a.model], context).n_layers for a in p.assignments if a.model in specs}

    _plan_table(con, "Plan for the models to serve (TARS_MODELS, else the embedded defaults)", plan, layers_of(plan))
    from ..deploy.hints import replica_hints  # hosts left idle: replicas (issue 12.2)

    for line in replica_hints(hosts, plan, specs, settings, paths=paths):
        con.print(f"[bold]Idle:[/] {line}")
    if not rec:
        return
    con.print()
    if [a.model for a in rec_plan.assignments] == [a.model for a in plan.assignments] and \
            [(a.model, a.node) for a in rec_plan.assignments] == [(a.model, a.node) for a in plan.assignments]:
        con.print("[bold]Recommended for this hardware:[/] what the plan above already serves.")
        return
    _plan_table(con, "Recommended for this hardware (from the catalog)", rec_plan, layers_of(rec_plan))
    con.print()
    missing: dict[str, list[str]] = {}
    for a in rec_plan.assignments:
        if not on_disk.get(a.model):
            missing.setdefault(a.node, []).append(a.model)
    if missing:
        con.print("[bold]To run it[/], pull the models on the host that serves each one:")
        for node, ids in missing.items():
            where = "on this host" if this_host else f"on {node}"
            con.print(f"  {where}: " + " && ".join(f"tars models pull {m}" for m in ids))
    else:
        con.print("[bold]To run it[/]: every recommended model is already on disk.")
    wanted = ",".join(s.id for s in rec)
    con.print(f"  then set [bold]TARS_MODELS={wanted}[/]\n  in env/.env.pc1 (the server's env file) and restart it.")


def plan_cmd(
    host: list[str] = typer.Option([], "--host", help="NAME=PRESET_OR_JSON; repeat per host. Default: this host."),
    models: str = typer.Option("", "--models", help="Comma-separated model ids or hub references (hf.co/ORG/REPO:QUANT, "
                                                    "planned from their GGUF header before a pull). Default: TARS_MODELS "
                                                    "or the embedded defaults."),
    as_json: bool = typer.Option(False, "--json", help='Print {"assignments": [...], "unplaced": [...]}.'),
    recommended: bool = typer.Option(False, "--recommended",
                                     help="Plan the catalog models recommended for this hardware instead "
                                          "(with --json: the same shape, for scripts)."),
    env_file: Optional[Path] = EnvFile,
) -> None:
    """Show which model each host serves, on which device, and why (plus what to pull)."""
    from .. import profiler
    from ..catalog import load_catalog
    from ..modelref import resolve
    from ..planning import plan_for, recommend_for
    from ..store import ModelStore

    settings = _settings(env_file)
    catalog = load_catalog(user_file=settings.models_dir / "catalog.toml")
    hosts = parse_hosts(host) if host else {
        settings.node_name: profiler.profile_host(settings.gpu_profile, settings.node_name)}
    ids = [m.strip() for m in models.split(",") if m.strip()] if models else list(settings.models)
    # catalog ids and hub references (hf.co/ORG/REPO:QUANT: resolved once, its header read by range)
    specs = [resolve(i, catalog) for i in ids] if ids else catalog.defaults()
    store = ModelStore(settings.models_dir, catalog)
    paths: dict[str, Path] = store.paths(catalog.all())
    on_disk = {s.id: s.id in store.on_disk([s]) for s in catalog.all()}
    if recommended:
        if models:
            raise ConfigError("--recommended and --models do not go together: --recommended picks the models")
        specs = recommend_for(settings, hosts, catalog.all())
    result = plan_for(settings, hosts, specs, paths=paths)
    if as_json:
        typer.echo(json.dumps(plan_json(result), indent=2))
        return
    rec = recommend_for(settings, hosts, catalog.all())
    render_plan(hosts, result, settings, rec, plan_for(settings, hosts, rec, paths=paths), on_disk,
                {s.id: s for s in catalog.all()}, this_host=not host, paths=paths)


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
    app.command("plan")(plan_cmd)
