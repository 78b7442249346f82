"""What running serving engines hold: every load and unload `portfolio deploy` made on a
vLLM, by name and version, append-only — so "which version answered NAME on that vLLM at
time T" has an answer, as `alias_history` gives it for the registry itself."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from portfolio.registry import entities as E
from portfolio.registry import queries
from portfolio.registry.models import AdapterRow, AdapterVersionRow
from portfolio.registry.serving_rows import EngineLoadRow
from portfolio.registry.namespace import Namespace


@dataclass(frozen=True)
class EngineLoad(E.Entity):
    """One load (or unload) of a version into an engine under a name."""

    engine_url: str
    name: str
    version: str | None
    action: str
    created_at: datetime


class Deployments(Namespace):
    """``reg.deployments``: loads into running engines (behind `portfolio deploy`)."""

    def record(self, engine_url: str, name: str, ref: str | None, action: str) -> EngineLoad:
        """Append that ``engine_url`` now serves ``ref`` as ``name`` (``load``) or no longer
        serves ``name`` (``unload``)."""
        with self._write() as (session, _put):
            version_id = queries.version_row(session, ref).id if ref else None
            row = EngineLoadRow(engine_url=engine_url, name=name, version_id=version_id, action=action)
            session.add(row)
            session.flush()
            return EngineLoad(engine_url, name, queries.model_label(session, version_id) if version_id else None, action,
                              E.as_utc(row.created_at))

    def history(self, engine_url: str | None = None, name: str | None = None) -> list[EngineLoad]:
        """Every load and unload (of one engine, one name), oldest first."""
        query = (sa.select(EngineLoadRow, AdapterRow.name, AdapterVersionRow.version)
                 .outerjoin(AdapterVersionRow, AdapterVersionRow.id == EngineLoadRow.version_id)
                 .outerjoin(AdapterRow, AdapterRow.id == AdapterVersionRow.adapter_id).order_by(EngineLoadRow.id))
        if engine_url:
            query = query.where(EngineLoadRow.engine_url == engine_url)
        if name:
            query = query.where(EngineLoadRow.name == name)
        with self._read() as session:
            return [EngineLoad(r.engine_url, r.name, f"{a}@{v}" if a else None, r.action, E.as_utc(r.created_at))
                    for r, a, v in session.execute(query)]

    def current(self, engine_url: str) -> dict[str, str]:
        """``name -> version ref`` the engine holds now, by the records."""
        out: dict[str, str] = {}
        for e in self.history(engine_url):
            if e.action == "load" and e.version:
                out[e.name] = e.version
            else:
                out.pop(e.name, None)
        return out

    def at(self, engine_url: str, name: str, when: datetime) -> str | None:
        """The version that answered ``name`` on the engine at ``when`` (None: none loaded)."""
        answered = None
        for e in self.history(engine_url, name):
            if e.created_at > when:
                break
            answered = e.version if e.action == "load" else None
        return answered
