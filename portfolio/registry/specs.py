"""What a caller hands `Registry.register_version`: parents, data and evaluations of the new
version, as plain frozen data (compose and training build them without importing the
registry itself)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParentSpec:
    """A parent of a version being registered."""

    ref: str
    relation: str
    recipe: dict[str, Any]


@dataclass(frozen=True)
class DataSpec:
    """A dataset snapshot used by a version being registered; ``row_ids=None`` means all."""

    ref: str
    role: str
    row_ids: list[int] | None = None


@dataclass(frozen=True)
class EvalSpec:
    """Metrics to store with a new version: of the new version itself (``model=None``), of
    another version (a ref) or of a base alone (``base:NAME``), on a snapshot's rows."""

    model: str | None
    snapshot: str
    metrics: dict[str, float]
    n_tokens: int | None = None
    row_ids: list[int] | None = None
    eval_key: str | None = None
    per_example: list[list[float]] | None = None
