"""`portfolio serve`: the OpenAI-compatible server."""

from __future__ import annotations

import ipaddress

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option
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
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10000), default=5.0, show_default=True,
              help="How long a batch waits for more requests to join it before generating.")
@click.option("--max-tokens", type=click.IntRange(1, 32768), default=512, show_default=True, help="Largest max_tokens a request may ask.")
@click.option("--max-concurrency", type=click.IntRange(1, 10000), default=64, show_default=True, help="Requests in flight before 429.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--allow-host", "allowed_hosts", multiple=True,
              help="A Host name to answer beside loopback ones when there is no API key (repeatable).")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, router: str | None, base_name: str | None, api_key: str | None, max_adapters: int,
          batch_size: int, batch_wait_ms: float, max_tokens: int, max_concurrency: int, device: str,
          allowed_hosts: tuple[str, ...]) -> None:
    """Serve the portfolio over HTTP with OpenAI-style endpoints, routed by tenant, task and risk."""
    from portfolio.server.run import serve as run_server

    if not _loopback(host) and not api_key:
        raise click.UsageError(f"--host {host} is reachable from other machines: set --api-key (or PORTFOLIO_API_KEY)")
    run_server(_registry(ctx), host, port, router=router, base_name=base_name, api_key=api_key, max_adapters=max_adapters,
               batch_size=batch_size, batch_wait_s=batch_wait_ms / 1000, max_tokens=max_tokens, max_concurrency=max_concurrency, device=device,
               allowed_hosts=allowed_hosts, log=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("ref")
@click.option("--engine", default="llamacpp", show_default=True, metavar="ENGINE",
              help="llamacpp[:QUANT]: llama.cpp over the base's GGUF as shipped (or requantised), with the version's GGUF "
                   "adapter; vllm: a vllm serve over the base's folder, the version loaded at runtime; openai:URL: a running "
                   "OpenAI-compatible server that serves REF by name.")
@click.option("--prompts", "prompts_file", type=click.File("r", encoding="utf-8"), default=None,
              help="One prompt per line (default: a fixed set of 12 varied prompts).")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=16, show_default=True)
@json_option
@click.pass_context
def parity(ctx: click.Context, ref: str, engine: str, prompts_file, max_new_tokens: int, as_json: bool) -> None:
    """Compare REF's greedy answers in a serving engine with portfolio's reference model,
    token by token (REF: a version, or base:NAME)."""
    from portfolio.engines.parity import engine_parity

    prompts = [line.rstrip("\n").replace("\\n", "\n") for line in prompts_file if line.strip()] if prompts_file else None
    report = engine_parity(_registry(ctx), ref, engine, prompts, max_new_tokens, log=lambda *_: None)
    if as_json:
        _emit_json(report.to_dict())
        return
    click.echo(f"{ref} on {engine} over {report.base_file}: {report.identical_share:.0%} of prompts token-identical, "
               f"{report.token_share:.0%} of tokens before the first difference")
    for p in report.prompts:
        where = "identical" if p.first_difference is None else f"differs at token {p.first_difference}"
        click.echo(f"  {where:>20}  {p.prompt[:40]!r} -> {p.reference_text[:60]!r}"
                   + ("" if p.first_difference is None else f" | engine {p.engine_text[:60]!r}"))


@cli.group("deploy")
def deploy_group() -> None:
    """Keep running serving engines in step with the registry, and say what they held when."""


@deploy_group.command("vllm")
@click.argument("url")
@click.option("--router", required=True, help="The router whose rule targets (e.g. py@production) the engine serves by name.")
@click.option("--once", is_flag=True, help="Sync once and exit (default: follow every promotion, rollback, route change, archive).")
@click.option("--poll", "poll_s", type=float, default=2.0, show_default=True, help="Seconds between looks at the registry's change counter.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None,
              help="Where adapter folders are exported for vLLM to read [~/.cache/portfolio/vllm-loras].")
@click.pass_context
def deploy_vllm(ctx: click.Context, url: str, router: str, once: bool, poll_s: float, cache_dir: str | None) -> None:
    """Load into the vLLM at URL, under each name ROUTER's rules send to, the version that name
    reaches now; reload on every change (vLLM needs --enable-lora and
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). Every load is recorded: `portfolio deploy history`."""
    from pathlib import Path

    from portfolio.engines.deploy import follow_vllm, sync_vllm

    cache = cache_dir or str(Path.home() / ".cache" / "portfolio" / "vllm-loras")
    reg = _registry(ctx)
    if once:
        changes = sync_vllm(reg, url, router, cache, log=click.echo)
        click.echo(f"{url} in step with router {router} ({len(changes)} change(s))")
        return
    click.echo(f"following router {router} for {url} (Ctrl-C stops)")
    try:
        follow_vllm(reg, url, router, cache, poll_s, log=click.echo)
    except KeyboardInterrupt:
        click.echo("stopped")


@deploy_group.command("history")
@click.option("--url", default=None, help="Only this engine.")
@click.option("--name", default=None, help="Only this served name.")
@click.option("--at", "at", default=None, metavar="TIME", help="Which version answered --name on --url at this time (ISO 8601, UTC).")
@json_option
@click.pass_context
def deploy_history(ctx: click.Context, url: str | None, name: str | None, at: str | None, as_json: bool) -> None:
    """Every load and unload `portfolio deploy` made, oldest first (or, with --at, one answer)."""
    from datetime import datetime, timezone

    from portfolio.errors import InvalidState

    reg = _registry(ctx)
    if at is not None:
        if not (url and name):
            raise InvalidState("--at needs --url and --name: which engine, which served name")
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            raise InvalidState(f"--at {at!r} is not a time; write e.g. 2026-12-01T14:30:00") from None
        when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
        version = reg.deployments.at(url, name, when)
        if as_json:
            return _emit_json({"engine_url": url, "name": name, "at": when, "version": version})
        click.echo(f"{name} on {url} at {when:%Y-%m-%d %H:%M:%S} UTC: {version or 'nothing loaded'}")
        return
    events = reg.deployments.history(url, name)
    if as_json:
        return _emit_json([e.to_dict() for e in events])
    click.echo(_table([[_when(e.created_at), e.engine_url, e.name, e.action, e.version or "-"] for e in events],
                      ["WHEN (UTC)", "ENGINE", "NAME", "ACTION", "VERSION"]))
