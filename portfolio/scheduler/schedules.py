"""Schedules: what to watch, how often, and how to train on what arrives."""

from __future__ import annotations

import fnmatch
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from portfolio.errors import AlreadyExists, NotFound, PortfolioError
from portfolio.registry.entities import as_utc
from portfolio.registry.models import JobRow, ScheduleRow, utcnow
from portfolio.registry.refs import check_length, check_name
from portfolio.registry.registry import Registry
from portfolio.store.digests import sha256_file

EVERY_RE = re.compile(r"([0-9]+) *([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class InvalidSchedule(PortfolioError, ValueError):
    """A schedule setting is malformed."""


MAX_EVERY = 365 * 86400


def parse_every(text: str) -> int:
    """``30s``, ``15m``, ``6h``, ``1d`` -> seconds."""
    match = EVERY_RE.fullmatch(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise InvalidSchedule(f"--every {text!r}: write a positive number and a unit s, m, h or d (e.g. 6h)")
    seconds = int(match.group(1)) * UNITS[match.group(2)]
    if seconds > MAX_EVERY:
        raise InvalidSchedule(f"--every {text!r} is longer than a year; schedule at most every 365d")
    return seconds


def next_run(every_seconds: int | None, cron: str | None, after: datetime) -> datetime:
    """The next due time after ``after`` (UTC): a fixed interval, or the next cron match."""
    if cron:
        from cronsim import CronSim

        return next(CronSim(cron, after.astimezone(timezone.utc))).astimezone(timezone.utc)
    return after + timedelta(seconds=every_seconds or 0)


def scan(watch_dir: str, pattern: str) -> dict[str, str]:
    """Every file matching ``pattern`` under ``watch_dir`` (recursively): relative path -> sha256."""
    root = Path(watch_dir)
    if not root.is_dir():
        raise NotFound(f"watched folder {watch_dir} does not exist; create it or `portfolio schedule remove` the schedule")
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and fnmatch.fnmatch(path.name, pattern) and not path.name.startswith("."):
            out[rel] = sha256_file(path)
    return out


def to_dict(row: ScheduleRow) -> dict[str, Any]:
    """A schedule as plain data."""
    return {
        "adapter": row.adapter, "base": row.base, "dataset": row.dataset, "domain": row.domain, "watch": row.watch_dir,
        "pattern": row.pattern, "every_seconds": row.every_seconds, "cron": row.cron, "settings": dict(row.settings),
        "promote_alias": row.promote_alias, "paused": row.paused, "next_run_at": as_utc(row.next_run_at),
        "last_checked_at": as_utc(row.last_checked_at), "last_outcome": row.last_outcome, "files_seen": len(row.seen or {}),
    }


def add_schedule(registry: Registry, adapter: str, watch: str, *, every: str | None = None, cron: str | None = None,
                 pattern: str = "*.jsonl", base: str | None = None, dataset: str | None = None, domain: str | None = None,
                 settings: dict[str, Any] | None = None, promote_alias: str | None = None,
                 tune: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create a schedule; the first cycle is due at once. With ``tune`` (``ranks``,
    ``variants``, ``budget_steps``), a first cycle that finds no version of the adapter runs
    `tune_adapter` instead of one training, and promotes its pick."""
    check_name(adapter, "adapter name")
    if (every is None) == (cron is None):
        raise InvalidSchedule("give --every INTERVAL or --cron 'EXPR' (one of them)")
    every_seconds = parse_every(every) if every else None
    check_length(cron, 200, "--cron")
    check_length(pattern, 200, "--pattern")
    check_length(watch, 2000, "--watch")
    if cron:
        from cronsim import CronSim, CronSimError

        try:
            CronSim(cron, datetime.now(timezone.utc))
        except (CronSimError, ValueError) as exc:
            raise InvalidSchedule(f"--cron {cron!r} is not a valid cron expression ({exc}; five fields, UTC), e.g. '0 3 * * *'") from None
    if not Path(watch).is_dir():
        raise InvalidSchedule(f"--watch {watch}: no such folder; create it first")
    try:
        registry.get_version(adapter)
    except NotFound:
        if base is None:
            raise InvalidSchedule(f"adapter {adapter!r} has no version yet: name its base with --base") from None
        registry.bases.get(base)
    from portfolio.training.config import TrainConfig

    TrainConfig(adapter=adapter, data="x@1", **(settings or {}))  # validate the training settings now
    if tune is not None:
        from portfolio.training.tune import InvalidTune, parse_settings

        pairs = parse_settings(tune["ranks"], tune.get("variants") or "lora")
        if tune.get("budget_steps") is not None and tune["budget_steps"] < 1:
            raise InvalidTune(f"--tune-budget-steps must be at least 1 (got {tune['budget_steps']})")
        settings = {**(settings or {}), "tune": {"ranks": sorted({r for r, _ in pairs}),
                                                  "variants": list(dict.fromkeys(v for _, v in pairs)),
                                                  "budget_steps": tune.get("budget_steps")}}
    with registry.transaction() as session:
        if session.scalar(sa.select(ScheduleRow.id).where(ScheduleRow.adapter == adapter)) is not None:
            raise AlreadyExists(f"adapter {adapter!r} already has a schedule; `portfolio schedule remove {adapter}` first")
        row = ScheduleRow(
            adapter=adapter, base=base, dataset=check_name(dataset or adapter, "dataset name"), domain=domain or adapter,
            watch_dir=str(Path(watch).resolve()), pattern=pattern, every_seconds=every_seconds, cron=cron,
            settings=settings or {}, promote_alias=promote_alias, paused=False, next_run_at=utcnow(), seen={},
        )
        session.add(row)
        session.flush()
        return to_dict(row)


def _row(session: Any, adapter: str) -> ScheduleRow:
    row = session.scalar(sa.select(ScheduleRow).where(ScheduleRow.adapter == adapter))
    if row is None:
        raise NotFound(f"no schedule for adapter {adapter!r}; see `portfolio schedule list`")
    return row


def list_schedules(registry: Registry) -> list[dict[str, Any]]:
    """Every schedule."""
    with registry.transaction() as session:
        return [to_dict(r) for r in session.scalars(sa.select(ScheduleRow).order_by(ScheduleRow.adapter))]


def set_paused(registry: Registry, adapter: str, paused: bool) -> dict[str, Any]:
    """Pause or resume a schedule (resuming makes it due at once)."""
    with registry.transaction() as session:
        row = _row(session, adapter)
        row.paused = paused
        if not paused:
            row.next_run_at = utcnow()
        return to_dict(row)


def remove_schedule(registry: Registry, adapter: str) -> None:
    """Delete a schedule and its finished jobs; refused while a job of it is queued or running."""
    with registry.transaction() as session:
        row = _row(session, adapter)
        active = session.scalar(sa.select(sa.func.count()).where(JobRow.schedule_id == row.id, JobRow.state.in_(["queued", "running"])))
        if active:
            raise PortfolioError(f"schedule {adapter!r} has {active} queued or running job(s); pause it and let them finish first")
        session.execute(sa.delete(JobRow).where(JobRow.schedule_id == row.id))
        session.delete(row)
