"""Evaluation, gates and promotion: eval, matrix, history, gate, promote, revalidate, rollback."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option
from portfolio.training.config import DEVICES


# -- evaluation, gates, promotion ------------------------------------------------------

@cli.command("eval")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--data", "data", multiple=True, required=True, metavar="NAME@V", help="Snapshot whose held-out rows to score (repeatable).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
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
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
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
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
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
