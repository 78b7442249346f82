"""Evaluation, gates and promotion: eval, matrix, history, gate, promote, revalidate, rollback."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option
from portfolio.policy.gates import describe_criteria
from portfolio.training.config import DEVICES

# the loss metrics (per snapshot) and the behavioural ones (per suite); kept here as names so
# that `--help` does not import the suites package
ALL_METRICS = ["loss", "perplexity", "accuracy", "pass_rate", "critical_failures", "refusal_rate", "format_validity",
               "mean_words", "choice_accuracy", "ece", "brier"]


# -- evaluation, gates, promotion ------------------------------------------------------

@cli.command("eval")
@click.argument("refs", nargs=-1, required=True, metavar="REF...")
@click.option("--data", "data", multiple=True, metavar="NAME@V", help="Snapshot whose held-out rows to score (repeatable).")
@click.option("--suite", "suites", multiple=True, metavar="NAME@V", help="Behavioural suite to run (repeatable).")
@click.option("--engine", default=None, metavar="ENGINE",
              help="Run the suites on a serving engine instead of the reference model: llamacpp[:QUANT] (the base's GGUF as "
                   "shipped, or requantised to QUANT), vllm (a vllm serve over the base's folder, started for the run) or "
                   "openai:URL (a running OpenAI-compatible server that serves the versions by name).")
@click.option("--seq-len", type=int, default=256, show_default=True, help="Tokens per sequence.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar while generating.")
@json_option
@click.pass_context
def eval_cmd(ctx: click.Context, refs: tuple[str, ...], data: tuple[str, ...], suites: tuple[str, ...], engine: str | None,
             seq_len: int, device: str, progress: bool, as_json: bool) -> None:
    """Score versions (NAME@V) or a base (base:NAME) on held-out rows and/or behavioural suites;
    stored results for identical inputs are reused."""
    from portfolio.errors import InvalidState

    if not data and not suites:
        raise InvalidState("nothing to evaluate on; give --data NAME@V (held-out loss) and/or --suite NAME@V (behaviour)")
    if engine and not suites:
        raise InvalidState("--engine runs behavioural suites; give --suite NAME@V")
    reg, log = _registry(ctx), (lambda m: click.echo(m, err=True))
    out: dict = {}
    if data:
        from portfolio.evaluation.evaluate import evaluate

        scores = evaluate(reg, list(refs), list(data), seq_len=seq_len, device=device, log=log)
        out["loss"] = [{"model": s.model, "snapshot": s.snapshot, **s.metrics, "n_tokens": s.n_tokens, "reused": s.reused} for s in scores]
        if not as_json:
            click.echo(_table([[s.model, s.snapshot, f"{s.metrics['loss']:.4f}", f"{s.metrics['perplexity']:.2f}", f"{s.metrics['accuracy']:.3f}",
                                s.n_tokens, "stored" if s.reused else "computed"] for s in scores],
                              ["MODEL", "SNAPSHOT", "LOSS", "PPL", "ACCURACY", "TOKENS", "RESULT"]))
    if suites:
        from portfolio.cli.suites import METRIC_HEADERS, metrics_rows
        from portfolio.suites.run import run_suites

        results = run_suites(reg, list(refs), list(suites), device=device, log=log, progress=progress and not as_json, engine=engine)
        out["suites"] = [{"model": r.model, "suite": r.suite, "engine": r.engine or None, "metrics": r.metrics, "reused": r.reused}
                         for r in results]
        if not as_json:
            for r in results:
                where = f" on {r.engine}" if r.engine else ""
                click.echo(f"\n{r.model} on {r.suite}{where} ({'stored' if r.reused else 'computed'})")
                click.echo(_table(metrics_rows(r.model, r.metrics), METRIC_HEADERS))
                if r.metrics.get("skipped"):
                    skipped = r.metrics["skipped"]
                    click.echo(f"choice checks skipped on {len(skipped['choice'])} cases ({skipped['reason']}): "
                               + ", ".join(skipped["choice"][:10]) + (" …" if len(skipped["choice"]) > 10 else ""))
    if as_json:
        _emit_json(out["loss"] if not suites else out)


@cli.command()
@click.option("--adapter", "adapters", multiple=True, help="Only these adapters (repeatable).")
@click.option("--data", "data", multiple=True, metavar="NAME@V", help="Only these snapshots (repeatable).")
@click.option("--metric", type=click.Choice(ALL_METRICS), default="loss", show_default=True,
              help="A loss metric (columns are snapshots) or a suite metric (columns are suites).")
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
                    "continual": [{"adapter": s.adapter, "latest": s.latest, "acc": s.acc, "bwt": s.bwt, "fwt": s.fwt, "forgetting": s.forgetting}
                                  for s in m.continual]})
    else:
        click.echo(_table([[r] + [("" if m.get(r, c) is None else f"{m.get(r, c):.4f}") for c in m.cols] for r in m.rows], [metric.upper()] + m.cols))
        if any(m.get(r, c) is None for r in m.rows for c in m.cols) and metric in ("loss", "perplexity", "accuracy"):
            click.echo("(empty cells: not evaluated yet — gates score earlier data on the retention set; "
                       "fill a cell with `portfolio eval REF --data NAME@V`)")
        for st in m.continual:
            forgot = ", ".join(f"{k} {v:+.4f}" for k, v in st.forgetting.items()) or "-"
            bwt = "-" if st.bwt is None else f"{st.bwt:+.4f}"
            acc = "-" if st.acc is None else f"{st.acc:.4f}"
            fwt = "-" if st.fwt is None else f"{st.fwt:+.4f}"
            click.echo(f"\n{st.adapter} (latest {st.latest}): ACC {acc}; BWT {bwt}; FWT {fwt}; forgetting {forgot}")
    if plot:
        click.echo(f"wrote {plot_matrix(m, plot)}", err=as_json)


@cli.command()
@click.argument("name")
@click.option("--metric", type=click.Choice(ALL_METRICS), default="loss", show_default=True)
@click.option("--data", default=None, metavar="NAME@V", help="Only this snapshot (or suite, for a suite metric).")
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
@click.option("--confidence", type=float, default=0.95, show_default=True,
              help="Confidence level of the paired intervals: a loss gate refuses only a change whose whole interval is below its limit.")
@click.option("--retention-size", type=int, default=None, help="Rows in the bounded retention set [256].")
@click.option("--retention-seed", type=int, default=None, help="Seed of the retention set's draw [0].")
@click.option("--suite", "suites", multiple=True, metavar="NAME@V", help="Behavioural suite the candidate must pass (repeatable).")
@click.option("--min-pass", type=float, default=None, help="Minimum pass rate over each suite (0..1).")
@click.option("--slice-min-pass", "slice_min_pass", multiple=True, metavar="LABEL=VALUE:RATE", help="Minimum pass rate of a slice, e.g. risk=high:1.0 (repeatable).")
@click.option("--allow-critical-failures", is_flag=True, help="Do not require every critical case to pass.")
@click.option("--max-refusal-increase", type=float, default=None, help="Largest allowed rise of the refusal rate vs the incumbent (0..1).")
@click.option("--max-verbosity-change", type=float, default=None, help="Largest allowed relative change of mean answer words, e.g. 0.5.")
@click.option("--max-pass-regression", type=float, default=None, help="Largest allowed drop of the pass rate vs the incumbent (0..1).")
@click.option("--max-ece", type=float, default=None, help="Largest allowed expected calibration error on choice cases (0..1).")
@click.option("--parity", "parity_engine", default=None, metavar="ENGINE",
              help="Deployment parity: also run the suites on this engine (llamacpp[:QUANT], vllm or openai:URL) at promotion.")
@click.option("--max-parity-drop", type=float, default=None,
              help="Largest allowed drop of the served pass rate below the reference model's (0..1); needs --parity.")
@click.pass_context
def gate_set(ctx: click.Context, name: str, max_regression: float, min_gain: float, retention: tuple[str, ...], metric: str,
             confidence: float, retention_size: int | None, retention_seed: int | None, suites: tuple[str, ...], min_pass: float | None, slice_min_pass: tuple[str, ...], allow_critical_failures: bool,
             max_refusal_increase: float | None, max_verbosity_change: float | None, max_pass_regression: float | None,
             max_ece: float | None, parity_engine: str | None, max_parity_drop: float | None) -> None:
    """Store the gate policy of adapter NAME: loss gates, and with --suite, behavioural ones."""
    from portfolio.errors import InvalidState
    from portfolio.policy.gates import SuiteCriteria, parse_slice_min_pass

    behaviour = [min_pass, max_refusal_increase, max_verbosity_change, max_pass_regression, max_ece, parity_engine, max_parity_drop]
    if not suites and (slice_min_pass or allow_critical_failures or any(v is not None for v in behaviour)):
        raise InvalidState("behavioural criteria need the suites they apply to; add --suite NAME@V")
    criteria = None
    if suites:
        criteria = SuiteCriteria(list(suites), min_pass, parse_slice_min_pass(list(slice_min_pass)), not allow_critical_failures,
                                 max_refusal_increase, max_verbosity_change, max_pass_regression, max_ece, parity_engine,
                                 max_parity_drop).to_dict()
    g = _registry(ctx).gates.set(name, metric, max_regression, min_gain, list(retention), criteria, confidence, retention_size, retention_seed)
    where = ", ".join(g["retention"]) or f"a retention set of {g['retention_size']} earlier held-out rows (seed {g['retention_seed']})"
    click.echo(f"gate for {name}: {metric} may regress ≤ {g['max_regression']:.1%} on {where}; "
               f"must gain ≥ {g['min_gain']:.1%} on fresh data; refused only when significant at {g['confidence']:.0%}")
    if g["suite_criteria"]:
        click.echo(f"behaviour: {describe_criteria(g['suite_criteria'])}")


@gate_group.command("show")
@click.argument("name")
@json_option
@click.pass_context
def gate_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show the gate policy of adapter NAME (defaults when none is set)."""
    from portfolio.policy.gates import GatePolicy

    stored = _registry(ctx).gates.get(name)
    g = stored or GatePolicy(name).__dict__
    if as_json:
        return _emit_json({**g, "default": stored is None})
    click.echo(f"adapter         {name}{' (defaults; set with `portfolio gate set`)' if stored is None else ''}\nmetric          {g['metric']}\n"
               f"max regression  {g['max_regression']:.1%} on retention snapshots\nmin gain        {g['min_gain']:.1%} on fresh data\n"
               f"retention       {', '.join(g['retention']) or 'the retention set: ' + str(g['retention_size']) + ' held-out rows over every earlier training snapshot (seed ' + str(g['retention_seed']) + ')'}\n"
               f"confidence      {g['confidence']:.0%} (paired bootstrap intervals; a loss gate refuses only a significant breach)\n"
               f"behaviour       {describe_criteria(g['suite_criteria']) if g.get('suite_criteria') else 'none (add with gate set --suite NAME@V)'}")


def gate_table(checks, candidate: str, incumbent: str) -> str:
    """The promote table: loss gates as relative changes with their paired interval,
    behavioural gates as rates."""
    from portfolio.evaluation.promote import format_change, format_limit, format_value

    def result(c):
        verdict = "pass" if c.passed else "FAIL"
        interval_gate = c.kind in ("retention", "gain") or (c.kind == "pass_regression" and c.n is not None)
        if interval_gate and c.ci is None:
            return f"{verdict} (point estimate)"
        return verdict

    def interval(c):
        if c.ci:
            return f"[{c.ci[0]:+.1%}, {c.ci[1]:+.1%}] n={c.n}"
        return "-" if c.n is None else f"n={c.n}: too few"

    return _table([[c.kind, c.snapshot, format_value(c, c.candidate), format_value(c, c.incumbent), format_change(c), interval(c),
                    format_limit(c), result(c)]
                   for c in checks], ["GATE", "ON", candidate, incumbent, "CHANGE", "INTERVAL", "LIMIT", "RESULT"])


@cli.command()
@click.argument("ref")
@click.option("--alias", default="production", show_default=True, help="Alias to move.")
@click.option("--force", is_flag=True, help="Move the alias even if gates fail (needs --reason).")
@click.option("--reason", default=None, help="Why (kept in the alias history).")
@click.option("--full", is_flag=True, help="Check retention on every earlier snapshot's whole held-out split, not the bounded retention set.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.pass_context
def promote(ctx: click.Context, ref: str, alias: str, force: bool, reason: str | None, full: bool, device: str) -> None:
    """Move ALIAS to REF only if it passes its adapter's quality gates."""
    from portfolio.evaluation.promote import promote as run_promote

    out = run_promote(_registry(ctx), ref, alias, force=force, reason=reason, full=full, device=device,
                      log=lambda m: click.echo(m, err=True))
    click.echo(gate_table(out.checks, out.candidate, out.incumbent))
    for c in out.checks:
        if not c.passed and c.detail:
            click.echo(f"  {c.kind} {c.snapshot}: {c.detail}")
    if out.promoted:
        how = "OVERRIDE: gates failed, forced" if out.forced else "gates passed"
        click.echo(f"{out.candidate.rpartition('@')[0]}@{alias} -> {out.candidate} ({how})")
    else:
        click.echo(f"error: {out.candidate} failed {len(out.failed)} gate(s); {alias} stays at {out.incumbent} "
                   "(fix the candidate, or pass --force --reason TEXT)", err=True)
        ctx.exit(1)


@cli.command()
@click.argument("target", metavar="NAME@ALIAS")
@click.option("--data", "data", multiple=True, metavar="NAME@V", help="Fresh snapshot (repeatable).")
@click.option("--suite", "suites", multiple=True, metavar="NAME@V", help="Fresh behavioural cases (repeatable).")
@click.option("--threshold", type=float, default=0.05, show_default=True, help="Worsening that counts as drift (relative loss; absolute pass rate).")
@click.option("--metric", type=click.Choice(["loss", "perplexity", "accuracy"]), default="loss", show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.pass_context
def revalidate(ctx: click.Context, target: str, data: tuple[str, ...], suites: tuple[str, ...], threshold: float, metric: str, device: str) -> None:
    """Score a deployed version on fresh data (and fresh suite cases) against its level at
    promotion; flag drift."""
    from portfolio.evaluation.promote import revalidate as run_revalidate

    results = run_revalidate(_registry(ctx), target, list(data), suites=list(suites), threshold=threshold, metric=metric, device=device,
                             log=lambda m: click.echo(m, err=True))
    click.echo(_table([[r.version, r.snapshot, r.metric, f"{r.value:.4f}", f"{r.baseline:.4f}", f"{r.change:+.2%}", "DRIFT" if r.drifted else "ok"]
                       for r in results], ["VERSION", "FRESH DATA", "METRIC", "VALUE", "AT PROMOTION", "CHANGE", "RESULT"]))
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
@click.option("--force", is_flag=True, help="Roll back even to a version tainted by revoked data (needs --reason).")
@click.pass_context
def rollback(ctx: click.Context, name: str, alias: str, reason: str | None, force: bool) -> None:
    """Move NAME@ALIAS back to the version it pointed at before."""
    if force and not (reason and reason.strip()):
        raise click.UsageError("--force needs --reason TEXT: overrides are recorded with why")
    e = _registry(ctx).rollback(name, alias, reason, force=force)
    click.echo(f"{name}@{alias} -> {name}@{e.to_version} (rolled back from {name}@{e.from_version})")


@cli.group("retention")
def retention_group() -> None:
    """Bounded retention sets: the earlier held-out rows candidates are checked on for forgetting."""


@retention_group.command("show")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="Which version of the set [latest].")
@click.option("--rows", "show_rows", is_flag=True, help="List the row ids drawn from each snapshot.")
@json_option
@click.pass_context
def retention_show(ctx: click.Context, name: str, version: int | None, show_rows: bool, as_json: bool) -> None:
    """Show adapter NAME's retention set: its size, seed and rows per snapshot."""
    rset = _registry(ctx).retention.get(name, version)
    if as_json:
        return _emit_json(rset.to_dict() | {"ref": rset.ref, "n_rows": rset.n_rows})
    click.echo(f"{rset.ref}: {rset.n_rows} of {rset.size} rows over {len(rset.strata)} snapshots, seed {rset.seed}, "
               f"drawn {_when(rset.created_at)}")
    click.echo(_table([[ref, held, len(rset.members.get(ref, [])),
                        " ".join(map(str, rset.members.get(ref, []))) if show_rows else ""] for ref, held in rset.strata],
                      ["SNAPSHOT", "HELD OUT", "IN SET", "ROWS" if show_rows else ""]))


@retention_group.command("list")
@click.argument("name")
@json_option
@click.pass_context
def retention_list(ctx: click.Context, name: str, as_json: bool) -> None:
    """Every version of adapter NAME's retention set."""
    sets = _registry(ctx).retention.list(name)
    if as_json:
        return _emit_json([s.to_dict() | {"ref": s.ref, "n_rows": s.n_rows} for s in sets])
    click.echo(_table([[s.ref, s.n_rows, s.size, len(s.strata), s.seed, _when(s.created_at)] for s in sets],
                      ["SET", "ROWS", "SIZE", "SNAPSHOTS", "SEED", "DRAWN"]))
