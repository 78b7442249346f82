"""The job queue: enqueue due cycles, claim with a lease, heartbeat, finish, retry.

On PostgreSQL any number of workers share the queue: claims lock the row with
``FOR UPDATE SKIP LOCKED``, so two workers never take the same job, and an expired lease (a
worker killed with kill -9) lets the next worker take the job over. The unique
(schedule, data digest) constraint makes a cycle idempotent: the same fresh data is never
queued, hence never trained, twice.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portfolio.errors import NotFound
from portfolio.registry.entities import as_utc
from portfolio.registry.models import JobRow, ScheduleRow, utcnow
from portfolio.registry.registry import Registry
from portfolio.scheduler.schedules import next_run, scan

STATES = ("queued", "running", "succeeded", "failed")
BACKOFF_S = 30


def data_digest(files: dict[str, str]) -> str:
    """The identity of a set of fresh files: sha256 of its ``sha256  path`` manifest."""
    return hashlib.sha256("".join(f"{sha}  {path}\n" for path, sha in sorted(files.items())).encode()).hexdigest()


def enqueue_due(registry: Registry, now: datetime | None = None) -> list[str]:
    """For every due, unpaused schedule: find new or changed files and queue one job for
    them (or record "nothing new"); move the schedule to its next due time. Returns log lines."""
    now = now or utcnow()
    lines = []
    with registry.transaction() as session:
        due = session.scalars(
            sa.select(ScheduleRow).where(ScheduleRow.paused.is_(False), ScheduleRow.next_run_at <= now)
            .order_by(ScheduleRow.next_run_at).with_for_update(skip_locked=True)
        ).all()
        for sched in due:
            try:
                files = scan(sched.watch_dir, sched.pattern)
            except NotFound as exc:
                sched.last_outcome = f"error: {exc}"
                lines.append(f"{sched.adapter}: {exc}")
                fresh = {}
            else:
                fresh = {p: sha for p, sha in files.items() if (sched.seen or {}).get(p) != sha}
                if not fresh:
                    sched.last_outcome = "nothing new"
                    lines.append(f"{sched.adapter}: nothing new in {sched.watch_dir}")
            sched.last_checked_at = now
            sched.next_run_at = next_run(sched.every_seconds, sched.cron, max(now, as_utc(sched.next_run_at)))
            if fresh:
                digest = data_digest(fresh)
                try:
                    with session.begin_nested():
                        session.add(JobRow(schedule_id=sched.id, data_digest=digest, state="queued", attempts=0,
                                           files=[{"path": p, "sha256": s} for p, s in sorted(fresh.items())],
                                           log=[f"{now:%Y-%m-%d %H:%M:%S} queued: {len(fresh)} new or changed file(s)"], result={},
                                           not_before=now))
                    sched.last_outcome = f"queued {len(fresh)} file(s)"
                    lines.append(f"{sched.adapter}: {len(fresh)} new or changed file(s) queued")
                except IntegrityError:
                    lines.append(f"{sched.adapter}: these files are already queued or done (digest {digest[:12]})")
    return lines


def claim_job(registry: Registry, worker: str, lease_s: float) -> int | None:
    """Take the oldest runnable job: queued and past its back-off, or running with an
    expired lease (its worker died). Returns its id, or None."""
    now = utcnow()
    with registry.transaction() as session:
        job = session.scalar(
            sa.select(JobRow)
            .where(sa.or_(sa.and_(JobRow.state == "queued", JobRow.not_before <= now),
                          sa.and_(JobRow.state == "running", JobRow.lease_until < now)))
            .order_by(JobRow.id).limit(1).with_for_update(skip_locked=True)
        )
        if job is None:
            return None
        if job.state == "running":
            job.log = job.log + [f"{now:%Y-%m-%d %H:%M:%S} lease of {job.worker} expired; taken over by {worker}"]
        job.state, job.worker, job.attempts = "running", worker, job.attempts + 1
        job.lease_until, job.heartbeat_at = now + timedelta(seconds=lease_s), now
        job.started_at = job.started_at or now
        job.log = job.log + [f"{now:%Y-%m-%d %H:%M:%S} attempt {job.attempts} by {worker}"]
        return job.id


def heartbeat(registry: Registry, job_id: int, worker: str, lease_s: float) -> bool:
    """Extend our lease; False when the job is no longer ours."""
    now = utcnow()
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        if job is None or job.worker != worker or job.state != "running":
            return False
        job.lease_until, job.heartbeat_at = now + timedelta(seconds=lease_s), now
        return True


def note(registry: Registry, job_id: int, line: str, **result: Any) -> None:
    """Append a line to the job's story and merge ``result``."""
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        job.log = job.log + [f"{utcnow():%Y-%m-%d %H:%M:%S} {line}"]
        if result:
            job.result = {**job.result, **result}


def finish(registry: Registry, job_id: int, summary: str) -> None:
    """Mark the job succeeded and the schedule's files seen, in one transaction."""
    now = utcnow()
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        sched = session.get(ScheduleRow, job.schedule_id)
        job.state, job.finished_at, job.lease_until, job.error = "succeeded", now, None, None
        job.log = job.log + [f"{now:%Y-%m-%d %H:%M:%S} succeeded: {summary}"]
        sched.seen = {**(sched.seen or {}), **{f["path"]: f["sha256"] for f in job.files}}
        sched.last_outcome = summary


def fail(registry: Registry, job_id: int, error: str) -> str:
    """Record a failed attempt: back to the queue after a back-off (30 s · 2^(attempt−1)),
    or failed for good after ``max_attempts``. Returns the new state."""
    now = utcnow()
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        job.error, job.lease_until = error, None
        if job.attempts >= job.max_attempts:
            job.state, job.finished_at = "failed", now
            job.log = job.log + [f"{now:%Y-%m-%d %H:%M:%S} failed for good after {job.attempts} attempts: {error}"]
        else:
            delay = BACKOFF_S * 2 ** (job.attempts - 1)
            job.state, job.not_before = "queued", now + timedelta(seconds=delay)
            job.log = job.log + [f"{now:%Y-%m-%d %H:%M:%S} attempt {job.attempts} failed ({error}); retry in {delay} s"]
        return job.state


def release(registry: Registry, job_id: int, why: str) -> None:
    """Give a job back to the queue at once (a clean stop); the attempt does not count."""
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        job.state, job.lease_until, job.attempts = "queued", None, max(0, job.attempts - 1)
        job.log = job.log + [f"{utcnow():%Y-%m-%d %H:%M:%S} released: {why}"]


def to_dict(job: JobRow, adapter: str) -> dict[str, Any]:
    """A job as plain data."""
    return {
        "id": job.id, "schedule": adapter, "state": job.state, "attempts": job.attempts, "max_attempts": job.max_attempts,
        "worker": job.worker, "lease_until": as_utc(job.lease_until), "heartbeat_at": as_utc(job.heartbeat_at),
        "files": list(job.files), "data_digest": job.data_digest, "error": job.error, "result": dict(job.result),
        "log": list(job.log), "created_at": as_utc(job.created_at), "started_at": as_utc(job.started_at),
        "finished_at": as_utc(job.finished_at),
    }


def list_jobs(registry: Registry, schedule: str | None = None, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Jobs, newest first."""
    query = sa.select(JobRow, ScheduleRow.adapter).join(ScheduleRow, ScheduleRow.id == JobRow.schedule_id).order_by(JobRow.id.desc()).limit(limit)
    if schedule:
        query = query.where(ScheduleRow.adapter == schedule)
    if state:
        query = query.where(JobRow.state == state)
    with registry.transaction() as session:
        return [to_dict(job, adapter) for job, adapter in session.execute(query)]


def get_job(registry: Registry, job_id: int) -> dict[str, Any]:
    """One job with its whole story."""
    with registry.transaction() as session:
        job = session.get(JobRow, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}; see `portfolio jobs`")
        return to_dict(job, session.get(ScheduleRow, job.schedule_id).adapter)
