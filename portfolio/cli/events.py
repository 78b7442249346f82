"""Events and webhooks: events [--follow], webhook add/list/remove/deliveries/deliver."""

from __future__ import annotations

import time

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option


@cli.command()
@click.option("--follow", is_flag=True, help="Keep printing events as they happen (Ctrl-C stops).")
@click.option("--kind", "kinds", default=None, metavar="K[,K]", help="Only these kinds (set, promote, refused, override, rollback, remove, route, drift).")
@click.option("--last", type=click.IntRange(1, 100000), default=50, show_default=True, help="How many past events to show first.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between looks with --follow.")
@json_option
@click.pass_context
def events(ctx: click.Context, follow: bool, kinds: str | None, last: int, interval: float, as_json: bool) -> None:
    """What happened: promotions, refusals, overrides, rollbacks, route changes, drift."""
    from portfolio.registry.webhooks import parse_kinds

    reg = _registry(ctx)
    wanted = set(parse_kinds(kinds)) if kinds else None
    found, cursor = reg.events.since(limit=10**9)
    shown = [e for e in found if wanted is None or e.kind in wanted][-last:]

    def emit(items) -> None:
        for e in items:
            if as_json:
                click.echo(__import__("json").dumps(e.to_dict(), default=str))
            else:
                click.echo(f"{_when(e.at)}  {e.kind:<9} {e.summary}" + (f"  — {e.reason}" if e.reason else ""))

    if as_json and not follow:
        return _emit_json([e.to_dict() for e in shown])
    emit(shown)
    while follow:
        time.sleep(interval)
        found, cursor = reg.events.since(cursor)
        emit([e for e in found if wanted is None or e.kind in wanted])


@cli.group("webhook")
def webhook_group() -> None:
    """URLs that receive events as signed JSON (HMAC-SHA256), retried with back-off."""


@webhook_group.command("add")
@click.argument("url")
@click.option("--on", "kinds", default="promote,override,rollback,refused,route,drift,revoke,purge", show_default=True,
              help="Event kinds to send, comma-separated, or all.")
@click.option("--secret", default=None, help="Signing secret [generated and printed once].")
@click.option("--past", is_flag=True, help="Also send the events recorded before now.")
@click.option("--allow-link-local", is_flag=True, help="Allow delivery to link-local and cloud metadata addresses (169.254.0.0/16, fe80::/10).")
@click.pass_context
def webhook_add(ctx: click.Context, url: str, kinds: str, secret: str | None, past: bool, allow_link_local: bool) -> None:
    """Send events of these kinds to URL (redirects are never followed)."""
    hook, key = _registry(ctx).webhooks.add(url, [kinds], secret, past, allow_link_local=allow_link_local)
    click.echo(f"webhook {hook.id}: {hook.url} on {', '.join(hook.kinds)}")
    if not secret:
        click.echo(f"signing secret (shown once; verify X-Portfolio-Signature = sha256=HMAC-SHA256(secret, body)): {key}")


@webhook_group.command("list")
@json_option
@click.pass_context
def webhook_list(ctx: click.Context, as_json: bool) -> None:
    """Every webhook with its delivery counts."""
    hooks = _registry(ctx).webhooks.list()
    if as_json:
        return _emit_json([h.to_dict() for h in hooks])
    click.echo(_table([[h.id, h.url, ",".join(h.kinds), "active" if h.active else "removed", h.pending, h.delivered, h.failed]
                       for h in hooks], ["ID", "URL", "ON", "STATE", "PENDING", "DELIVERED", "FAILED"]))


@webhook_group.command("remove")
@click.argument("webhook_id", type=int)
@click.pass_context
def webhook_remove(ctx: click.Context, webhook_id: int) -> None:
    """Stop sending to a webhook (its deliveries stay on record)."""
    hook = _registry(ctx).webhooks.remove(webhook_id)
    click.echo(f"webhook {hook.id} removed ({hook.url})")


@webhook_group.command("deliveries")
@click.argument("webhook_id", type=int, required=False)
@json_option
@click.pass_context
def webhook_deliveries(ctx: click.Context, webhook_id: int | None, as_json: bool) -> None:
    """The newest deliveries, with attempts and errors."""
    items = _registry(ctx).webhooks.deliveries(webhook_id)
    if as_json:
        return _emit_json([d.to_dict() for d in items])
    click.echo(_table([[d.id, d.webhook_id, d.event_id, d.kind, d.status, d.attempts, d.response_code or "-", d.last_error or "",
                        _when(d.delivered_at)] for d in items],
                      ["ID", "WEBHOOK", "EVENT", "KIND", "STATUS", "ATTEMPTS", "HTTP", "ERROR", "DELIVERED"]))


@webhook_group.command("deliver")
@click.option("--once", is_flag=True, help="One pass, then exit.")
@click.option("--interval", type=float, default=5.0, show_default=True, help="Seconds between passes.")
@click.pass_context
def webhook_deliver(ctx: click.Context, once: bool, interval: float) -> None:
    """Send pending events (scheduler workers also do this between cycles)."""
    reg = _registry(ctx)
    while True:
        counts = reg.webhooks.deliver()
        if any(counts.values()):
            click.echo(", ".join(f"{v} {k}" for k, v in counts.items()), err=once is False)
        if once:
            if not any(counts.values()):
                click.echo("nothing to deliver")
            return
        time.sleep(interval)
