"""Behavioural suites in the registry: snapshots and results, as session functions exposed by
`Registry` (like `quality.py`). The suite file itself is a blob under its sha256."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import NotFound
from portfolio.registry import db, queries, versions
from portfolio.registry import entities as E
from portfolio.registry.models import AdapterRow, AdapterVersionRow, BaseModelRow, SuiteResultRow, SuiteSnapshotRow
from portfolio.registry.namespace import Namespace
from portfolio.registry.refs import check_name, parse_ref


class SuiteNotFound(NotFound):
    """No suite snapshot matches the reference."""


@dataclass(frozen=True)
class SuiteSnapshot(E.Entity):
    """An immutable, content-hashed behavioural suite."""

    name: str
    version: int
    sha256: str
    description: str | None
    n_cases: int
    slices: list[str]
    kinds: dict[str, int]
    created_at: datetime

    @property
    def ref(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class SuiteResult(E.Entity):
    """One model's stored run of one suite."""

    model: str
    suite: str
    eval_key: str
    settings: dict[str, Any]
    metrics: dict[str, Any]
    cases: list[dict[str, Any]]
    created_at: datetime
    engine: str = ""  # the serving engine that produced it ("llamacpp:Q4_1"); "" = portfolio's reference model


def to_suite(row: SuiteSnapshotRow) -> SuiteSnapshot:
    """Row -> entity."""
    return SuiteSnapshot(row.name, row.version, row.sha256, row.description, row.n_cases, list(row.slices),
                         dict(row.kinds), E.as_utc(row.created_at))


def suite_row(session: Session, text: str) -> SuiteSnapshotRow:
    """The suite ``NAME@V`` (or the latest of ``NAME``)."""
    ref = parse_ref(text)
    if isinstance(ref.selector, str):
        raise SuiteNotFound(f"suite reference {text!r} must name a version: NAME@VERSION")
    query = sa.select(SuiteSnapshotRow).where(SuiteSnapshotRow.name == ref.name)
    query = query.order_by(SuiteSnapshotRow.version.desc()).limit(1) if ref.selector is None else query.where(SuiteSnapshotRow.version == ref.selector)
    row = session.scalar(query)
    if row is None:
        raise SuiteNotFound(f"no suite {text!r}; see `portfolio suite list`, or add it with `portfolio suite add {ref.name} FILE.jsonl`")
    return row


def add_suite(session: Session, name: str, sha: str, description: str | None, n_cases: int, slices: list[str],
              kinds: dict[str, int]) -> tuple[SuiteSnapshot, bool]:
    """Record the next snapshot of suite ``name`` (or return the one with the same bytes)."""
    existing = session.scalar(sa.select(SuiteSnapshotRow).where(SuiteSnapshotRow.name == name, SuiteSnapshotRow.sha256 == sha))
    if existing is not None:
        return to_suite(existing), False
    latest = session.scalar(sa.select(sa.func.max(SuiteSnapshotRow.version)).where(SuiteSnapshotRow.name == name))
    row = SuiteSnapshotRow(name=name, version=(latest or 0) + 1, sha256=sha, description=description, n_cases=n_cases,
                           slices=slices, kinds=kinds)
    session.add(row)
    session.flush()
    return to_suite(row), True


def list_suites(session: Session, name: str | None = None) -> list[SuiteSnapshot]:
    """Every suite snapshot, by name and version."""
    query = sa.select(SuiteSnapshotRow).order_by(SuiteSnapshotRow.name, SuiteSnapshotRow.version)
    if name:
        query = query.where(SuiteSnapshotRow.name == name)
    return [to_suite(r) for r in session.scalars(query)]


def _label(session: Session, row: SuiteResultRow) -> str:
    if row.version_id is None:
        return f"base:{session.get(BaseModelRow, row.base_model_id).name}"
    name, version = session.execute(
        sa.select(AdapterRow.name, AdapterVersionRow.version).join(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id)
        .where(AdapterVersionRow.id == row.version_id)).one()
    return f"{name}@{version}"


def to_result(session: Session, row: SuiteResultRow) -> SuiteResult:
    """Row -> entity."""
    suite = session.get(SuiteSnapshotRow, row.suite_id)
    return SuiteResult(_label(session, row), f"{suite.name}@{suite.version}", row.eval_key, dict(row.settings),
                       dict(row.metrics), list(row.cases), E.as_utc(row.created_at), row.engine or "")


def find_result(session: Session, eval_key: str, model: str | None = None) -> SuiteResult | None:
    """The newest stored result with exactly these inputs, or None; with ``model``, that
    model's own where it has one (the same weights may be stored under several names)."""
    query = sa.select(SuiteResultRow).where(SuiteResultRow.eval_key == eval_key).order_by(SuiteResultRow.id.desc()).limit(1)
    row = None
    if model is not None:
        version_id, base_id = versions.eval_target(session, model)
        row = session.scalar(query.where(SuiteResultRow.version_id.is_(None) if version_id is None else SuiteResultRow.version_id == version_id,
                                         SuiteResultRow.base_model_id.is_(None) if base_id is None else SuiteResultRow.base_model_id == base_id))
    row = row if row is not None else session.scalar(query)
    return to_result(session, row) if row is not None else None


def record_result(session: Session, version_id: int | None, base_id: int | None, suite: str, eval_key: str,
                  settings: dict[str, Any], metrics: dict[str, Any], cases: list[dict[str, Any]], code_version: str | None,
                  engine: str = "") -> SuiteResult:
    """Store one model's run of one suite (on ``engine``; "" is portfolio's reference model)."""
    row = SuiteResultRow(suite_id=suite_row(session, suite).id, version_id=version_id, base_model_id=base_id, eval_key=eval_key,
                         settings=settings, metrics=metrics, cases=cases, code_version=code_version, engine=engine)
    session.add(row)
    session.flush()
    return to_result(session, row)


def latest_results(session: Session, suite: str | None = None, version_ids: list[int] | None = None,
                   engine: str | None = None) -> list[SuiteResult]:
    """The newest result per (model, suite, engine), optionally of one suite, some versions or
    one engine ("": the reference model's only)."""
    newest = sa.select(sa.func.max(SuiteResultRow.id)).group_by(SuiteResultRow.suite_id, SuiteResultRow.version_id,
                                                               SuiteResultRow.base_model_id, SuiteResultRow.engine)
    query = sa.select(SuiteResultRow).where(SuiteResultRow.id.in_(newest)).order_by(SuiteResultRow.id)
    if engine is not None:
        query = query.where(SuiteResultRow.engine == engine)
    if suite:
        query = query.where(SuiteResultRow.suite_id == suite_row(session, suite).id)
    if version_ids is not None:
        query = query.where(SuiteResultRow.version_id.in_(version_ids))
    return [to_result(session, r) for r in session.scalars(query)]


class Suites(Namespace):
    """``reg.suites``: behavioural suite snapshots and their stored results (behind `portfolio suite`)."""

    def add(self, name: str, path: str | os.PathLike, description: str | None = None) -> tuple[SuiteSnapshot, bool]:
        """Register a suite file as the next immutable snapshot of suite ``name`` after
        validating every case (nothing is stored if one line is bad). Identical bytes return
        the existing snapshot. Returns (suite, created)."""
        from portfolio.suites.cases import read_suite_file

        check_name(name, "suite name")
        data, suite = read_suite_file(path)
        kinds: dict[str, int] = {}
        for case in suite.cases:
            for check in case.checks:
                kinds[check["kind"]] = kinds.get(check["kind"], 0) + 1
        with self._write() as (session, put):
            db.lock_name(session, "suite", name)
            digest = put(data, "suite_file")  # the sha256 of the file's bytes: the suite's identity
            return add_suite(session, name, digest, description, len(suite.cases), suite.slices, kinds)

    def get(self, ref: str) -> SuiteSnapshot:
        """The suite ``NAME@V`` (``NAME`` alone: the latest)."""
        with self._read() as session:
            return to_suite(suite_row(session, ref))

    def list(self, name: str | None = None) -> list[SuiteSnapshot]:
        """Every suite snapshot (of one name)."""
        with self._read() as session:
            return list_suites(session, name)

    def cases(self, ref: str):
        """The parsed cases of a suite snapshot, read back from its checked bytes."""
        from portfolio.suites.cases import parse_suite

        suite = self.get(ref)
        return parse_suite(self.store.read_bytes(suite.sha256, f"the file of suite {suite.ref}"), suite.ref)

    def find_result(self, eval_key: str, model: str | None = None) -> SuiteResult | None:
        """A stored suite result for exactly these inputs (``model``'s own first), or None."""
        with self._read() as session:
            return find_result(session, eval_key, model)

    def record_result(self, model: str, suite: str, eval_key: str, settings: dict[str, Any], metrics: dict[str, Any],
                      cases: list[dict[str, Any]], code_version: str | None = None, engine: str = "") -> SuiteResult:
        """Store a model's (version ref or ``base:NAME``) run of a suite, on ``engine`` ("" for
        portfolio's reference model)."""
        with self._write() as (session, _put):
            version_id, base_id = versions.eval_target(session, model)
            return record_result(session, version_id, base_id, suite, eval_key, settings, metrics, cases, code_version, engine)

    def results(self, suite: str | None = None, model: str | None = None, engine: str | None = None) -> list[SuiteResult]:
        """The newest stored result per (model, suite, engine), of one suite and/or one model
        and/or one engine ("": the reference model's only; None: every engine)."""
        with self._read() as session:
            version_ids = None
            if model is not None and not model.startswith("base:"):
                version_ids = [queries.version_row(session, model).id]
            results = latest_results(session, suite, version_ids, engine)
            if model is not None and model.startswith("base:"):
                results = [r for r in results if r.model == model]
            return results
