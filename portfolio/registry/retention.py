"""Retention sets and the per-example score cache, as session functions exposed by
`Registry` (like `quality.py`). The sampling itself is `policy.retention`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import AdapterNotFound, NotFound
from portfolio.policy import retention as sampling
from portfolio.registry import db, queries
from portfolio.registry.taint import revoked_snapshot_ids
from portfolio.registry import entities as E
from portfolio.registry.models import DatasetSnapshotRow, ExampleScoreRow, RetentionSetRow, utcnow
from portfolio.registry.namespace import Namespace

HeldOut = Callable[[str], Sequence[tuple[int, str]]]  # snapshot ref -> its held-out (row id, row sha)


class RetentionSetNotFound(NotFound):
    """No retention set matches."""


@dataclass(frozen=True)
class RetentionSet(E.Entity):
    """One version of an adapter's retention set: the exact held-out rows, per snapshot."""

    adapter: str
    version: int
    size: int
    seed: int
    strata: list[tuple[str, int]]  # (snapshot ref, its held-out rows), in the order they joined
    members: dict[str, list[int]]  # snapshot ref -> row ids drawn from it
    created_at: datetime

    @property
    def ref(self) -> str:
        """``retention:NAME@V``."""
        return f"retention:{self.adapter}@{self.version}"

    @property
    def n_rows(self) -> int:
        """Rows in the set."""
        return sum(len(r) for r in self.members.values())

    def restricted(self, snapshots: list[str]) -> dict[str, list[int]]:
        """The members drawn from ``snapshots`` only, in stratum order."""
        keep = set(snapshots)
        return {ref: rows for ref, rows in self.members.items() if ref in keep and rows}


def _labels(session: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    rows = session.execute(sa.select(DatasetSnapshotRow.id, DatasetSnapshotRow.name, DatasetSnapshotRow.version)
                           .where(DatasetSnapshotRow.id.in_(ids)))
    return {i: f"{name}@{v}" for i, name, v in rows}


def to_set(session: Session, row: RetentionSetRow, adapter: str) -> RetentionSet:
    """The entity of a stored set."""
    labels = _labels(session, {s for s, _ in row.strata})
    members: dict[str, list[int]] = {labels[s]: [] for s, _ in row.strata}
    for sid, r, _ in sorted(row.members, key=lambda m: (m[0], m[1])):
        members[labels[sid]].append(int(r))
    return RetentionSet(adapter, row.version, row.size, row.seed, [(labels[s], int(n)) for s, n in row.strata], members,
                        E.as_utc(row.created_at))


def _latest(session: Session, adapter_id: int) -> RetentionSetRow | None:
    return session.scalar(sa.select(RetentionSetRow).where(RetentionSetRow.adapter_id == adapter_id)
                          .order_by(RetentionSetRow.version.desc()).limit(1))


def ensure_set(session: Session, adapter: str, strata: list[str], size: int, seed: int, heldout: HeldOut) -> RetentionSet:
    """The adapter's latest retention set if it covers ``strata`` with this size and seed;
    otherwise the next version: the latest extended by the missing strata (reservoir-style,
    reading only their rows), or drawn afresh over all strata when the size or seed changed."""
    a = queries.adapter_row(session, adapter)
    db.lock_name(session, "retention", adapter)
    snaps = queries.snapshot_rows_many(session, list(dict.fromkeys(strata)))
    latest = _latest(session, a.id)
    # a revoked snapshot leaves the set: its share goes back to the others by a fresh draw
    revoked = revoked_snapshot_ids(session)
    snaps = [s for s in snaps if s.id not in revoked]
    known = [int(s) for s, _ in latest.strata if int(s) not in revoked] if latest else []
    same = latest is not None and latest.size == size and latest.seed == seed and len(known) == len(latest.strata)
    missing = [s for s in snaps if s.id not in known]
    if same and not missing:
        return to_set(session, latest, adapter)
    ref_of = {s.id: f"{s.name}@{s.version}" for s in snaps} | _labels(session, set(known) - {s.id for s in snaps})
    if same:
        old = [sampling.Member(int(s), int(r), p) for s, r, p in latest.members]
        counts = {int(s): int(n) for s, n in latest.strata}
        new = {s.id: list(heldout(ref_of[s.id])) for s in missing}
        chosen = sampling.extend(old, known, counts, new, size, seed, lambda sid: heldout(ref_of[sid]))
        order = [[s, counts[s]] for s in known] + [[sid, len(rows)] for sid, rows in new.items()]
    else:
        everything = {sid: list(heldout(ref_of[sid])) for sid in known + [s.id for s in missing]}
        chosen = sampling.draw(everything, size, seed)
        order = [[sid, len(rows)] for sid, rows in everything.items()]
    row = RetentionSetRow(adapter_id=a.id, version=(latest.version + 1) if latest else 1, size=size, seed=seed, strata=order,
                          members=[[m.stratum, m.row, m.priority] for m in chosen])
    session.add(row)
    session.flush()
    return to_set(session, row, adapter)


def unsaved_set(adapter: str, strata: list[str], size: int, seed: int, heldout: HeldOut) -> RetentionSet:
    """The set an adapter that does not exist yet would get over ``strata`` (not stored;
    its first gate stores the same draw as version 1)."""
    rows = {ref: list(heldout(ref)) for ref in strata}
    members: dict[str, list[int]] = {ref: [] for ref in strata}
    for m in sampling.draw(rows, size, seed):
        members[m.stratum].append(m.row)
    return RetentionSet(adapter, 0, size, seed, [(ref, len(r)) for ref, r in rows.items()],
                        {ref: sorted(r) for ref, r in members.items()}, utcnow())


def get_set(session: Session, adapter: str, version: int | None = None) -> RetentionSet:
    """Version ``version`` of an adapter's retention set (None: the latest)."""
    a = queries.adapter_row(session, adapter)
    query = sa.select(RetentionSetRow).where(RetentionSetRow.adapter_id == a.id)
    row = (session.scalar(query.where(RetentionSetRow.version == version)) if version is not None
           else _latest(session, a.id))
    if row is None:
        which = f"version {version} of its retention set" if version is not None else "retention set yet"
        raise RetentionSetNotFound(f"{adapter} has no {which}; one is drawn when a version of it is first gated "
                                   "(`portfolio promote`) or trained from a parent")
    return to_set(session, row, adapter)


def list_sets(session: Session, adapter: str) -> list[RetentionSet]:
    """Every version of an adapter's retention set, oldest first."""
    a = queries.adapter_row(session, adapter)
    rows = session.scalars(sa.select(RetentionSetRow).where(RetentionSetRow.adapter_id == a.id).order_by(RetentionSetRow.version))
    return [to_set(session, r, adapter) for r in rows]


CHUNK = 500  # bound on the IN list of one lookup


def example_scores(session: Session, model_key: str, shas: list[str]) -> dict[str, list[float]]:
    """Stored ``[loss sum, correct, tokens]`` of a model on each example that has them."""
    out: dict[str, list[float]] = {}
    unique = list(dict.fromkeys(shas))
    for i in range(0, len(unique), CHUNK):
        for sha, loss, correct, tokens in session.execute(
            sa.select(ExampleScoreRow.example_sha, ExampleScoreRow.loss_sum, ExampleScoreRow.correct, ExampleScoreRow.tokens)
            .where(ExampleScoreRow.model_key == model_key, ExampleScoreRow.example_sha.in_(unique[i:i + CHUNK]))
        ):
            out[sha] = [loss, correct, tokens]
    return out


def record_example_scores(session: Session, model_key: str, scores: dict[str, list[float]]) -> None:
    """Store a model's scores per example (an example already stored keeps its first scores)."""
    items = [{"model_key": model_key, "example_sha": sha, "loss_sum": float(s[0]), "correct": int(s[1]), "tokens": int(s[2])}
             for sha, s in scores.items()]
    for i in range(0, len(items), CHUNK):
        db.insert_many_ignore(session, ExampleScoreRow.__table__, items[i:i + CHUNK])


class Retention(Namespace):
    """`Registry`'s retention-set and score-cache methods (behind `portfolio retention ...`)."""

    def build(self, adapter: str, strata: list[str], size: int | None = None, seed: int | None = None) -> RetentionSet:
        """The adapter's retention set covering the snapshots ``strata``: the latest one, or
        the next version extended by the strata it lacks (`policy.retention`). Size and
        seed default to the adapter's gate policy."""
        from portfolio.data.splits import split_rows
        from portfolio.policy.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE

        try:
            gate = self._registry.gates.get(adapter) or {}
            exists = True
        except AdapterNotFound:
            gate, exists = {}, False
        size = size if size is not None else gate.get("retention_size", DEFAULT_RETENTION_SIZE)
        seed = seed if seed is not None else gate.get("retention_seed", DEFAULT_RETENTION_SEED)

        def heldout(ref: str) -> list[tuple[int, str]]:
            return [(r["row"], r["sha"]) for r in split_rows(self._registry.data.rows(ref))[1]]

        if not exists:  # a new adapter's first version: the same draw its first gate will store
            return unsaved_set(adapter, [self._registry.data.get(s).ref for s in dict.fromkeys(strata)], size, seed, heldout)
        with self._write() as (session, _put):
            return ensure_set(session, adapter, strata, size, seed, heldout)

    def get(self, adapter: str, version: int | None = None) -> RetentionSet:
        """A stored version of an adapter's retention set (None: the latest)."""
        with self._read() as session:
            return get_set(session, adapter, version)

    def list(self, adapter: str) -> list[RetentionSet]:
        """Every version of an adapter's retention set, oldest first."""
        with self._read() as session:
            return list_sets(session, adapter)

    def example_scores(self, model_key: str, shas: list[str]) -> dict[str, list[float]]:
        """Stored per-example scores of a model (see `evaluation.evaluate.model_key`)."""
        with self._read() as session:
            return example_scores(session, model_key, shas)

    def record_example_scores(self, model_key: str, scores: dict[str, list[float]]) -> None:
        """Store per-example scores of a model, so no evaluation computes them again."""
        with self._write() as (session, _put):
            record_example_scores(session, model_key, scores)
