"""`portfolio serve`: the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress

import click

from portfolio.cli._base import _registry, cli
from portfolio.training.config import DEVICES


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; beyond loopback an API key is required.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--router", default=None, help="Router for requests that name no model (and the default base).")
@click.option("--base", "base_name", default=None, help="Base model to serve [the router's, or the only one registered].")
@click.option("--api-key", envvar="PORTFOLIO_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' [env PORTFOLIO_API_KEY].")
@click.option("--max-adapters", type=click.IntRange(1, 256), default=8, show_default=True, help="Adapter versions kept loaded (LRU).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True, help="Requests generated together at most.")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-concurrency", type=click.IntRange(1, 10000), default=64, show_default=True, help="Requests in flight before 429.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--allow-host", "allowed_hosts", multiple=True,
              help="A Host name to answer beside loopback ones when there is no API key (repeatable).")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, router: str | None, base_name: str | None, api_key: str | None, max_adapters: int,
          batch_size: int, max_tokens: int, max_concurrency: int, device: str, allowed_hosts: tuple[str, ...]) -> None:
    """Serve the portfolio over HTTP with OpenAI-style endpoints, routed by tenant, task and risk."""
    from portfolio.server.run import serve as run_server

    if not _loopback(host) and not api_key:
        raise click.UsageError(f"--host {host} is reachable from other machines: set --api-key (or PORTFOLIO_API_KEY)")
    run_server(_registry(ctx), host, port, router=router, base_name=base_name, api_key=api_key, max_adapters=max_adapters,
               batch_size=batch_size, max_tokens=max_tokens, max_concurrency=max_concurrency, device=device,
               allowed_hosts=allowed_hosts, log=lambda m: click.echo(m, err=True))
