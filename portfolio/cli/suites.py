"""Behavioural suites: suite add/list/show/results, and diff between two versions."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option
from portfolio.training.config import DEVICES


def _fmt(value, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if pct else f"{value:.1f}"


def metrics_rows(label: str, metrics: dict) -> list[list[str]]:
    """Table rows of one run's metrics: overall, then each slice."""
    groups = [("overall", metrics["overall"])] + list(metrics["slices"].items())
    return [[label, name, m["n"], _fmt(m["pass_rate"]), m["critical_failures"], _fmt(m["refusal_rate"]), _fmt(m["format_validity"]),
             _fmt(m["mean_words"], pct=False), _fmt(m["choice_accuracy"]), "-" if m["ece"] is None else f"{m['ece']:.3f}",
             "-" if m["brier"] is None else f"{m['brier']:.3f}"] for name, m in groups]


METRIC_HEADERS = ["MODEL", "SLICE", "N", "PASS", "CRIT FAIL", "REFUSAL", "FORMAT", "WORDS", "CHOICE ACC", "ECE", "BRIER"]


def _short(text: str | None, width: int = 70) -> str:
    if text is None:
        return "(not generated)"
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@cli.group("suite")
def suite_group() -> None:
    """Behavioural suites: versioned release criteria on what an adapter says."""


@suite_group.command("add")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--description", default=None, help="What the suite guards.")
@json_option
@click.pass_context
def suite_add(ctx: click.Context, name: str, file: str, description: str | None, as_json: bool) -> None:
    """Store FILE (JSONL cases) as the next immutable snapshot of suite NAME."""
    suite, created = _registry(ctx).suites.add(name, file, description)
    if as_json:
        return _emit_json({**suite.to_dict(), "created": created})
    state = "added" if created else "unchanged: already"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(suite.kinds.items()))
    click.echo(f"{state} {suite.ref}: {suite.n_cases} cases ({kinds}); slices {', '.join(suite.slices) or '-'}; sha256 {suite.sha256}")


@suite_group.command("list")
@json_option
@click.pass_context
def suite_list(ctx: click.Context, as_json: bool) -> None:
    """Every suite snapshot."""
    suites = _registry(ctx).suites.list()
    if as_json:
        return _emit_json([s.to_dict() for s in suites])
    click.echo(_table([[s.ref, s.n_cases, ", ".join(s.slices) or "-", s.sha256[:12], _when(s.created_at), s.description or ""] for s in suites],
                      ["SUITE", "CASES", "SLICES", "SHA256", "CREATED", "DESCRIPTION"]))


@suite_group.command("show")
@click.argument("ref", metavar="NAME@V")
@json_option
@click.pass_context
def suite_show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """A suite's cases and the stored results of every model that ran it."""
    reg = _registry(ctx)
    suite, parsed, results = reg.suites.get(ref), reg.suites.cases(ref), reg.suites.results(ref)
    if as_json:
        return _emit_json({**suite.to_dict(), "cases": [c.__dict__ for c in parsed.cases],
                           "results": [{"model": r.model, "engine": r.engine or None, "metrics": r.metrics, "created_at": r.created_at}
                                       for r in results]})
    click.echo(f"{suite.ref}  {suite.n_cases} cases  sha256 {suite.sha256}\n{suite.description or ''}".rstrip())
    click.echo(_table([[c.id, ",".join(f"{k}={v}" for k, v in c.slice.items()) or "-", "yes" if c.critical else "",
                        " ".join(ch["kind"] for ch in c.checks), _short(c.prompt or c.messages[-1]["content"], 50)] for c in parsed.cases],
                      ["CASE", "SLICE", "CRITICAL", "CHECKS", "PROMPT"]))
    if results:
        click.echo("")
        click.echo(_table([row for r in results for row in metrics_rows(_served_label(r), {"overall": r.metrics["overall"], "slices": {}})],
                          METRIC_HEADERS))


@suite_group.command("results")
@click.argument("ref")
@click.option("--suite", "suite", required=True, metavar="NAME@V", help="The suite.")
@click.option("--failed", is_flag=True, help="Only the cases that failed.")
@click.option("--slice", "slice_", default=None, metavar="LABEL=VALUE", help="Only one slice, e.g. risk=high.")
@click.option("--engine", default=None, metavar="ENGINE", help="The run on a serving engine: llamacpp[:QUANT], vllm or openai:URL.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@json_option
@click.pass_context
def suite_results(ctx: click.Context, ref: str, suite: str, failed: bool, slice_: str | None, engine: str | None, device: str,
                  as_json: bool) -> None:
    """REF's outputs and verdicts on a suite (run now if no stored result matches)."""
    from portfolio.suites.report import answer_text, case_results

    score, cases = case_results(_registry(ctx), ref, suite, failed=failed, slice_=slice_, device=device,
                                log=lambda m: click.echo(m, err=True), engine=engine)
    if as_json:
        return _emit_json({"model": score.model, "suite": score.suite, "engine": score.engine or None, "metrics": score.metrics,
                           "cases": cases})
    if score.engine:
        click.echo(f"{score.model} on {score.suite}, served by {score.engine}")
    click.echo(_table(metrics_rows(score.model, score.metrics), METRIC_HEADERS))
    for c in cases:
        verdicts = " ".join(f"{v['kind']}:{'ok' if v['passed'] else 'FAIL'}" + (f"({v['note']})" if v["note"] and not v["passed"] else "")
                            for v in c["checks"])
        labels = ",".join(f"{k}={v}" for k, v in c["slice"].items())
        click.echo(f"\n[{'pass' if c['passed'] else 'FAIL'}] {c['id']}{' (critical)' if c['critical'] else ''}{'  ' + labels if labels else ''}\n"
                   f"  {verdicts}\n  output: {_short(answer_text(c), 200)}")
    click.echo(f"\n{len(cases)} case(s) shown")


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--suite", "suite", required=True, metavar="NAME@V", help="The suite to compare on.")
@click.option("--engine", default=None, metavar="ENGINE",
              help="Run B on a serving engine (llamacpp[:QUANT], vllm or openai:URL) and A on the reference model; `diff X X --engine llamacpp` "
                   "shows what serving X there changes.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@json_option
@click.pass_context
def diff_cmd(ctx: click.Context, a: str, b: str, suite: str, engine: str | None, device: str, as_json: bool) -> None:
    """Cases where A and B differ in verdict or output on a suite: what changed in behaviour."""
    from portfolio.suites.report import diff

    sa, sb, changes = diff(_registry(ctx), a, b, suite, device=device, log=lambda m: click.echo(m, err=True), engine=engine)
    if engine:
        sb = type(sb)(f"{sb.model} on {sb.engine}", sb.suite, sb.metrics, sb.cases, sb.reused, sb.engine)
    if as_json:
        return _emit_json({"a": sa.model, "b": sb.model, "b_engine": sb.engine or None, "suite": sa.suite, "a_metrics": sa.metrics["overall"],
                           "b_metrics": sb.metrics["overall"], "changes": [{**c.__dict__, "kind": c.kind} for c in changes]})
    click.echo(_table(metrics_rows(sa.model, {"overall": sa.overall, "slices": {}}) + metrics_rows(sb.model, {"overall": sb.overall, "slices": {}}),
                      METRIC_HEADERS))
    for c in changes:
        mark = {"broke": "BROKE", "fixed": "fixed", "changed": "changed"}[c.kind]
        click.echo(f"\n{mark:7} {c.id}{' (critical)' if c.critical else ''}  "
                   f"{sa.model}: {'pass' if c.a_passed else 'fail ' + ','.join(c.failing_checks['a'])} | "
                   f"{sb.model}: {'pass' if c.b_passed else 'fail ' + ','.join(c.failing_checks['b'])}\n"
                   f"  {sa.model:>12}: {_short(c.a_output)}\n  {sb.model:>12}: {_short(c.b_output)}")
    broke = sum(c.kind == "broke" for c in changes)
    click.echo(f"\n{len(changes)} case(s) differ: {broke} broke, {sum(c.kind == 'fixed' for c in changes)} fixed, "
               f"{sum(c.kind == 'changed' for c in changes)} changed output only")


def _served_label(result) -> str:
    """A result's model, with the engine it ran on when it is not the reference model."""
    return f"{result.model} on {result.engine}" if result.engine else result.model
