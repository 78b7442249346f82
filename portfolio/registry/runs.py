"""Runs (training and other jobs) and evaluation results: writes and reads on a session.

Kept apart from `registry.py` so that file stays about versions; `Registry` exposes these
as methods.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.basemodel import package_version
from portfolio.errors import InvalidState, NotFound
from portfolio.registry import entities as E
from portfolio.registry import queries
from portfolio.registry.models import AdapterRow, EvaluationRow, RunRow, utcnow
from portfolio.registry.namespace import Namespace

RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")


def environment() -> dict[str, Any]:
    """Versions of everything that changes results: Python, torch, transformers, peft."""
    return {
        "python": platform.python_version(),
        **{name: package_version(name) for name in ("torch", "transformers", "peft", "safetensors", "portfolio")},
    }


@functools.lru_cache(maxsize=1)
def code_version() -> str | None:
    """The git commit of the portfolio checkout (``+dirty`` when modified), if there is one."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def create_run(session: Session, kind: str, adapter: str | None, config: dict[str, Any], seed: int | None) -> RunRow:
    """Insert a run in state ``running`` with the environment it runs in."""
    adapter_id = queries.adapter_row(session, adapter).id if adapter and _adapter_exists(session, adapter) else None
    row = RunRow(
        adapter_id=adapter_id, kind=kind, status="running", config=config, seed=seed,
        packages=environment(), code_version=code_version(), metrics={}, heartbeat_at=utcnow(),
        host=socket.gethostname(), pid=os.getpid(),
    )
    session.add(row)
    session.flush()
    return row


def _adapter_exists(session: Session, name: str) -> bool:
    return session.scalar(sa.select(AdapterRow.id).where(AdapterRow.name == name)) is not None


def run_row(session: Session, run_id: int) -> RunRow:
    """The run with this id."""
    row = session.get(RunRow, run_id)
    if row is None:
        raise NotFound(f"no run {run_id}; see `portfolio runs`")
    return row


def to_run(session: Session, row: RunRow) -> E.Run:
    """Row -> entity."""
    names = dict(session.execute(sa.select(AdapterRow.id, AdapterRow.name).where(AdapterRow.id == row.adapter_id)).all()) if row.adapter_id else {}
    return queries.to_run(row, names)


def claim(session: Session, row: RunRow) -> None:
    """Mark a run as running in this process (a resume takes an interrupted run over)."""
    row.status = "running"
    row.host, row.pid = socket.gethostname(), os.getpid()
    row.heartbeat_at = utcnow()
    row.finished_at = None
    row.error = None


def list_runs(session: Session, adapter: str | None = None, status: str | None = None, limit: int = 100) -> list[E.Run]:
    """Runs, newest first. ``interrupted`` includes runs whose process died without saying
    so (kill -9, power loss): see `queries.effective_status`."""
    query = sa.select(RunRow).order_by(RunRow.id.desc())
    if adapter:
        # a run of a brand-new adapter has no adapter row until it registers its version
        adapter_id = session.scalar(sa.select(AdapterRow.id).where(AdapterRow.name == adapter))
        by_config = RunRow.config["adapter"].as_string() == adapter
        # no adapter row yet: by its config only (`adapter_id == None` would match every run of
        # every adapter that has not registered a version)
        query = query.where(by_config if adapter_id is None else sa.or_(RunRow.adapter_id == adapter_id, by_config))
    if status in ("running", "interrupted"):
        query = query.where(RunRow.status.in_(["running", "interrupted"]))
    elif status:
        query = query.where(RunRow.status == status)
    names = dict(session.execute(sa.select(AdapterRow.id, AdapterRow.name)).all())
    out = [queries.to_run(r, names) for r in session.scalars(query)]
    if status:
        out = [r for r in out if r.status == status]
    return out[:limit]


def add_evaluation(
    session: Session, *, version_id: int | None, base_model_id: int | None, snapshot_id: int, metric: str,
    value: float, n_tokens: int | None, row_ids: list[int] | None, run_id: int | None, eval_key: str | None = None,
    per_example: list[list[float]] | None = None,
) -> EvaluationRow:
    """Record one metric of one model (a version, or the base alone) on one snapshot;
    ``per_example`` scores go on the loss row."""
    row = EvaluationRow(
        version_id=version_id, base_model_id=base_model_id, snapshot_id=snapshot_id, metric=metric, value=float(value),
        n_tokens=n_tokens, row_ids=row_ids, run_id=run_id, code_version=code_version(), eval_key=eval_key,
        per_example=per_example if metric == "loss" else None,
    )
    session.add(row)
    session.flush()
    return row


class Runs(Namespace):
    """``reg.runs``: training and merge runs (behind `portfolio runs`)."""

    def start(self, kind: str, adapter: str | None, config: dict[str, Any], seed: int | None = None) -> E.Run:
        """Record a run as ``running``, with the package versions and git commit it runs on."""
        with self._write() as (session, _put):
            return to_run(session, create_run(session, kind, adapter, config, seed))

    def update(self, run_id: int, *, status: str | None = None, metrics: dict[str, Any] | None = None,
                   error: str | None = None, heartbeat: bool = False) -> E.Run:
        """Merge ``metrics`` into a run, and/or move it to a final ``status``."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidState(f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}")
        with self._write() as (session, _put):
            row = run_row(session, run_id)
            if metrics:
                row.metrics = {**row.metrics, **metrics}
            if error is not None:
                row.error = error
            if heartbeat or status:
                row.heartbeat_at = utcnow()
            if status is not None:
                row.status = status
                if status != "running":
                    row.finished_at = utcnow()
            session.flush()
            return to_run(session, row)

    def claim(self, run_id: int) -> E.Run:
        """Mark an interrupted or failed run as running in this process (to resume it)."""
        with self._write() as (session, _put):
            row = run_row(session, run_id)
            claim(session, row)
            session.flush()
            return to_run(session, row)

    def get(self, run_id: int) -> E.Run:
        """One run by id."""
        with self._read() as session:
            return to_run(session, run_row(session, run_id))

    def list(self, adapter: str | None = None, status: str | None = None, limit: int = 100) -> list[E.Run]:
        """Runs, newest first."""
        with self._read() as session:
            return list_runs(session, adapter, status, limit)
