"""Evaluation lookups, gate policies, revalidations and alias moves by history: reads and
writes on an open session, exposed as `Registry` methods."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.evaluation.gates import DEFAULT_CONFIDENCE
from portfolio.evaluation.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE
from portfolio.registry import entities as E
from portfolio.registry import queries
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasEventRow,
    AliasRow,
    BaseModelRow,
    DatasetSnapshotRow,
    EvaluationRow,
    GatePolicyRow,
    RevalidationRow,
    utcnow,
)


def find_evaluation(session: Session, eval_key: str) -> dict[str, Any] | None:
    """The newest stored result with this key: ``{"metrics": {...}, "n_tokens": n, "per_example": [...] | None}``."""
    rows = session.scalars(sa.select(EvaluationRow).where(EvaluationRow.eval_key == eval_key).order_by(EvaluationRow.id)).all()
    if not rows:
        return None
    metrics = {r.metric: r.value for r in rows}
    per_example = next((r.per_example for r in reversed(rows) if r.per_example is not None), None)
    return {"metrics": metrics, "n_tokens": rows[-1].n_tokens, "per_example": per_example}


def evaluation_table(session: Session, adapters: list[str] | None, snapshots: list[str] | None, metric: str) -> list[dict[str, Any]]:
    """The newest value of ``metric`` per (model, snapshot), for versions and bases, in one query
    per kind: ``{"model", "adapter", "version", "snapshot", "value", "created_at"}``."""
    snap_label = DatasetSnapshotRow.name + sa.literal("@") + sa.cast(DatasetSnapshotRow.version, sa.String)
    latest = (
        sa.select(sa.func.max(EvaluationRow.id))
        .where(EvaluationRow.metric == metric)
        .group_by(EvaluationRow.version_id, EvaluationRow.base_model_id, EvaluationRow.snapshot_id)
    )
    query = (
        sa.select(AdapterRow.name, AdapterVersionRow.version, BaseModelRow.name, snap_label, EvaluationRow.value, EvaluationRow.created_at)
        .select_from(EvaluationRow)
        .join(DatasetSnapshotRow, DatasetSnapshotRow.id == EvaluationRow.snapshot_id)
        .outerjoin(AdapterVersionRow, AdapterVersionRow.id == EvaluationRow.version_id)
        .outerjoin(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
        .outerjoin(BaseModelRow, BaseModelRow.id == EvaluationRow.base_model_id)
        .where(EvaluationRow.id.in_(latest))
    )
    out = []
    for adapter, version, base, snapshot, value, created in session.execute(query):
        if adapters and adapter is not None and adapter not in adapters:
            continue
        if snapshots and snapshot not in snapshots:
            continue
        model = f"{adapter}@{version}" if adapter else f"base:{base}"
        out.append({"model": model, "adapter": adapter, "version": version, "snapshot": snapshot, "value": value,
                    "created_at": E.as_utc(created)})
    return out


def get_gate(session: Session, adapter: str) -> dict[str, Any] | None:
    """The stored gate policy of an adapter, or None."""
    a = queries.adapter_row(session, adapter)
    row = session.scalar(sa.select(GatePolicyRow).where(GatePolicyRow.adapter_id == a.id))
    if row is None:
        return None
    return {"adapter": adapter, "metric": row.metric, "max_regression": row.max_regression, "min_gain": row.min_gain,
            "retention": list(row.retention), "confidence": row.confidence if row.confidence is not None else DEFAULT_CONFIDENCE,
            "suite_criteria": dict(row.suite_criteria) if row.suite_criteria else None,
            "retention_size": row.retention_size if row.retention_size is not None else DEFAULT_RETENTION_SIZE,
            "retention_seed": row.retention_seed if row.retention_seed is not None else DEFAULT_RETENTION_SEED}


def set_gate(session: Session, adapter: str, metric: str, max_regression: float, min_gain: float, retention: list[str],
             suite_criteria: dict[str, Any] | None = None, confidence: float = 0.95,
             retention_size: int = DEFAULT_RETENTION_SIZE, retention_seed: int = DEFAULT_RETENTION_SEED) -> None:
    """Create or replace an adapter's gate policy; retention snapshots must exist."""
    a = queries.adapter_row(session, adapter)
    resolved = []
    for ref in retention:
        snap = queries.snapshot_row(session, ref)
        resolved.append(f"{snap.name}@{snap.version}")
    if suite_criteria:
        from portfolio.registry.suites import suite_row

        rows = [suite_row(session, ref) for ref in suite_criteria["suites"]]
        suite_criteria = {**suite_criteria, "suites": [f"{r.name}@{r.version}" for r in rows]}
        known = {label for r in rows for label in r.slices}
        unknown = [label for label in suite_criteria.get("slice_min_pass", {}) if label not in known]
        if unknown:
            raise InvalidState(f"--slice-min-pass {unknown[0]}: no case of {', '.join(suite_criteria['suites'])} has that slice "
                               f"(slices: {', '.join(sorted(known)) or 'none'})")
    row = session.scalar(sa.select(GatePolicyRow).where(GatePolicyRow.adapter_id == a.id))
    if row is None:
        row = GatePolicyRow(adapter_id=a.id)
        session.add(row)
    row.metric, row.max_regression, row.min_gain, row.retention, row.updated_at = metric, max_regression, min_gain, resolved, utcnow()
    row.suite_criteria = suite_criteria or None
    row.confidence = confidence
    row.retention_size, row.retention_seed = retention_size, retention_seed
    session.flush()


def record_refusal(session: Session, adapter: str, alias: str, candidate_ref: str, reason: str) -> None:
    """Append a refused promotion to the alias history (the alias does not move)."""
    candidate = queries.version_row(session, candidate_ref)
    current = session.scalar(sa.select(AliasRow.version_id).where(AliasRow.adapter_id == candidate.adapter_id, AliasRow.name == alias))
    session.add(AliasEventRow(adapter_id=candidate.adapter_id, alias=alias, from_version_id=current, to_version_id=candidate.id,
                              action="refused", reason=reason))
    session.flush()


def rollback_target(session: Session, adapter: str, alias: str) -> int:
    """The version an alias pointed at before its current one, replaying its history as a
    stack (a set pushes, a rollback pops), so repeated rollbacks walk further back."""
    a = queries.adapter_row(session, adapter)
    stack: list[int] = []
    for action, to_version in session.execute(
        sa.select(AliasEventRow.action, AliasEventRow.to_version_id)
        .where(AliasEventRow.adapter_id == a.id, AliasEventRow.alias == alias)
        .order_by(AliasEventRow.id)
    ):
        if action == "rollback":
            if stack:
                stack.pop()
        elif action == "remove":
            stack.clear()
        elif action != "refused" and to_version is not None:
            stack.append(to_version)
    if len(stack) < 2:
        raise InvalidState(f"{adapter}@{alias} has no earlier version to roll back to; see `portfolio alias history {adapter}`")
    return session.get(AdapterVersionRow, stack[-2]).version


def record_revalidations(session: Session, ref: str, alias: str | None, results: list[dict[str, Any]]) -> None:
    """Store revalidation results of one version (``snapshot`` or ``suite``, ``metric, baseline,
    baseline_snapshot, value, threshold, drifted`` each) and set its drifted flag to whether
    any of them drifted."""
    from portfolio.registry.suites import suite_row

    version = queries.version_row(session, ref)
    for r in results:
        snap = queries.snapshot_row(session, r["snapshot"]) if r.get("snapshot") else None
        suite = suite_row(session, r["suite"]) if r.get("suite") else None
        session.add(RevalidationRow(version_id=version.id, snapshot_id=snap.id if snap else None, suite_id=suite.id if suite else None,
                                    alias=alias, metric=r["metric"], baseline=r["baseline"],
                                    baseline_snapshot=r["baseline_snapshot"], value=r["value"], threshold=r["threshold"], drifted=r["drifted"]))
    version.drifted = any(r["drifted"] for r in results)
    session.flush()
