"""The steps of `Registry.register_version`, the one door every new version goes through:
check what it is made of, find or create its adapter, then write the version's row, its
lineage and data edges, its evaluations and its run's outcome — all in the caller's one
transaction (session functions; nothing here commits)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import IncompatibleAdapter, InvalidState
from portfolio.registry import queries, runs, taint
from portfolio.registry.models import (AdapterRow, AdapterVersionRow, BaseModelRow, DataEdgeRow, DatasetSnapshotRow, LineageEdgeRow,
                                       utcnow)
from portfolio.registry.specs import DataSpec, EvalSpec, ParentSpec
from portfolio.registry.taint import DataRevoked

RELATIONS = ("finetune", "merge", "stack", "import")
ROLES = ("train", "replay", "eval")


def check_specs(parents: list[ParentSpec], data: list[DataSpec]) -> None:
    """Refuse an unknown lineage relation or data role before anything is read."""
    for p in parents:
        if p.relation not in RELATIONS:
            raise InvalidState(f"unknown lineage relation {p.relation!r}; use one of {', '.join(RELATIONS)}")
    for d in data:
        if d.role not in ROLES:
            raise InvalidState(f"unknown data role {d.role!r}; use one of {', '.join(ROLES)}")


def checked_snapshots(session: Session, data: list[DataSpec]) -> list[tuple[DatasetSnapshotRow, DataSpec]]:
    """Each data spec with its snapshot row; a revoked snapshot as train/replay data, or a
    row id outside the snapshot, is refused."""
    snapshots = [(queries.snapshot_row(session, d.ref), d) for d in data]
    withdrawn = taint.data_events(session, [s.id for s, d in snapshots if d.role in taint.WEIGHT_ROLES])
    for snap, spec in snapshots:
        if "revoke" in withdrawn.get(snap.id, {}) and spec.role in taint.WEIGHT_ROLES:
            raise DataRevoked(f"{snap.name}@{snap.version} is revoked; a new version cannot be {spec.role}ed on it "
                              "(see `portfolio data events`)")
        bad = [i for i in spec.row_ids or [] if not 0 <= i < snap.row_count]
        if bad:
            raise InvalidState(f"row ids {bad[:5]} are outside {snap.name}@{snap.version} (0..{snap.row_count - 1})")
    return snapshots


def adapter_for(session: Session, name: str, base_row: BaseModelRow, domain: str | None,
                snapshots: list[tuple[DatasetSnapshotRow, DataSpec]]) -> AdapterRow:
    """The adapter ``name``, locked, created on first use; on another base it is refused."""
    adapter = session.scalar(sa.select(AdapterRow).where(AdapterRow.name == name).with_for_update())
    if adapter is None:
        adapter = AdapterRow(name=name, domain=domain or (snapshots[0][0].domain if snapshots else name), base_model_id=base_row.id)
        session.add(adapter)
        session.flush()
    elif adapter.base_model_id != base_row.id:
        other = session.get(BaseModelRow, adapter.base_model_id)
        raise IncompatibleAdapter(f"adapter {name!r} is built on base {other.name!r}, not {base_row.name!r}; "
                                  "use another adapter name or the same base")
    return adapter


def new_version_row(session: Session, adapter: AdapterRow, lora, kind: str, composite: dict[str, Any] | None,
                    artifact: str | None, config_digest: str | None, run_id: int | None, description: str | None) -> AdapterVersionRow:
    """The next-numbered candidate version (the adapter row is locked, so numbers never clash)."""
    composite = composite or {}
    latest = session.scalar(sa.select(sa.func.max(AdapterVersionRow.version)).where(AdapterVersionRow.adapter_id == adapter.id))
    version = AdapterVersionRow(
        adapter_id=adapter.id, version=(latest or 0) + 1, status="candidate", kind=kind,
        artifact_digest=artifact, config_digest=config_digest,
        rank=lora.rank if lora else int(composite.get("rank", 0)),
        alpha=lora.alpha if lora else float(composite.get("alpha", 0)),
        target_modules=lora.target_modules if lora else list(composite.get("target_modules", [])),
        lora_config=lora.config if lora else dict(composite),
        n_params=lora.n_params if lora else int(composite.get("n_params", 0)),
        run_id=run_id, description=description,
    )
    session.add(version)
    session.flush()
    return version


def write_edges(session: Session, version: AdapterVersionRow, parents: list[tuple[AdapterVersionRow, ParentSpec]],
                snapshots: list[tuple[DatasetSnapshotRow, DataSpec]]) -> None:
    """Parent edges in their given order, and data edges with the exact row ids."""
    for position, (parent, spec) in enumerate(parents):
        session.add(LineageEdgeRow(child_id=version.id, parent_id=parent.id, relation=spec.relation, recipe=spec.recipe, position=position))
    for snap, spec in snapshots:
        session.add(DataEdgeRow(version_id=version.id, snapshot_id=snap.id, role=spec.role,
                                row_ids=sorted(spec.row_ids) if spec.row_ids is not None else None,
                                n_rows=len(spec.row_ids) if spec.row_ids is not None else snap.row_count))


def eval_target(session: Session, model: str) -> tuple[int | None, int | None]:
    """(version id, base id) of what an evaluation scores: a version ref or ``base:NAME``."""
    if model.startswith("base:"):
        return None, queries.base_row(session, model[5:]).id
    return queries.version_row(session, model).id, None


def write_evaluations(session: Session, version: AdapterVersionRow, evaluations: list[EvalSpec], run_id: int | None) -> None:
    """Metrics handed in with the version: of the version itself, or of another model."""
    for spec in evaluations:
        target_version, target_base = (version.id, None) if spec.model is None else eval_target(session, spec.model)
        snap = queries.snapshot_row(session, spec.snapshot)
        for metric, value in spec.metrics.items():
            runs.add_evaluation(session, version_id=target_version, base_model_id=target_base, snapshot_id=snap.id,
                                metric=metric, value=value, n_tokens=spec.n_tokens, row_ids=spec.row_ids, run_id=run_id,
                                eval_key=spec.eval_key, per_example=spec.per_example)


def finish_run(session: Session, run_id: int, adapter: AdapterRow, version: AdapterVersionRow, run_metrics: dict[str, Any] | None) -> None:
    """Mark the run that produced the version succeeded, in the version's own transaction."""
    run = runs.run_row(session, run_id)
    run.adapter_id = adapter.id
    run.status = "succeeded"
    run.finished_at = run.heartbeat_at = utcnow()
    run.metrics = {**run.metrics, **(run_metrics or {}), "version": f"{adapter.name}@{version.version}"}
