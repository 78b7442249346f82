"""Paged, filtered reads for people browsing a large portfolio (the dashboard, `/api`).

A page costs a fixed number of queries whatever the registry's size: the adapters on the page
are chosen in SQL (search, domain, status, flags, offset and limit), then their version counts,
statuses, aliases, drift, taint and last evaluation are fetched for those ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState
from portfolio.registry import entities as E
from portfolio.registry.taint import taint
from portfolio.registry.namespace import Namespace
from portfolio.registry.models import (
    AdapterRow,
    AdapterVersionRow,
    AliasRow,
    BaseModelRow,
    EvaluationRow,
    SuiteResultRow,
)

FLAGS = ("drifted", "tainted")
MAX_PAGE = 200


@dataclass(frozen=True)
class AdapterSummary(E.Entity):
    """One adapter as the overview shows it."""

    name: str
    domain: str
    base_model: str
    n_versions: int
    latest_version: int | None
    statuses: dict[str, int]
    aliases: dict[str, int]
    drifted: list[int]  # version numbers flagged by revalidation
    tainted: list[int]  # version numbers descending from revoked data
    last_evaluated_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class Page(E.Entity):
    """One page of results and where it sits in the whole."""

    items: list[Any]
    total: int
    page: int
    per_page: int
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        """How many pages there are (at least one)."""
        return max(1, -(-self.total // self.per_page))


def adapter_page(session: Session, q: str | None = None, domain: str | None = None, status: str | None = None,
                 flag: str | None = None, page: int = 1, per_page: int = 50) -> Page:
    """Adapters matching the filters (name or description containing ``q``; ``status``: has
    a version in it; ``flag``: has a drifted or tainted version), sorted by name."""
    if flag not in (None, "", *FLAGS):
        raise InvalidState(f"unknown flag {flag!r}; use one of {', '.join(FLAGS)}")
    page, per_page = max(1, int(page)), min(MAX_PAGE, max(1, int(per_page)))
    a, v = AdapterRow, AdapterVersionRow
    query = sa.select(a.id)
    if q:
        pattern = f"%{q.lower()}%"
        query = query.where(sa.or_(sa.func.lower(a.name).like(pattern), sa.func.lower(sa.func.coalesce(a.description, "")).like(pattern)))
    if domain:
        query = query.where(a.domain == domain)
    if status:
        query = query.where(sa.exists().where(v.adapter_id == a.id, v.status == status))
    tainted = taint(session)
    if flag == "drifted":
        query = query.where(sa.exists().where(v.adapter_id == a.id, v.drifted.is_(True)))
    elif flag == "tainted":
        ids = sorted(tainted)
        owners = {aid for (aid,) in session.execute(sa.select(v.adapter_id).where(v.id.in_(ids)).distinct())} if ids else set()
        query = query.where(a.id.in_(sorted(owners) or [-1]))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    ids = list(session.scalars(query.order_by(a.name).offset((page - 1) * per_page).limit(per_page)))
    items = summaries(session, ids, tainted) if ids else []
    return Page(items, total, page, per_page, {"q": q or "", "domain": domain or "", "status": status or "", "flag": flag or ""})


def summaries(session: Session, ids: list[int], tainted: dict[int, list[str]]) -> list[AdapterSummary]:
    """The overview rows of adapters ``ids``, in that order."""
    a, v = AdapterRow, AdapterVersionRow
    rows = {r.id: (r, base) for r, base in session.execute(
        sa.select(a, BaseModelRow.name).join(BaseModelRow, BaseModelRow.id == a.base_model_id).where(a.id.in_(ids)))}
    statuses: dict[int, dict[str, int]] = {}
    latest: dict[int, int] = {}
    for aid, status, n, top in session.execute(
        sa.select(v.adapter_id, v.status, sa.func.count(), sa.func.max(v.version)).where(v.adapter_id.in_(ids)).group_by(v.adapter_id, v.status)
    ):
        statuses.setdefault(aid, {})[status] = n
        latest[aid] = max(latest.get(aid, 0), top)
    aliases: dict[int, dict[str, int]] = {}
    for aid, name, number in session.execute(
        sa.select(AliasRow.adapter_id, AliasRow.name, v.version).join(v, v.id == AliasRow.version_id).where(AliasRow.adapter_id.in_(ids))
        .order_by(AliasRow.name)
    ):
        aliases.setdefault(aid, {})[name] = number
    drifted: dict[int, list[int]] = {}
    for aid, number in session.execute(sa.select(v.adapter_id, v.version).where(v.adapter_id.in_(ids), v.drifted.is_(True)).order_by(v.version)):
        drifted.setdefault(aid, []).append(number)
    marked: dict[int, list[int]] = {}
    if tainted:
        for aid, vid, number in session.execute(sa.select(v.adapter_id, v.id, v.version).where(v.adapter_id.in_(ids), v.id.in_(sorted(tainted)))
                                                .order_by(v.version)):
            marked.setdefault(aid, []).append(number)
    evaluated = dict(session.execute(
        sa.select(v.adapter_id, sa.func.max(EvaluationRow.created_at)).join(EvaluationRow, EvaluationRow.version_id == v.id)
        .where(v.adapter_id.in_(ids)).group_by(v.adapter_id)
    ).all())
    for aid, when in session.execute(
        sa.select(v.adapter_id, sa.func.max(SuiteResultRow.created_at)).join(SuiteResultRow, SuiteResultRow.version_id == v.id)
        .where(v.adapter_id.in_(ids)).group_by(v.adapter_id)
    ):
        if when is not None and (evaluated.get(aid) is None or E.as_utc(when) > E.as_utc(evaluated[aid])):
            evaluated[aid] = when
    out = []
    for aid in ids:
        row, base = rows[aid]
        out.append(AdapterSummary(row.name, row.domain, base, sum(statuses.get(aid, {}).values()), latest.get(aid),
                                  statuses.get(aid, {}), aliases.get(aid, {}), drifted.get(aid, []), marked.get(aid, []),
                                  E.as_utc(evaluated.get(aid)), E.as_utc(row.created_at)))
    return out


def version_page(session: Session, adapter: str, page: int = 1, per_page: int = 50) -> Page:
    """The versions of one adapter, newest first."""
    from portfolio.registry import queries

    page, per_page = max(1, int(page)), min(MAX_PAGE, max(1, int(per_page)))
    a = queries.adapter_row(session, adapter)
    v = AdapterVersionRow
    total = session.scalar(sa.select(sa.func.count()).where(v.adapter_id == a.id)) or 0
    rows = session.scalars(sa.select(v).where(v.adapter_id == a.id).order_by(v.version.desc()).offset((page - 1) * per_page).limit(per_page)).all()
    return Page(queries.to_versions(session, rows), total, page, per_page, {})


def domains(session: Session) -> list[str]:
    """Every domain an adapter belongs to."""
    return list(session.scalars(sa.select(AdapterRow.domain).distinct().order_by(AdapterRow.domain)))


class Browse(Namespace):
    """`Registry`'s paged reads (the dashboard and `/api` call these)."""

    def adapters(self, q: str | None = None, domain: str | None = None, status: str | None = None, flag: str | None = None,
                     page: int = 1, per_page: int = 50) -> Page:
        """One page of adapters with their versions' statuses, aliases, flags and last evaluation."""
        with self._read() as session:
            return adapter_page(session, q, domain, status, flag, page, per_page)

    def summary(self, adapter: str) -> AdapterSummary:
        """One adapter as the overview shows it."""
        from portfolio.registry import queries

        with self._read() as session:
            return summaries(session, [queries.adapter_row(session, adapter).id], taint(session))[0]

    def versions(self, adapter: str, page: int = 1, per_page: int = 50) -> Page:
        """One page of an adapter's versions, newest first."""
        with self._read() as session:
            return version_page(session, adapter, page, per_page)

    def domains(self) -> list[str]:
        """Every adapter domain."""
        with self._read() as session:
            return domains(session)
