"""Routers in the registry: rule sets and their append-only history, as session functions
exposed by `Registry` (like `quality.py`). The rules themselves are `portfolio.routing`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio.errors import InvalidState, NotFound
from portfolio.registry import changes, db
from portfolio.registry import entities as E
from portfolio.registry.serving_rows import RequestCountRow, RouteEventRow, RouterRow
from portfolio.registry.refs import check_name
from portfolio.registry.namespace import Namespace
from portfolio.routing import Rule


class RouterNotFound(NotFound):
    """No router by that name."""


@dataclass(frozen=True)
class RouteEvent(E.Entity):
    """One change of a router: what changed, why, and the whole rule set after it."""

    router: str
    version: int
    action: str
    rule: str | None
    rules: list[dict[str, Any]]
    forced: bool
    reason: str | None
    created_at: datetime


def router_row(session: Session, name: str) -> RouterRow:
    """The router called ``name``."""
    row = session.scalar(sa.select(RouterRow).where(RouterRow.name == name))
    if row is None:
        raise RouterNotFound(f"no router {name!r}; see `portfolio route list`, or create one with "
                             f"`portfolio route set {name} --default NAME@production`")
    return row


def _events(session: Session, router: RouterRow) -> list[RouteEventRow]:
    return list(session.scalars(sa.select(RouteEventRow).where(RouteEventRow.router_id == router.id).order_by(RouteEventRow.version)))


def to_event(row: RouteEventRow, router: str) -> RouteEvent:
    """Row -> entity."""
    return RouteEvent(router, row.version, row.action, row.rule, list(row.rules), bool(row.forced), row.reason, E.as_utc(row.created_at))


def _latest(session: Session, router: RouterRow) -> RouteEventRow | None:
    return session.scalar(sa.select(RouteEventRow).where(RouteEventRow.router_id == router.id)
                          .order_by(RouteEventRow.version.desc()).limit(1))


def current_rules(session: Session, name: str) -> tuple[list[Rule], int]:
    """(the router's rules, its version)."""
    latest = _latest(session, router_row(session, name))
    if latest is None:
        return [], 0
    return [Rule(**r) for r in latest.rules], latest.version


def record(session: Session, name: str, action: str, rule: str | None, rules: list[Rule], reason: str | None,
           forced: bool = False, create: bool = False) -> RouteEvent:
    """Append the router's next state (creating the router when ``create``)."""
    db.lock_name(session, "router", name)
    router = session.scalar(sa.select(RouterRow).where(RouterRow.name == name))
    if router is None:
        if not create:
            router_row(session, name)  # raises
        router = RouterRow(name=name)
        session.add(router)
        session.flush()
    version = (session.scalar(sa.select(sa.func.max(RouteEventRow.version)).where(RouteEventRow.router_id == router.id)) or 0) + 1
    row = RouteEventRow(router_id=router.id, version=version, action=action, rule=rule, rules=[r.to_dict() for r in rules],
                        forced=forced, reason=reason)
    session.add(row)
    session.flush()
    return to_event(row, name)


def history(session: Session, name: str) -> list[RouteEvent]:
    """Every change of a router, oldest first."""
    router = router_row(session, name)
    return [to_event(r, name) for r in _events(session, router)]


def rollback_rules(session: Session, name: str) -> list[Rule]:
    """The rule set before the current one, replaying the history as a stack (a change
    pushes, a rollback pops), so repeated rollbacks walk further back."""
    router = router_row(session, name)
    stack: list[list[dict[str, Any]]] = []
    for event in _events(session, router):
        if event.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(event.rules)
    if len(stack) < 2:
        raise InvalidState(f"router {name} has no earlier rule set to roll back to (see `portfolio route history {name}`)")
    return [Rule(**r) for r in stack[-2]]


def list_routers(session: Session) -> list[tuple[str, int, int, datetime]]:
    """(name, version, rule count, last change) of every router."""
    out = []
    for router in session.scalars(sa.select(RouterRow).order_by(RouterRow.name)):
        latest = _latest(session, router)
        out.append((router.name, latest.version if latest else 0, len(latest.rules) if latest else 0,
                    E.as_utc(latest.created_at if latest else router.created_at)))
    return out


class Routes(Namespace):
    """`Registry`'s router methods (the Python API behind `portfolio route ...`)."""

    def set(self, router: str, to: str, when: dict[str, str] | None = None, priority: int = 0,
                  reason: str | None = None, force: bool = False) -> RouteEvent:
        """Add or replace the rule of ``router`` with conditions ``when`` (none: the default
        rule) sending requests to ``to`` (a version ref; an alias follows promotions). The
        router is created on its first rule. A target that is missing or archived is refused,
        a deprecated one unless ``force``."""
        from portfolio.routing import Rule, upsert

        check_name(router, "router name")
        rule = Rule(to, dict(when or {}), priority)
        target = self._check_target(to, force)
        with self._write() as (session, _put):
            try:
                rules, _ = current_rules(session, router)
            except RouterNotFound:
                rules = []
            forced = force and (target.status == "deprecated" or target.tainted)
            return record(session, router, "set", f"{rule.label} -> {to}", upsert(rules, rule), reason, forced, create=True)

    def _check_target(self, to: str, force: bool) -> E.AdapterVersion:
        """The version ``to`` reaches, if a route may point at it."""
        version = self._registry.get_version(to)
        what = to if to == version.ref else f"{to} is {version.ref}, which"
        if version.status == "archived":
            raise InvalidState(f"{what} is archived and cannot be served; route to its successor")
        if version.tainted and not force:
            raise InvalidState(f"{what} is tainted by revoked data {', '.join(version.tainted_by)}; route to a clean version, "
                               "or pass --force --reason TEXT")
        if version.status == "deprecated" and not force:
            successor = f" (successor: {version.successor})" if version.successor else ""
            raise InvalidState(f"{what} is deprecated{successor}; pass --force to route to it anyway")
        return version

    def remove(self, router: str, when: dict[str, str] | None = None, reason: str | None = None) -> RouteEvent:
        """Remove the rule of ``router`` with conditions ``when`` (none: the default rule)."""
        from portfolio.routing import Rule, without

        with self._write() as (session, _put):
            rules, _ = current_rules(session, router)
            return record(session, router, "remove", Rule("", dict(when or {})).label, without(rules, dict(when or {})), reason)

    def rules(self, router: str) -> tuple[list[Any], int]:
        """(the router's rules in precedence order, its version)."""
        from portfolio.routing import ordered

        with self._read() as session:
            rules, version = current_rules(session, router)
        return ordered(rules), version

    def resolve(self, router: str, tenant: str | None = None, task: str | None = None,
                      risk: str | None = None) -> tuple[Any, E.AdapterVersion]:
        """(the rule that routes this request, the version it reaches now)."""
        from portfolio.routing import check_request, match

        request = check_request({"tenant": tenant, "task": task, "risk": risk})
        rules, _ = self.rules(router)
        rule = match(rules, request)
        if rule is None:
            asked = ",".join(f"{k}={v}" for k, v in request.items()) or "no attributes"
            raise InvalidState(f"router {router} has no rule for {asked} and no default; add one with "
                               f"`portfolio route set {router} --default NAME@ALIAS`")
        version = self._registry.get_version(rule.to)
        if version.status == "archived":
            raise InvalidState(f"rule '{rule.label}' of router {router} reaches {version.ref}, which is archived; "
                               "point the alias or the rule at a served version")
        return rule, version

    def history(self, router: str) -> list[RouteEvent]:
        """Every change of a router, oldest first."""
        with self._read() as session:
            return history(session, router)

    def rollback(self, router: str, reason: str | None = None) -> RouteEvent:
        """Restore the router's previous rule set (repeat to walk further back)."""
        with self._write() as (session, _put):
            rules = rollback_rules(session, router)
            return record(session, router, "rollback", None, rules, reason or "rollback")

    def list(self) -> list[tuple[str, int, int, Any]]:
        """(name, version, rules, last change) of every router."""
        with self._read() as session:
            return list_routers(session)

    def record_requests(self, counts: dict[tuple[str, str, str, datetime], tuple[int, int]]) -> None:
        """Add served traffic: ``(version ref, router or "", rule, hour) -> (requests, tokens)``."""
        from portfolio.registry import queries

        with self._write() as (session, _put):
            for (ref, router, rule, hour), (n, tokens) in counts.items():
                version_id = queries.version_row(session, ref).id
                key = (RequestCountRow.version_id == version_id, RequestCountRow.router == router, RequestCountRow.rule == rule[:400],
                       RequestCountRow.hour == hour)
                db.insert_ignore(session, RequestCountRow.__table__, {"version_id": version_id, "router": router, "rule": rule[:400],
                                                                      "hour": hour, "requests": 0, "tokens": 0})
                session.execute(sa.update(RequestCountRow).where(*key).values(requests=RequestCountRow.requests + n,
                                                                               tokens=RequestCountRow.tokens + tokens))

    def traffic(self, ref: str) -> list[dict[str, Any]]:
        """Served traffic of a version per (router, rule): requests, tokens, first and last hour."""
        from portfolio.registry import queries

        with self._read() as session:
            version_id = queries.version_row(session, ref).id
            rows = session.execute(
                sa.select(RequestCountRow.router, RequestCountRow.rule, sa.func.sum(RequestCountRow.requests),
                          sa.func.sum(RequestCountRow.tokens), sa.func.min(RequestCountRow.hour), sa.func.max(RequestCountRow.hour))
                .where(RequestCountRow.version_id == version_id).group_by(RequestCountRow.router, RequestCountRow.rule)
            ).all()
        return [{"router": r or None, "rule": rule, "requests": int(n), "tokens": int(t), "first_hour": E.as_utc(a), "last_hour": E.as_utc(b)}
                for r, rule, n, t, a, b in rows]

    def marker(self) -> int:
        """A counter that moves with every committed change of an alias, a route or a
        version's status (`registry.changes`; one cheap query: a server reads it per request)."""
        with self._read() as session:
            return changes.marker(session)
