"""Routers: route set/remove/show/list/resolve/history/rollback."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option


@cli.group("route")
def route_group() -> None:
    """Routers: which version answers a request, by tenant, task and risk."""


def _when_option(when: str | None, default: bool) -> dict[str, str]:
    from portfolio.routing import parse_when

    if bool(when) == default:
        raise click.UsageError("give exactly one of --when KEY=VALUE[,KEY=VALUE] and --default")
    return parse_when(when) if when else {}


@route_group.command("set")
@click.argument("router")
@click.option("--when", default=None, metavar="K=V[,K=V]", help="Conditions, all of which must hold: tenant, task, risk.")
@click.option("--default", "default", is_flag=True, help="The rule for requests no other rule matches.")
@click.option("--to", "to", required=True, metavar="REF", help="Version to send them to; an alias (NAME@production) follows promotions.")
@click.option("--priority", type=int, default=0, show_default=True, help="Breaks ties between equally specific rules (higher first).")
@click.option("--reason", default=None, help="Why (kept in the route history).")
@click.option("--force", is_flag=True, help="Route to a deprecated version anyway.")
@click.pass_context
def route_set(ctx: click.Context, router: str, when: str | None, default: bool, to: str, priority: int, reason: str | None,
              force: bool) -> None:
    """Add or replace the rule of ROUTER with these conditions."""
    e = _registry(ctx).routes.set(router, to, _when_option(when, default), priority, reason, force)
    click.echo(f"{router} v{e.version}: {e.rule}" + (" (forced: deprecated)" if e.forced else ""))


@route_group.command("remove")
@click.argument("router")
@click.option("--when", default=None, metavar="K=V[,K=V]", help="The conditions of the rule to remove.")
@click.option("--default", "default", is_flag=True, help="Remove the default rule.")
@click.option("--reason", default=None, help="Why (kept in the route history).")
@click.pass_context
def route_remove(ctx: click.Context, router: str, when: str | None, default: bool, reason: str | None) -> None:
    """Remove one rule of ROUTER."""
    e = _registry(ctx).routes.remove(router, _when_option(when, default), reason)
    click.echo(f"{router} v{e.version}: removed {e.rule}")


@route_group.command("show")
@click.argument("router")
@json_option
@click.pass_context
def route_show(ctx: click.Context, router: str, as_json: bool) -> None:
    """ROUTER's rules in precedence order, with the version each reaches now."""
    reg = _registry(ctx)
    rules, version = reg.routes.rules(router)

    def reaches(ref: str) -> str:
        try:
            v = reg.get_version(ref)
        except Exception as exc:  # a rule whose alias was removed since: say so, do not fail the listing
            return f"(unresolved: {exc})"
        return v.ref + ("" if v.status in ("active", "candidate") else f" [{v.status}]")

    if as_json:
        return _emit_json({"router": router, "version": version, "rules": [r.to_dict() | {"label": r.label, "reaches": reaches(r.to)}
                                                                          for r in rules]})
    click.echo(f"router {router} v{version} (most specific rule first, then priority)")
    click.echo(_table([[i, r.label, r.priority, r.to, reaches(r.to)] for i, r in enumerate(rules, 1)],
                      ["#", "WHEN", "PRIORITY", "TO", "REACHES NOW"]))


@route_group.command("list")
@json_option
@click.pass_context
def route_list(ctx: click.Context, as_json: bool) -> None:
    """Every router."""
    rows = _registry(ctx).routes.list()
    if as_json:
        return _emit_json([{"router": n, "version": v, "rules": k, "changed_at": t.isoformat()} for n, v, k, t in rows])
    click.echo(_table([[n, v, k, _when(t)] for n, v, k, t in rows], ["ROUTER", "VERSION", "RULES", "CHANGED"]))


@route_group.command("resolve")
@click.argument("router")
@click.option("--tenant", default=None)
@click.option("--task", default=None)
@click.option("--risk", default=None)
@json_option
@click.pass_context
def route_resolve(ctx: click.Context, router: str, tenant: str | None, task: str | None, risk: str | None, as_json: bool) -> None:
    """The version ROUTER sends this request to, and the rule that picked it."""
    rule, version = _registry(ctx).routes.resolve(router, tenant, task, risk)
    if as_json:
        return _emit_json({"router": router, "version": version.ref, "target": rule.to, "rule": rule.label, "priority": rule.priority})
    via = "" if rule.to == version.ref else f" (via {rule.to})"
    click.echo(f"{version.ref}{via} by rule '{rule.label}'")


@route_group.command("history")
@click.argument("router")
@json_option
@click.pass_context
def route_history(ctx: click.Context, router: str, as_json: bool) -> None:
    """Every change of ROUTER, oldest first."""
    events = _registry(ctx).routes.history(router)
    if as_json:
        return _emit_json([e.to_dict() for e in events])
    click.echo(_table([[_when(e.created_at), e.version, e.action + (" (forced)" if e.forced else ""), e.rule or "-", len(e.rules),
                        e.reason or ""] for e in events], ["WHEN", "VERSION", "ACTION", "RULE", "RULES", "REASON"]))


@route_group.command("rollback")
@click.argument("router")
@click.option("--reason", default=None, help="Why (kept in the route history).")
@click.pass_context
def route_rollback(ctx: click.Context, router: str, reason: str | None) -> None:
    """Restore ROUTER's previous rule set."""
    e = _registry(ctx).routes.rollback(router, reason)
    click.echo(f"{router} v{e.version}: rolled back to the rule set before ({len(e.rules)} rules)")


@cli.command("export-router")
@click.argument("router")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--for", "target", type=click.Choice(["vllm", "lorax"]), default="vllm", show_default=True, help="The GPU server to export for.")
@click.pass_context
def export_router(ctx: click.Context, router: str, dest: str, target: str) -> None:
    """Write every version ROUTER reaches as a PEFT folder, with what TARGET needs to load
    them under stable names, and the routing table (routes.json)."""
    from portfolio.server.export import describe, export_router as run_export

    for line in describe(run_export(_registry(ctx), router, dest, target), target):
        click.echo(line)
