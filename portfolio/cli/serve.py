"""`portfolio serve`: the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress

import click

from portfolio.cli._base import _emit_json, _registry, cli, json_option
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


@cli.command()
@click.argument("ref")
@click.option("--engine", type=click.Choice(["llamacpp"]), default="llamacpp", show_default=True,
              help="The engine to compare with: llama.cpp over the base's GGUF as shipped, with the version's GGUF adapter.")
@click.option("--prompts", "prompts_file", type=click.File("r", encoding="utf-8"), default=None,
              help="One prompt per line (default: a fixed set of 12 varied prompts).")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@json_option
@click.pass_context
def parity(ctx: click.Context, ref: str, engine: str, prompts_file, max_new_tokens: int, as_json: bool) -> None:
    """Compare REF's greedy answers in a serving engine with portfolio's reference model,
    token by token (REF: a version, or base:NAME)."""
    from portfolio.engines.parity import llamacpp_parity

    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in prompts_file if line.strip()] if prompts_file else None
    report = llamacpp_parity(_registry(ctx), ref, prompts, max_new_tokens, log=lambda *_: None)
    if as_json:
        _emit_json(report.to_dict())
        return
    click.echo(f"{ref} on {engine} over {report.base_file}: {report.identical_share:.0%} of prompts token-identical, "
               f"{report.token_share:.0%} of tokens before the first difference")
    for p in report.prompts:
        where = "identical" if p.first_difference is None else f"differs at token {p.first_difference}"
        click.echo(f"  {where:>20}  {p.prompt[:40]!r} -> {p.reference_text[:60]!r}"
                   + ("" if p.first_difference is None else f" | engine {p.engine_text[:60]!r}"))
