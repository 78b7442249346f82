"""The serving change counter (`serving_rows.ServingChangeRow`): what a server polls to know that
an alias, a route or a version's status moved.

Every write session of a `Registry` carries `bump_if_serving_changed` as a ``before_flush``
hook, so no code path that moves an alias, changes a router or retires a version can forget
the bump: it is made in the writer's own transaction, once per transaction, and becomes
visible exactly when the change does. The counter's single row is locked by the bump until
commit, so bumps are ordered by commit, and a reader that saw value n has seen every change
committed before the one that made n+1.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from portfolio.registry.models import AdapterVersionRow, AliasEventRow, AliasRow
from portfolio.registry.serving_rows import RouteEventRow, RouterRow, ServingChangeRow

SERVING_ROWS = (AliasRow, AliasEventRow, RouterRow, RouteEventRow)
_BUMPED = "portfolio_serving_bumped"


def _changes_serving(session: Session) -> bool:
    for obj in list(session.new) + list(session.deleted):
        if isinstance(obj, SERVING_ROWS + (AdapterVersionRow,)):
            return True
    for obj in session.dirty:
        if isinstance(obj, SERVING_ROWS) and session.is_modified(obj):
            return True
        if isinstance(obj, AdapterVersionRow) and sa.inspect(obj).attrs.status.history.has_changes():
            return True
    return False


def bump_if_serving_changed(session: Session, _flush_context, _instances) -> None:
    """``before_flush`` hook: bump the counter once per transaction that changes serving."""
    if session.info.get(_BUMPED) or not _changes_serving(session):
        return
    session.connection().execute(sa.update(ServingChangeRow).where(ServingChangeRow.id == 1)
                                 .values(counter=ServingChangeRow.counter + 1))
    session.info[_BUMPED] = True


def _reset(session: Session, *_args) -> None:
    session.info.pop(_BUMPED, None)


def watch(factory: sessionmaker) -> None:
    """Install the hook on a session factory (the registry's write sessions)."""
    event.listen(factory, "before_flush", bump_if_serving_changed)
    event.listen(factory, "after_commit", _reset)
    event.listen(factory, "after_rollback", _reset)
    event.listen(factory, "after_soft_rollback", _reset)


def marker(session: Session) -> int:
    """The counter's current value."""
    return int(session.scalar(sa.select(ServingChangeRow.counter).where(ServingChangeRow.id == 1)) or 0)
