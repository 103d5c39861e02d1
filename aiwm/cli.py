"""The ``aiwm`` command: up, down, status, token create.

Ray, Serve and the actors are imported inside the commands that use them, so ``aiwm
token create`` stays fast and ``aiwm`` imports nothing from ``serve`` or ``actors`` at
import time.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import httpx
import typer
from rich.console import Console
from rich.table import Table

from aiwm import embedded_db
from aiwm.auth import Role, issue_token
from aiwm.cli_logs import logs
from aiwm.cli_models import models_app
from aiwm.settings import Settings, load_settings

app = typer.Typer(help="AIWM, the AI Workload Manager, on Ray.", no_args_is_help=True)
token_app = typer.Typer(help="Bearer tokens for the REST API.", no_args_is_help=True)
app.add_typer(token_app, name="token")
app.add_typer(models_app, name="models")
app.command("logs")(logs)
out = Console()
err = Console(stderr=True)
STATE_FILE = "state.json"


def _state_path(settings: Settings) -> Path:
    return settings.aiwm_home / "run" / STATE_FILE


def _read_state(settings: Settings) -> dict[str, Any]:
    try:
        return json.loads(_state_path(settings).read_text())  # type: ignore[no-any-return]
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(settings: Settings, state: dict[str, Any]) -> None:
    path = _state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def redact(uri: str) -> str:
    """A database URI without its password, fit for printing (any host list, IPv6 too)."""
    return re.sub(r"^([a-z0-9+.-]+://[^:@/]*):[^@/]*@", r"\1:***@", uri, flags=re.I)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _api_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.port}"


def _health(settings: Settings, timeout: float = 2.0) -> tuple[int | None, dict[str, Any]]:
    try:
        r = httpx.get(f"{_api_url(settings)}/api/health", timeout=timeout)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as e:
        return None, {"error": f"{type(e).__name__}: {e}"}


def _ray_auth() -> None:
    """Ray 2.59+ starts heads with token auth, but a client joining by address only
    sends the token (~/.ray/auth_token) when RAY_AUTH_MODE says so, and Ray reads it
    when first imported: call this before importing ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def _start_head(settings: Settings, haproxy: bool) -> str:
    from serve.ingress import HA_PROXY_ENV, RAY_WORKER_ENV

    env = {**RAY_WORKER_ENV, **os.environ}
    if env.get("RAY_AUTH_MODE") == "token" and not env.get("RAY_AUTH_TOKEN"):
        # A fresh host has no ~/.ray/auth_token yet, and a token-mode head refuses to
        # start without one. The token is never printed.
        made = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token",
                               "--generate"], env=env, capture_output=True, text=True)
        if made.returncode != 0:
            err.print(made.stderr[-2000:])
            err.print(f"[red]✗[/] could not create Ray's auth token (exit {made.returncode})")
            raise typer.Exit(1)
    if haproxy:
        env.update(HA_PROXY_ENV)
    cmd = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
        "--port", str(settings.aiwm_ray_port),
        "--include-dashboard", "true",
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(settings.aiwm_dashboard_port),
        "--disable-usage-stats",
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        err.print(result.stdout[-2000:], result.stderr[-2000:])
        err.print(f"[red]✗[/] ray start failed (exit {result.returncode})")
        raise typer.Exit(1)
    return f"127.0.0.1:{settings.aiwm_ray_port}"


@app.command()
def up(
    address: Annotated[
        str | None, typer.Option(help="Address of a running Ray cluster to deploy into")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for /api/health")] = 120.0,
) -> None:
    """Start AIWM: the database (if embedded), a Ray head (unless --address), the API."""
    _ray_auth()  # before anything imports ray
    settings = load_settings()
    state = _read_state(settings)

    if settings.embedded_db:
        db = embedded_db.start(settings.aiwm_home, settings.aiwm_db_port)
        out.print(f"[green]✓[/] database: embedded SecantusDB pid {db.pid} on port {db.port}, "
                  f"data in {db.data_dir}")
    else:
        out.print(f"[green]✓[/] database: {redact(settings.database_uri)}")

    from serve.ingress import ingress_mode

    mode = ingress_mode()
    started_ray = False
    if address:
        ray_address = address
        mode_text = "as configured on that cluster (HAProxy needs RAY_SERVE_ENABLE_HA_PROXY=1 "\
                    "in its environment)"
    elif _port_open("127.0.0.1", settings.aiwm_ray_port):
        # A head on our port: left by an earlier `aiwm up` (perhaps one that failed later).
        ray_address = f"127.0.0.1:{settings.aiwm_ray_port}"
        started_ray = True
        mode_text = state.get("ingress", "as that head was started")
        out.print(f"[green]✓[/] ray: reusing the head already running at {ray_address}")
    else:
        with out.status("starting a Ray head (about 10 s)…"):
            ray_address = _start_head(settings, mode.haproxy)
        started_ray = True
        mode_text = mode.describe()
        out.print(f"[green]✓[/] ray: head started at {ray_address}")
    # Recorded before deploying, so `aiwm down` cleans up even after a failed `up`.
    _write_state(settings, {"rayAddress": ray_address, "startedRay": started_ray,
                            "ingress": mode_text, "port": settings.port})

    import ray

    from serve.ingress import deploy

    context = ray.init(address=ray_address, namespace="aiwm", log_to_driver=False)
    with out.status("deploying the Registry actor and the Serve app…"):
        deploy(settings)
    dashboard = context.dashboard_url or None
    if dashboard and not dashboard.startswith("http"):
        dashboard = f"http://{dashboard}"
    _write_state(settings, {"rayAddress": ray_address, "startedRay": started_ray,
                            "ingress": mode_text, "dashboard": dashboard, "port": settings.port})

    deadline = time.monotonic() + timeout
    with out.status("waiting for /api/health…"):
        while True:
            code, body = _health(settings)
            if code == 200:
                break
            if time.monotonic() > deadline:
                err.print(f"[red]✗[/] /api/health not green after {timeout:.0f}s: {code} {body}")
                raise typer.Exit(1)
            time.sleep(0.5)
    api = _api_url(settings)
    table = Table(title="AIWM is up", show_header=False)
    table.add_row("API", f"{api}/api")
    table.add_row("API docs", f"{api}/api-docs")
    table.add_row("Uploads", _upload_port_text(settings))
    table.add_row("Ray dashboard", dashboard or "-")
    table.add_row("Ingress", mode_text)
    table.add_row("Make a token", "aiwm token create --role admin --org ORG")
    log_file = settings.log_file()
    table.add_row("Logs", f"{log_file} (aiwm logs -f)" if log_file else
                  "on each process's stderr (AIWM_LOG_FILE=off)")
    out.print(table)


@app.command()
def down() -> None:
    """Stop the API, the Ray head that `aiwm up` started, and the embedded database."""
    _ray_auth()
    settings = load_settings()
    state = _read_state(settings)
    if state.get("startedRay"):
        from serve.ingress import HA_PROXY_PROCESS

        with out.status("stopping Ray…"):
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"],
                           capture_output=True)
            # `ray stop` leaves Serve's HAProxy behind, holding ports 8404 and 9101.
            subprocess.run(["pkill", "-f", HA_PROXY_PROCESS], capture_output=True)
        out.print("[green]✓[/] ray stopped")
    elif state.get("rayAddress"):
        import ray
        from ray import serve

        from actors import (
            NAMESPACE,
            ORCHESTRATOR_NAME,
            REGISTRY_NAME,
            release,
            release_node_hosts,
        )
        from serve.ingress import APP_NAME

        ray.init(address=state["rayAddress"], namespace=NAMESPACE, log_to_driver=False)
        serve.delete(APP_NAME)
        release(ORCHESTRATOR_NAME)  # unfinished executions stay in the database for next time
        release(REGISTRY_NAME)
        release_node_hosts()
        out.print(f"[green]✓[/] AIWM removed from the cluster at {state['rayAddress']}")
    if embedded_db.stop(settings.aiwm_home):
        out.print("[green]✓[/] embedded database stopped (data kept)")
    _state_path(settings).unlink(missing_ok=True)


@app.command()
def status() -> None:
    """A table of AIWM's parts, their health and URLs."""
    settings = load_settings()
    state = _read_state(settings)
    table = Table(title="AIWM status")
    for col in ("part", "status", "where"):
        table.add_column(col)
    if settings.embedded_db:
        pid = embedded_db.running(settings.aiwm_home)
        ok = pid is not None and embedded_db.ping(settings.aiwm_db_port)
        table.add_row("database", _mark(ok), f"embedded, pid {pid}, port {settings.aiwm_db_port}")
    else:
        table.add_row("database", "external", redact(settings.database_uri))
    ray_address = state.get("rayAddress")
    if ray_address:
        host, _, port = ray_address.rpartition(":")
        table.add_row("ray", _mark(_port_open(host, int(port))), ray_address)
    else:
        table.add_row("ray", _mark(False), "not started by aiwm")
    dashboard = state.get("dashboard")
    if dashboard:
        parsed = urlparse(dashboard)
        table.add_row("dashboard", _mark(_port_open(parsed.hostname or "", parsed.port or 80)),
                      dashboard)
    code, body = _health(settings)
    table.add_row("api", _mark(code == 200), f"{_api_url(settings)}/api-docs")
    for name, check in (body.get("checks") or {}).items():
        table.add_row(f"  {name}", _mark(check.get("status") == "up"),
                      check.get("error") or f"{check.get('latencyMs')} ms")
    if settings.aiwm_upload_port:
        table.add_row("upload port", _mark(_port_open("127.0.0.1", settings.aiwm_upload_port)),
                      _upload_port_text(settings))
    if state.get("ingress"):
        table.add_row("ingress", "", state["ingress"])
    out.print(table)


def _upload_port_text(settings: Settings) -> str:
    if not settings.aiwm_upload_port:
        return "through the API (AIWM_UPLOAD_PORT=0)"
    return (settings.aiwm_upload_url or
            f"http://127.0.0.1:{settings.aiwm_upload_port}/api/models/upload") + \
        " (aiwm models upload sends there)"


def _mark(ok: bool) -> str:
    return "[green]up[/]" if ok else "[red]down[/]"


@token_app.command("create")
def token_create(
    org: Annotated[str, typer.Option(help="The org the token may act in")],
    role: Annotated[list[Role], typer.Option(help="Role; repeat for several")] = [Role.admin],  # noqa: B006
    sub: Annotated[str, typer.Option(help="Who the token is for")] = "cli",
    expires_in: Annotated[int | None, typer.Option(help="Lifetime in seconds")] = None,
) -> None:
    """Sign a user token with this installation's JWT secret; the token is the last line."""
    settings = load_settings()
    token, expires = issue_token(
        secret=settings.secret(), sub=sub, org_id=org, roles=role,
        expires_in=expires_in or settings.jwt_expires_in,
    )
    roles = ",".join(sorted(r.value for r in role))
    err.print(f"token for sub={sub} org={org} roles={roles}, expires {expires.isoformat()}")
    print(token)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
