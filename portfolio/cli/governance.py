"""Data governance commands: `data uses`, `data revoke`, `data purge`, `data events`."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, json_option
from portfolio.cli.registry import data_group


@data_group.command("uses")
@click.argument("ref")
@click.option("--deployed", is_flag=True, help="Only versions an alias points at.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "dot", "mermaid"]), default="table", show_default=True)
@json_option
@click.pass_context
def data_uses(ctx: click.Context, ref: str, deployed: bool, fmt: str, as_json: bool) -> None:
    """Every version downstream of snapshot REF: trained on it, replayed rows of it, or
    inheriting from one that did (finetune, merge, stack), with the aliases at each."""
    from portfolio.lineage_format import render_uses_dot, render_uses_mermaid

    uses = _registry(ctx).governance.uses(ref, deployed)
    if as_json or fmt == "json":
        return _emit_json(uses.to_dict())
    if fmt in ("dot", "mermaid"):
        return click.echo((render_uses_dot if fmt == "dot" else render_uses_mermaid)(uses), nl=False)
    state = " — PURGED (bytes deleted)" if uses.purged else " — REVOKED" if uses.revoked else ""
    which = "deployed versions" if deployed else "versions"
    click.echo(f"{uses.snapshot} (sha256 {uses.sha256[:16]}){state}: {len(uses.uses)} {which} downstream, "
               f"{sum(u.deployed for u in uses.uses)} deployed")
    if uses.uses:
        click.echo(_table([[u.version, u.status, ",".join(u.aliases + [f"route {r}" for r in u.routes]) or "-", u.depth,
                            "; ".join(f"{e['via']} {e['source']}" + (f" ({e['rows']} rows)" if e["rows"] is not None else "") for e in u.edges)]
                           for u in uses.uses], ["VERSION", "STATUS", "SERVED AS", "DEPTH", "HOW"]))


@data_group.command("revoke")
@click.argument("ref")
@click.option("--reason", required=True, help="Why it is withdrawn (kept in the record).")
@click.pass_context
def data_revoke(ctx: click.Context, ref: str, reason: str) -> None:
    """Withdraw snapshot REF: its descendants become tainted (promotion refused), and it is
    never trained on or replayed again. Recorded, never erased; `data purge` deletes its bytes."""
    event, uses = _registry(ctx).governance.revoke(ref, reason)
    deployed = [u for u in uses.uses if u.deployed]
    click.echo(f"revoked {event.snapshot} (sha256 {event.sha256[:16]}) by {event.actor}: {event.reason}")
    click.echo(f"{len(uses.uses)} version(s) now tainted" + (": " + ", ".join(u.version for u in uses.uses) if uses.uses else ""))
    for u in deployed:
        served = [u.version.split("@")[0] + "@" + a for a in u.aliases] + [f"routed by {r}" for r in u.routes]
        click.echo(f"  DEPLOYED: {u.version} is {', '.join(served)}; move it to a clean version", err=True)


@data_group.command("purge")
@click.argument("refs", nargs=-1, required=True)
@click.option("--reason", default=None, help="Why (kept in the record).")
@click.pass_context
def data_purge(ctx: click.Context, refs: tuple[str, ...], reason: str | None) -> None:
    """Delete the stored bytes and rows of revoked snapshots REFS; their sha256 and metadata
    stay, so lineage still names what was used."""
    for e in _registry(ctx).governance.purge(list(refs), reason):
        click.echo(f"purged {e.snapshot}: {len(e.detail['blobs'])} blob(s), {e.detail['bytes']:,} bytes deleted; "
                   f"sha256 {e.sha256} kept")


@data_group.command("events")
@json_option
@click.pass_context
def data_events(ctx: click.Context, as_json: bool) -> None:
    """Every revocation and purge: when, who, why."""
    events = _registry(ctx).governance.events()
    if as_json:
        return _emit_json([e.to_dict() for e in events])
    click.echo(_table([[_when(e.created_at), e.action, e.snapshot, e.actor, e.reason or "-"] for e in events],
                      ["WHEN", "ACTION", "SNAPSHOT", "BY", "REASON"]))
