"""Scheduled retraining: schedule, scheduler run, jobs."""

from __future__ import annotations

import click

from portfolio.cli._base import _emit_json, _registry, _table, _when, cli, json_option
from portfolio.training.config import DEFAULT_KL_WEIGHT, DEFAULT_REPLAY_RATIO


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
@click.option("--replay-ratio", type=float, default=DEFAULT_REPLAY_RATIO, show_default=True)
@click.option("--kl-weight", type=float, default=None, help=f"[{DEFAULT_KL_WEIGHT:g} when replaying]")
@click.option("--train-steps", type=int, default=None, help="Steps per training (default: one epoch).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--promote-alias", default=None, metavar="ALIAS", help="Move this alias when the gates pass.")
@click.option("--full-eval", is_flag=True, help="Score every earlier drop in full each cycle, not the bounded retention set.")
@click.option("--tune-ranks", default=None, metavar="R,R,...",
              help="On the first cycle (no version yet), run `portfolio tune` over these ranks and promote its pick.")
@click.option("--tune-variants", default="lora", show_default=True, help="Variants for --tune-ranks (lora, rslora, dora).")
@click.option("--tune-budget-steps", type=int, default=None, help="Steps per tuning candidate [--train-steps].")
@click.pass_context
def schedule_add(ctx: click.Context, adapter, watch, pattern, every, cron, base, dataset, domain, replay_ratio, kl_weight,
                 train_steps, batch_size, seq_len, lr, promote_alias, full_eval, tune_ranks, tune_variants, tune_budget_steps) -> None:
    """Retrain ADAPTER on new files in a watched folder, every INTERVAL or on a cron."""
    from portfolio.scheduler.schedules import add_schedule

    settings = {"replay_ratio": replay_ratio, "kl_weight": kl_weight, "steps": train_steps, "batch_size": batch_size,
                "seq_len": seq_len, "lr": lr} | ({"full_eval": True} if full_eval else {})
    tune = {"ranks": tune_ranks, "variants": tune_variants, "budget_steps": tune_budget_steps} if tune_ranks else None
    d = add_schedule(_registry(ctx), adapter, watch, every=every, cron=cron, pattern=pattern, base=base, dataset=dataset,
                     domain=domain, settings=settings, promote_alias=promote_alias, tune=tune)
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
