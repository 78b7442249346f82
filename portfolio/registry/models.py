"""The registry schema as SQLAlchemy 2.0 ORM rows.

Rows never leave the registry package: queries turn them into the frozen dataclasses of
`portfolio.registry.entities`. The schema changes only through Alembic revisions in
``migrations/versions``; `tests/test_schema.py` fails when this file and the revisions drift.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import false as sa_false

# Named constraints, so that migrations can drop and alter them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (stored as UTC everywhere)."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[str] = mapped_column(String(500))
    source: Mapped[str] = mapped_column(String(1000))
    gguf_file: Mapped[Optional[str]] = mapped_column(String(500))
    architecture: Mapped[str] = mapped_column(String(200))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    files: Mapped[list[Any]] = mapped_column(JSON)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    modules: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetSnapshotRow(Base):
    __tablename__ = "dataset_snapshots"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        UniqueConstraint("name", "sha256"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    domain: Mapped[str] = mapped_column(String(200), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    format: Mapped[str] = mapped_column(String(40))
    row_count: Mapped[int] = mapped_column(Integer)
    n_bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[list[Any]] = mapped_column(JSON)
    rows_digest: Mapped[str] = mapped_column(String(64))
    source_uri: Mapped[Optional[str]] = mapped_column(String(2000))
    license: Mapped[Optional[str]] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterRow(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    domain: Mapped[str] = mapped_column(String(200), index=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    description: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapters.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(40), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[Optional[int]] = mapped_column(BigInteger)
    packages: Mapped[dict[str, Any]] = mapped_column(JSON)
    code_version: Mapped[Optional[str]] = mapped_column(String(100))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[Optional[str]] = mapped_column(Text)
    # where the run's process lives, so a run killed with kill -9 shows as interrupted
    host: Mapped[Optional[str]] = mapped_column(String(255))
    pid: Mapped[Optional[int]] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column()
    finished_at: Mapped[Optional[datetime]] = mapped_column()


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), index=True)
    status_reason: Mapped[Optional[str]] = mapped_column(Text)
    successor_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"))
    kind: Mapped[str] = mapped_column(String(20))
    artifact_digest: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    config_digest: Mapped[Optional[str]] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    target_modules: Mapped[list[Any]] = mapped_column(JSON)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    n_params: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id"))
    description: Mapped[Optional[str]] = mapped_column(Text)
    drifted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LineageEdgeRow(Base):
    """Child version -> parent version, with the relation and the recipe that joined them."""

    __tablename__ = "lineage_edges"
    __table_args__ = (UniqueConstraint("child_id", "parent_id", "relation"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    child_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    relation: Mapped[str] = mapped_column(String(20))
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON)
    position: Mapped[int] = mapped_column(Integer, default=0)


class DataEdgeRow(Base):
    """Version -> dataset snapshot, with the role and the exact row ids used."""

    __tablename__ = "data_edges"
    __table_args__ = (UniqueConstraint("version_id", "snapshot_id", "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("dataset_snapshots.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))
    row_ids: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    n_rows: Mapped[int] = mapped_column(Integer)


class EvaluationRow(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    base_model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("base_models.id"))
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("dataset_snapshots.id"), index=True)
    metric: Mapped[str] = mapped_column(String(100))
    value: Mapped[float] = mapped_column(Float)
    n_tokens: Mapped[Optional[int]] = mapped_column(BigInteger)
    row_ids: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    run_id: Mapped[Optional[int]] = mapped_column(ForeignKey("runs.id"))
    code_version: Mapped[Optional[str]] = mapped_column(String(100))
    # what was scored, hashed: model bytes, snapshot, rows, settings; equal key = reusable result
    eval_key: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    # on the loss row: [loss sum, correct, scored tokens] per example, for paired comparisons
    per_example: Mapped[Optional[list[Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GatePolicyRow(Base):
    """Per adapter: what a candidate must satisfy to take an alias."""

    __tablename__ = "gate_policies"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), unique=True)
    metric: Mapped[str] = mapped_column(String(100))
    max_regression: Mapped[float] = mapped_column(Float)
    min_gain: Mapped[float] = mapped_column(Float)
    retention: Mapped[list[Any]] = mapped_column(JSON)
    # the two-sided confidence level of the paired bootstrap intervals gates decide on
    confidence: Mapped[Optional[float]] = mapped_column(Float)
    # behavioural release criteria (suites and their thresholds), see policy/gates.py
    suite_criteria: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    # the bounded retention set (policy/retention.py): rows drawn, and the draw's seed
    retention_size: Mapped[Optional[int]] = mapped_column(Integer)
    retention_seed: Mapped[Optional[int]] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class RevalidationRow(Base):
    """A deployed version scored on fresh data against its score at promotion."""

    __tablename__ = "revalidations"

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    # fresh data is a dataset snapshot (loss) or a behavioural suite (pass rate)
    snapshot_id: Mapped[Optional[int]] = mapped_column(ForeignKey("dataset_snapshots.id"))
    suite_id: Mapped[Optional[int]] = mapped_column(ForeignKey("suites.id"))
    alias: Mapped[Optional[str]] = mapped_column(String(100))
    metric: Mapped[str] = mapped_column(String(100))
    baseline: Mapped[float] = mapped_column(Float)
    baseline_snapshot: Mapped[Optional[str]] = mapped_column(String(250))
    value: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    drifted: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"))
    name: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasEventRow(Base):
    """Append-only: every move of every alias, with the reason."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    from_version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"))
    to_version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"))
    action: Mapped[str] = mapped_column(String(20))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class VersionTagRow(Base):
    __tablename__ = "version_tags"
    __table_args__ = (UniqueConstraint("version_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    key: Mapped[str] = mapped_column(String(200), index=True)
    value: Mapped[str] = mapped_column(String(1000))


class ArtifactRow(Base):
    """Every blob the registry put in the store; lets `verify` and `gc` work from the DB."""

    __tablename__ = "artifacts"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set when `archive` or `gc` deleted the bytes; the row stays so the trail stays whole.
    removed_at: Mapped[Optional[datetime]] = mapped_column()


class ScheduleRow(Base):
    """A watched folder whose fresh files retrain an adapter on a timetable."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter: Mapped[str] = mapped_column(String(200), unique=True)
    base: Mapped[Optional[str]] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(200))
    domain: Mapped[str] = mapped_column(String(200))
    watch_dir: Mapped[str] = mapped_column(String(2000))
    pattern: Mapped[str] = mapped_column(String(200))
    every_seconds: Mapped[Optional[int]] = mapped_column(Integer)
    cron: Mapped[Optional[str]] = mapped_column(String(200))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    promote_alias: Mapped[Optional[str]] = mapped_column(String(100))
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    next_run_at: Mapped[datetime] = mapped_column(index=True)
    last_checked_at: Mapped[Optional[datetime]] = mapped_column()
    last_outcome: Mapped[Optional[str]] = mapped_column(Text)
    seen: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """One cycle of a schedule on one set of fresh files; unique per (schedule, data digest)
    so the same fresh data never trains twice."""

    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("schedule_id", "data_digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    schedule_id: Mapped[int] = mapped_column(ForeignKey("schedules.id"), index=True)
    data_digest: Mapped[str] = mapped_column(String(64))
    files: Mapped[list[Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[Optional[str]] = mapped_column(String(200))
    lease_until: Mapped[Optional[datetime]] = mapped_column()
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column()
    not_before: Mapped[datetime] = mapped_column(default=utcnow)
    error: Mapped[Optional[str]] = mapped_column(Text)
    log: Mapped[list[Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column()
    finished_at: Mapped[Optional[datetime]] = mapped_column()


class SuiteSnapshotRow(Base):
    """An immutable, content-hashed behavioural suite (its file is a blob under ``sha256``)."""

    __tablename__ = "suites"
    __table_args__ = (UniqueConstraint("name", "version"), UniqueConstraint("name", "sha256"))

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    description: Mapped[Optional[str]] = mapped_column(Text)
    n_cases: Mapped[int] = mapped_column(Integer)
    slices: Mapped[list[Any]] = mapped_column(JSON)
    kinds: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SuiteResultRow(Base):
    """One model's run of one suite: per-slice metrics and every case's output and verdicts."""

    __tablename__ = "suite_results"

    id: Mapped[int] = mapped_column(primary_key=True)
    suite_id: Mapped[int] = mapped_column(ForeignKey("suites.id"), index=True)
    version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    base_model_id: Mapped[Optional[int]] = mapped_column(ForeignKey("base_models.id"))
    eval_key: Mapped[str] = mapped_column(String(64), index=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    cases: Mapped[list[Any]] = mapped_column(JSON)
    code_version: Mapped[Optional[str]] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    engine: Mapped[str] = mapped_column(String(100), default="", server_default="")  # "" = portfolio's reference model


class RetentionSetRow(Base):
    """One version of an adapter's retention set: a fixed-size, seeded sample of held-out rows
    stratified over the snapshots its versions were trained on (`policy.retention`).
    Append-only: a new stratum, size or seed makes the next version."""

    __tablename__ = "retention_sets"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    # [[snapshot id, its held-out row count], ...] in the order they joined
    strata: Mapped[list[Any]] = mapped_column(JSON)
    # [[snapshot id, row id, priority hex], ...]: the exact rows, with the key that chose them
    members: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ExampleScoreRow(Base):
    """One model's scores on one tokenised example, keyed by both: ``model_key`` hashes the
    base weights, the adapter's serving key, the sequence length and the metric code;
    ``example_sha`` the example's tokens and labels. Equal keys, equal scores, so any
    evaluation reuses every example a model was ever scored on."""

    __tablename__ = "example_scores"

    model_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    example_sha: Mapped[str] = mapped_column(String(64), primary_key=True)
    loss_sum: Mapped[float] = mapped_column(Float)
    correct: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(Integer)


class DataEventRow(Base):
    """Append-only: a dataset snapshot revoked (withdrawn: never trained on or replayed again,
    its descendants tainted) or purged (its stored bytes and rows deleted, its sha256 and
    metadata kept). One of each at most per snapshot; never deleted (`registry.governance`)."""

    __tablename__ = "data_events"
    __table_args__ = (UniqueConstraint("snapshot_id", "action"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    snapshot_id: Mapped[int] = mapped_column(ForeignKey("dataset_snapshots.id"), index=True)
    action: Mapped[str] = mapped_column(String(20))  # revoke | purge
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[Optional[str]] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)  # purge: the blobs deleted and their sizes
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
