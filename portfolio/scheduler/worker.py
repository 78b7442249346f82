"""The scheduler worker: a loop that queues due cycles, claims a job, runs it, repeats.

One cycle, each step one line in the job's log:
1. register the fresh files as the next snapshot of the schedule's dataset (identical bytes
   return the snapshot a crashed attempt already registered);
2. revalidate the version behind the alias on it;
3. train a new version from that version with replay (resuming the interrupted run of a
   crashed attempt from its checkpoint; reusing the version of a run that had finished);
4. promote it through the gates, or leave it a candidate with the reasons.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from portfolio.errors import NotFound, PortfolioError
from portfolio.registry.models import JobRow, ScheduleRow
from portfolio.registry.registry import Registry
from portfolio.scheduler import jobs


class WorkerRefused(PortfolioError):
    """A second worker on a SQLite registry."""


def sqlite_lock(registry: Registry):
    """On SQLite, hold an exclusive lock file beside the database for the worker's life:
    SQLite has no row locks, so only one worker may run. The OS drops the lock when the
    process dies, kill -9 included."""
    import fcntl

    database = registry.engine.url.database
    path = Path(f"{database}.scheduler.lock")
    handle = open(path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise WorkerRefused(
            f"another scheduler worker is running on the SQLite registry {database}; SQLite allows one worker — "
            "use PostgreSQL (--db postgresql+psycopg://...) to run several"
        ) from None
    return handle


class Worker:
    """Runs scheduler cycles until stopped (or, with ``once``, until nothing is due)."""

    def __init__(self, registry: Registry, name: str | None = None, *, lease_s: float = 60.0, poll_s: float = 5.0,
                 log: Callable[[str], None] = print):
        self.registry = registry
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.log = log
        self.stop_requested = False
        self._delivery: threading.Thread | None = None

    def request_stop(self, *_: Any) -> None:
        """Finish (or checkpoint) the current step, then exit."""
        if not self.stop_requested:
            self.log(f"[{self.name}] stop requested: checkpointing and exiting")
        self.stop_requested = True

    def run(self, once: bool = False) -> int:
        """The loop. Returns how many jobs this worker ran."""
        lock = sqlite_lock(self.registry) if self.registry.engine.dialect.name == "sqlite" else None
        previous = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if threading.current_thread() is threading.main_thread() else {}
        done = 0
        try:
            while not self.stop_requested:
                self.deliver_webhooks()
                for line in jobs.enqueue_due(self.registry):
                    self.log(f"[{self.name}] {line}")
                job_id = jobs.claim_job(self.registry, self.name, self.lease_s)
                if job_id is None:
                    if once:
                        break
                    time.sleep(self.poll_s)
                    continue
                self.run_job(job_id)
                done += 1
            if once:  # what this pass recorded goes out before a one-shot worker exits
                self.deliver_webhooks(wait=True)
                self.deliver_webhooks(wait=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if lock is not None:
                lock.close()
        return done

    def deliver_webhooks(self, wait: bool = False) -> None:
        """Send pending events to webhooks, on a thread of its own so that a slow or silent
        receiver never delays the next claim (one delivery pass at a time; ``wait`` joins
        it). A failing receiver never stops the worker: deliveries are retried with
        back-off and recorded."""
        if self._delivery is None or not self._delivery.is_alive():
            self._delivery = threading.Thread(target=self._deliver_once, name=f"{self.name}-webhooks", daemon=True)
            self._delivery.start()
        if wait:
            self._delivery.join()

    def _deliver_once(self) -> None:
        try:
            counts = self.registry.webhooks.deliver()
        except Exception as exc:
            self.log(f"[{self.name}] webhook delivery failed: {exc}")
            return
        if counts["delivered"] or counts["failed"]:
            self.log(f"[{self.name}] webhooks: {counts['delivered']} delivered, {counts['retrying']} retrying, {counts['failed']} failed")

    def run_job(self, job_id: int) -> None:
        """Run one claimed job under a heartbeat that keeps its lease."""
        beat_stop = threading.Event()

        def beat() -> None:
            while not beat_stop.wait(self.lease_s / 3):
                try:
                    jobs.heartbeat(self.registry, job_id, self.name, self.lease_s)
                except Exception:  # a missed beat is retried; the lease has slack
                    pass

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            summary = self.cycle(job_id)
            jobs.finish(self.registry, job_id, summary)
            self.log(f"[{self.name}] job {job_id}: {summary}")
        except (KeyboardInterrupt, Exception) as exc:
            if self.stop_requested or isinstance(exc, KeyboardInterrupt):
                # training turns the stop into an "interrupted, resume it" error: not a failure
                jobs.release(self.registry, job_id, "worker stopped; the training checkpoint is kept for the next attempt")
                self.log(f"[{self.name}] job {job_id} released for the next worker")
            else:  # every failure is recorded on the job, then retried
                state = jobs.fail(self.registry, job_id, f"{type(exc).__name__}: {exc}")
                self.log(f"[{self.name}] job {job_id} failed ({exc}); now {state}")
        finally:
            beat_stop.set()
            thread.join()

    def cycle(self, job_id: int) -> str:
        """Steps 1-4 of a cycle; returns the one-line summary."""
        from portfolio.evaluation.promote import describe_failure, promote, revalidate
        from portfolio.training.config import TrainConfig
        from portfolio.training.train import train_adapter

        reg = self.registry
        with reg.transaction() as session:
            job = session.get(JobRow, job_id)
            sched = session.get(ScheduleRow, job.schedule_id)
            files = [Path(sched.watch_dir) / f["path"] for f in job.files]
            expected = {f["path"]: f["sha256"] for f in job.files}
            s = {k: getattr(sched, k) for k in ("adapter", "base", "dataset", "domain", "watch_dir", "promote_alias")}
            settings, result = dict(sched.settings), dict(job.result)
        tune = settings.pop("tune", None)

        # score at the training sequence length, so that revalidation, training and the gates
        # share stored results instead of recomputing them
        seq_len = settings.get("seq_len") or 256

        def step(line: str, **res: Any) -> None:
            jobs.note(reg, job_id, line, **res)
            self.log(f"[{self.name}] job {job_id} {s['adapter']}: {line}")

        # 1. the fresh files, exactly as hashed when queued
        snapshot = _snapshot(reg, s, files, expected, step)

        # 2. revalidate what is deployed
        alias = s["promote_alias"]
        parent = _behind(reg, s["adapter"], alias)
        if parent:
            [r] = revalidate(reg, f"{s['adapter']}@{alias}", [snapshot.ref], seq_len=seq_len, log=lambda *_: None)
            step(f"revalidated {r.version} on {snapshot.ref}: {r.metric} {r.value:.4f} vs {r.baseline:.4f} at promotion "
                 f"({r.change:+.1%}){' DRIFT' if r.drifted else ''}", revalidation={"change": r.change, "drifted": r.drifted})

        # 3. train, resuming a crashed attempt's run when there is one
        version = None
        run_id = result.get("run_id")
        if run_id is not None:
            run = reg.runs.get(run_id)
            if run.status == "succeeded":
                version = run.metrics.get("version")
                step(f"run {run_id} of an earlier attempt already made {version}")
            else:
                if run.status == "running":  # its worker's lease expired: it is dead
                    reg.runs.update(run_id, status="interrupted", error="worker lost its lease")
                step(f"resuming run {run_id} from its checkpoint")
                version = train_adapter(reg, resume=run_id, log=lambda *_: None, progress=False,
                                        should_stop=lambda: self.stop_requested).version.ref
        if version is None and tune is not None and (result.get("tuning") or not _has_versions(reg, s["adapter"])):
            # the first cycle: choose the rank by evidence (`portfolio tune`), then promote the pick
            tuned = _tune_first(reg, s, snapshot.ref, tune, settings, alias, step)
            if tuned.pick is None:
                return f"tuned {len(tuned.candidates)} candidates: no pick ({tuned.reason})"
            version = tuned.pick
        if version is None:
            if not _has_versions(reg, s["adapter"]):
                # a schedule's --kl-weight is for the cycles that replay; its first has nothing to replay
                settings = {**settings, "kl_weight": None}
            cfg = TrainConfig(adapter=s["adapter"], data=snapshot.ref, base=s["base"], from_ref=parent, **settings)
            out = train_adapter(reg, cfg, log=lambda *_: None, progress=False, should_stop=lambda: self.stop_requested,
                                on_run=lambda rid: jobs.note(reg, job_id, f"training run {rid} started", run_id=rid))
            version = out.version.ref
        step(f"trained {version}", version=version)

        # 4. promote through the gates
        if not alias:
            return f"{version} registered as a candidate (no alias to promote)"
        if alias in reg.get_version(version).aliases:
            return f"{version} already is {s['adapter']}@{alias}"
        outcome = promote(reg, version, alias, full=bool(settings.get("full_eval")), seq_len=seq_len, log=lambda *_: None)
        if outcome.promoted:
            step(f"promoted {version} to {alias}", promoted=True)
            return f"{version} promoted to {s['adapter']}@{alias}"
        reasons = "; ".join(describe_failure(c) for c in outcome.failed)
        step(f"{version} failed its gates: {reasons}; {alias} stays at {outcome.incumbent}", promoted=False, gate_failures=reasons)
        return f"{version} kept as a candidate: gates failed ({reasons})"


def _behind(reg, adapter: str, alias: str | None) -> str | None:
    """The version ``adapter@alias`` points at, or None (no alias, or not set yet)."""
    if not alias:
        return None
    try:
        return reg.get_version(f"{adapter}@{alias}").ref
    except NotFound:
        return None


def _snapshot(reg, s: dict[str, Any], files: list[Path], expected: dict[str, str], step):
    """The job's files as a snapshot, each checked against the sha256 it was queued with."""
    from portfolio.store.digests import sha256_file

    for path in files:
        rel = path.relative_to(s["watch_dir"]).as_posix()
        if not path.is_file() or sha256_file(path) != expected[rel]:
            raise PortfolioError(f"{path} changed or vanished since it was queued; the next scan will queue its new content")
    snapshot, created = reg.data.add(s["dataset"], files, s["domain"], source=f"watch:{s['watch_dir']}")
    step(f"snapshot {snapshot.ref} ({snapshot.row_count} rows, sha256 {snapshot.sha256[:12]})"
         + ("" if created else " (already registered by an earlier attempt)"), snapshot=snapshot.ref)
    return snapshot


def _tune_first(reg, s: dict[str, Any], snapshot: str, tune: dict[str, Any], settings: dict[str, Any], alias: str | None, step):
    """A schedule's first cycle with ``--tune-ranks``: `tune_adapter` over its settings."""
    from portfolio.training.tune import tune_adapter

    step(f"tuning {s['adapter']} on {snapshot} over ranks {','.join(map(str, tune['ranks']))} ({','.join(tune['variants'])})",
         tuning=True)
    tuned = tune_adapter(reg, s["adapter"], snapshot, ranks=tune["ranks"], variants=tune["variants"],
                         budget_steps=tune.get("budget_steps") or settings.get("steps"), base=s["base"],
                         alias=alias or "production", train_settings=settings, log=lambda *_: None)
    step(f"tune run {tuned.run_id}: " + (f"picked {tuned.pick}" if tuned.pick else "no pick") + f" ({tuned.reason})",
         tune_run=tuned.run_id)
    return tuned


def _has_versions(registry, adapter: str) -> bool:
    try:
        return bool(registry.list_versions(adapter=adapter))
    except NotFound:
        return False
