"""`portfolio ui`: the web dashboard."""

from __future__ import annotations

import click

from portfolio.cli._base import _registry, cli
from portfolio.cli.serve import _loopback


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", envvar="PORTFOLIO_UI_KEY", default=None,
              help="Enable writes (promote, rollback, revoke) for requests that give this key [env PORTFOLIO_UI_KEY]; read-only without it.")
@click.option("--allow-host", "allowed_hosts", multiple=True,
              help="A Host name to answer beside loopback ones when there is no API key (repeatable).")
@click.pass_context
def ui(ctx: click.Context, host: str, port: int, api_key: str | None, allowed_hosts: tuple[str, ...]) -> None:
    """Serve the web dashboard: adapters, versions with their lineage graph, datasets with
    reverse lineage, the matrix, alias history, schedules and events; JSON under /api."""
    from portfolio.ui.run import run_dashboard

    if api_key is not None and len(api_key) < 12:
        raise click.UsageError("--api-key is shorter than 12 characters; use a long random key (e.g. `openssl rand -hex 16`)")
    if not _loopback(host) and api_key is None:
        raise click.UsageError(f"--host {host} is reachable from other machines: set --api-key (or PORTFOLIO_UI_KEY)")
    run_dashboard(_registry(ctx), host, port, api_key, log=lambda m: click.echo(m, err=True), allowed_hosts=allowed_hosts)
