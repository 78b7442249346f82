"""Evaluation lookups, gate policies, revalidations and alias moves by history: reads and
writes on an open session, exposed as `Registry` methods."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.policy.gates import DEFAULT_CONFIDENCE
from portfolio.policy.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE
from portfolio.registry import entities as E
from portfolio.registry import queries, runs, versions
from portfolio.registry.namespace import Namespace
from portfolio.registry.queries import model_label
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


class Evaluations(Namespace):
    """``reg.evaluations``: stored metric values and the table over them (behind `portfolio eval` and `matrix`)."""

    def record(self, model: str, snapshot: str, metrics: dict[str, float], n_tokens: int | None = None,
                          row_ids: list[int] | None = None, run_id: int | None = None, eval_key: str | None = None,
                          per_example: list[list[float]] | None = None) -> list[E.Evaluation]:
        """Store metric values of ``model`` (a version ref, or ``base:NAME``) on a snapshot, with
        its per-example scores (for paired gate decisions)."""
        with self._write() as (session, _put):
            snap = queries.snapshot_row(session, snapshot)
            version_id, base_id = versions.eval_target(session, model)
            rows = [
                runs.add_evaluation(session, version_id=version_id, base_model_id=base_id, snapshot_id=snap.id, metric=m,
                                    value=v, n_tokens=n_tokens, row_ids=row_ids, run_id=run_id, eval_key=eval_key, per_example=per_example)
                for m, v in metrics.items()
            ]
            label = model if base_id else model_label(session, version_id)
            return [queries.to_evaluation(r, label, f"{snap.name}@{snap.version}") for r in rows]

    def list(self, ref: str) -> list[E.Evaluation]:
        """Every stored evaluation of a version, oldest first."""
        with self._read() as session:
            version = queries.version_row(session, ref)
            label = model_label(session, version.id)
            return [
                queries.to_evaluation(e, label, f"{snap.name}@{snap.version}")
                for e, snap in session.execute(
                    sa.select(EvaluationRow, DatasetSnapshotRow)
                    .join(DatasetSnapshotRow, DatasetSnapshotRow.id == EvaluationRow.snapshot_id)
                    .where(EvaluationRow.version_id == version.id)
                    .order_by(EvaluationRow.id)
                )
            ]

    def find(self, eval_key: str) -> dict[str, Any] | None:
        """A stored result for exactly these inputs (see `evaluation.evaluate.eval_key`), or None."""
        with self._read() as session:
            return find_evaluation(session, eval_key)

    def table(self, adapters: list[str] | None = None, snapshots: list[str] | None = None, metric: str = "loss") -> list[dict[str, Any]]:
        """Newest stored value of ``metric`` per (model, snapshot); nothing is computed."""
        with self._read() as session:
            for name in adapters or []:
                queries.adapter_row(session, name)
            snaps = [f"{r.name}@{r.version}" for r in (queries.snapshot_row(session, s) for s in snapshots or [])]
            return evaluation_table(session, adapters, snaps or None, metric)


class Gates(Namespace):
    """``reg.gates``: gate policies, refused promotions and revalidation results (behind `portfolio gate`)."""

    def set(self, adapter: str, metric: str = "loss", max_regression: float = 0.02, min_gain: float = 0.0,
                 retention: list[str] | None = None, suite_criteria: dict[str, Any] | None = None,
                 confidence: float = 0.95, retention_size: int | None = None, retention_seed: int | None = None) -> dict[str, Any]:
        """Store an adapter's gate policy (replacing any earlier one); ``suite_criteria`` are
        the behavioural release criteria (`policy.gates.SuiteCriteria` fields);
        ``confidence`` the level of the paired intervals the loss gates decide on;
        ``retention_size``/``retention_seed`` shape its bounded retention set."""
        from portfolio.policy.gates import GatePolicy
        from portfolio.policy.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE

        size = DEFAULT_RETENTION_SIZE if retention_size is None else retention_size
        seed = DEFAULT_RETENTION_SEED if retention_seed is None else retention_seed
        GatePolicy(adapter, metric, max_regression, min_gain, list(retention or []), confidence, suite_criteria, size, seed).suites  # validates
        with self._write() as (session, _put):
            set_gate(session, adapter, metric, max_regression, min_gain, list(retention or []), suite_criteria, confidence,
                             size, seed)
            return get_gate(session, adapter)

    def get(self, adapter: str) -> dict[str, Any] | None:
        """The adapter's gate policy, or None when it has none (the defaults then apply)."""
        with self._read() as session:
            return get_gate(session, adapter)

    def record_refusal(self, adapter: str, alias: str, candidate: str, reason: str) -> None:
        """Append a refused promotion to the alias history."""
        with self._write() as (session, _put):
            record_refusal(session, adapter, alias, candidate, reason)

    def record_revalidations(self, ref: str, alias: str | None, results: list[dict[str, Any]]) -> None:
        """Store revalidation results of a version; its drifted flag becomes whether any drifted."""
        with self._write() as (session, _put):
            record_revalidations(session, ref, alias, results)
