"""Composition and lifecycle: merge, stack, generate, archive, gc."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, cli, json_option
from portfolio.compose import MERGE_METHODS, METHODS
from portfolio.registry.lifecycle import GC_GRACE_SECONDS
from portfolio.training.config import DEVICES


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers (e.g. 0.7,0.3)", param_hint=what) from None


@cli.command()
@click.argument("name")
@click.option("--from", "refs", multiple=True, required=True, metavar="REF", help="Version to merge (repeatable, in order).")
@click.option("--method", type=click.Choice(METHODS), default="linear", show_default=True,
              help=" ".join(f"{m.name}: {m.summary}." for m in MERGE_METHODS.values()))
@click.option("--weights", default=None, metavar="W1,W2,...", help="One weight per --from [1/n for linear, svd, dare_linear, magnitude_prune; 1 otherwise]. Negative weights subtract.")
@click.option("--density", type=float, default=None, help="Share of entries kept by ties, dare_* and magnitude_prune [0.5].")
@click.option("--rank", type=int, default=None, help="Rank of the result [exact for cat/linear; the largest source rank otherwise].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drops.")
@click.option("--domain", default=None, help="Domain of a new adapter [the parents' if they share one].")
@click.option("--description", default=None, help="Free text stored with the version.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@json_option
@click.pass_context
def merge(ctx: click.Context, name, refs, method, weights, density, rank, seed, domain, description, progress, as_json) -> None:
    """Merge versions into a new candidate version of NAME, from their safetensors (the base
    model is never loaded). Lineage records a merge edge with the recipe to each parent."""
    from portfolio.compose.merge import MergeRecipe, merge_adapters

    recipe = MergeRecipe(method, _floats(weights, "--weights"), density, rank, seed)
    out = merge_adapters(_registry(ctx), name, list(refs), recipe, description=description, domain=domain,
                         progress=progress, log=lambda m: click.echo(m, err=True))
    if as_json:
        return _emit_json({"version": out.version.to_dict(), "recipe": out.recipe.to_dict(), "stats": out.stats.to_dict()})
    click.echo(f"{out.version.ref} (candidate): {method} of {', '.join(refs)}, rank {out.stats.rank}, "
               f"reconstruction error {out.stats.reconstruction_error:.2e} (worst layer {out.stats.max_layer_error:.2e})")


@cli.command()
@click.argument("name")
@click.option("--from", "refs", multiple=True, required=True, metavar="REF", help="Version to stack (repeatable).")
@click.option("--weights", default=None, metavar="W1,W2,...", help="One weight per --from [1 each].")
@click.option("--domain", default=None, help="Domain of a new adapter [the parts' if they share one].")
@click.option("--description", default=None, help="Free text stored with the version.")
@click.pass_context
def stack(ctx: click.Context, name, refs, weights, domain, description) -> None:
    """Record a version of NAME served as several adapters active at once (their updates add
    up, times their weights). `portfolio export` writes it as one adapter (exact cat merge)."""
    from portfolio.compose.stack import stack_adapters

    w = _floats(weights, "--weights")
    v = stack_adapters(_registry(ctx), name, list(refs), list(w) if w else None, description=description, domain=domain)
    click.echo(f"{v.ref} (candidate): stack of {', '.join(refs)}, total rank {v.rank}")


@cli.command()
@click.argument("ref")
@click.argument("prompt")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy; above 0 samples.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--no-chat", is_flag=True, help="Send PROMPT as raw text, not as a chat message.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@json_option
@click.pass_context
def generate(ctx: click.Context, ref, prompt, max_new_tokens, temperature, seed, no_chat, device, as_json) -> None:
    """Complete PROMPT with a version (single, merged or stacked) or base:NAME."""
    from portfolio.serving import generate as run

    out = run(_registry(ctx), ref, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              chat=not no_chat, device=device, log=lambda m: click.echo(m, err=True))
    if as_json:
        return _emit_json(out.to_dict())
    click.echo(out.text)


@cli.command()
@click.argument("ref")
@click.option("--reason", default=None, help="Why (kept with the version).")
@click.option("--force", is_flag=True, help="Archive a version that was not deprecated first.")
@json_option
@click.pass_context
def archive(ctx: click.Context, ref: str, reason: str | None, force: bool, as_json: bool) -> None:
    """Retire a version: keep every record (lineage still traces through it), delete its
    artifact bytes unless a live version shares them."""
    out = _registry(ctx).archive(ref, reason, force)
    if as_json:
        return _emit_json(out.to_dict())
    freed = sum(r["size"] for r in out.removed)
    click.echo(f"{out.version.ref} archived; removed {len(out.removed)} artifact(s), {freed:,} bytes")
    for k in out.kept:
        click.echo(f"  kept {k['kind']} {k['digest'][:12]}: still used by {k['needed_by']}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@click.option("--min-age", type=float, default=GC_GRACE_SECONDS, show_default=True,
              help="Seconds an unrecorded blob must be old before it counts as a leftover (a write may be in flight).")
@json_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, min_age: float, as_json: bool) -> None:
    """Remove bytes nothing live needs: artifacts of archived versions, blobs left by killed
    writers, stale temporary files and checkpoints of finished runs."""
    report = _registry(ctx).gc(dry_run=dry_run, min_age=min_age)
    if as_json:
        return _emit_json(report.to_dict())
    if report.items:
        click.echo(_table([[i["type"], i["digest"][:64], f"{i['size']:,}", i["reason"]] for i in report.items],
                          ["type", "what", "bytes", "why"]))
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report.items)} item(s), {report.bytes:,} bytes")
