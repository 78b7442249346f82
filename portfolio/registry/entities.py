"""What the registry hands out: frozen dataclasses, never ORM rows.

Each has ``to_dict()`` for ``--json`` output (datetimes as ISO 8601, UTC).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any


def jsonable(value: Any) -> Any:
    """Entities, lists, dicts and datetimes (ISO 8601) as plain JSON values."""
    if isinstance(value, datetime):
        return value.isoformat()
    if dataclasses.is_dataclass(value):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC, so say so."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


class Entity:
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return jsonable(self)


@dataclass(frozen=True)
class BaseModel(Entity):
    """A frozen base model that adapters are trained on."""

    name: str
    model_id: str
    source: str
    gguf_file: str | None
    architecture: str
    weights_sha256: str
    files: list[dict[str, Any]]
    n_modules: int
    created_at: datetime


@dataclass(frozen=True)
class DatasetSnapshot(Entity):
    """An immutable, content-hashed set of rows of one domain."""

    name: str
    version: int
    domain: str
    sha256: str
    format: str
    row_count: int
    n_bytes: int
    files: list[dict[str, Any]]
    rows_digest: str
    source_uri: str | None
    license: str | None
    created_at: datetime
    # data governance (`registry.governance`): withdrawn, and whether its bytes are gone
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    purged_at: datetime | None = None

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"

    @property
    def revoked(self) -> bool:
        """Whether the snapshot was withdrawn (`portfolio data revoke`)."""
        return self.revoked_at is not None

    @property
    def purged(self) -> bool:
        """Whether its stored bytes and rows were deleted (`portfolio data purge`)."""
        return self.purged_at is not None


@dataclass(frozen=True)
class AdapterVersion(Entity):
    """One immutable version of an adapter."""

    adapter: str
    version: int
    domain: str
    base_model: str
    status: str
    kind: str
    artifact_digest: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    lora_config: dict[str, Any]
    n_params: int
    description: str | None
    created_at: datetime
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    status_reason: str | None = None
    successor: str | None = None
    run_id: int | None = None
    drifted: bool = False
    # the revoked snapshots it descends from (`registry.governance`); empty when clean
    tainted_by: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.adapter}@{self.version}"

    @property
    def tainted(self) -> bool:
        """Whether revoked data went into its weights (itself or an ancestor)."""
        return bool(self.tainted_by)


@dataclass(frozen=True)
class Adapter(Entity):
    """A named line of versions for one domain on one base model."""

    name: str
    domain: str
    base_model: str
    description: str | None
    created_at: datetime
    n_versions: int
    latest_version: int | None
    aliases: dict[str, int]


@dataclass(frozen=True)
class DataEdge(Entity):
    """A version used a snapshot's rows in a role (train, replay, eval)."""

    version: str
    snapshot: str
    role: str
    sha256: str
    domain: str
    n_rows: int
    row_ids: list[int] | None
    files: list[dict[str, Any]]
    revoked: bool = False
    purged: bool = False


@dataclass(frozen=True)
class ParentEdge(Entity):
    """A version was made from a parent version (finetune, merge, stack, import)."""

    child: str
    parent: str
    relation: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class Run(Entity):
    """A training (or other) job and everything needed to reproduce it."""

    id: int
    adapter: str | None
    kind: str
    status: str
    config: dict[str, Any]
    seed: int | None
    packages: dict[str, Any]
    code_version: str | None
    metrics: dict[str, Any]
    error: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Evaluation(Entity):
    """One metric of a version (or of the base alone) on a dataset snapshot."""

    model: str
    snapshot: str
    metric: str
    value: float
    n_tokens: int | None
    run_id: int | None
    code_version: str | None
    created_at: datetime


@dataclass(frozen=True)
class Lineage(Entity):
    """Everything upstream of a version: versions, parent edges, data edges, runs."""

    root: str
    base_model: BaseModel
    versions: list[AdapterVersion]
    parents: list[ParentEdge]
    data: list[DataEdge]
    runs: list[Run]


@dataclass(frozen=True)
class AliasEvent(Entity):
    """One move of an alias: from which version to which, when and why."""

    adapter: str
    alias: str
    action: str
    from_version: int | None
    to_version: int | None
    forced: bool
    reason: str | None
    created_at: datetime


@dataclass(frozen=True)
class VerifyReport(Entity):
    """The outcome of re-hashing every artifact."""

    checked: int
    ok: int
    problems: list[dict[str, str]]
