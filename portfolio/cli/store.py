"""`portfolio store copy`: move a registry's artifacts to another store."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, cli, json_option


@cli.group("store")
def store_group() -> None:
    """The artifact store: a folder, or an S3-compatible bucket (s3://bucket/prefix)."""


@store_group.command("copy")
@click.option("--to", "dest", required=True, metavar="URL", help="Destination: s3://bucket/prefix or a folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@json_option
@click.pass_context
def store_copy(ctx: click.Context, dest: str, no_progress: bool, as_json: bool) -> None:
    """Copy every recorded blob and the checkpoints of unfinished runs to another store, then
    re-hash them there. Idempotent and resumable: run it again to finish an interrupted copy."""
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="blob", desc="copy", disable=no_progress or as_json, leave=False)
        bar.update(1)

    reg = _registry(ctx)
    try:
        report = reg.copy_store(dest, progress)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        return _emit_json(report.to_dict())
    click.echo(f"copied {report.copied} blob(s), {report.bytes:,} bytes, to {report.destination}; {report.skipped} already there; "
               f"{report.checkpoints} checkpoint(s) of unfinished runs")
    if report.problems:
        for p in report.problems:
            click.echo(f"NOT INTACT in {report.destination}: {p['digest']} ({p['state']})", err=True)
        raise SystemExit(1)
    click.echo(f"verified {report.verified} blob(s) there by re-hashing; switch with: export PORTFOLIO_STORE={report.destination}")
