"""The registry's serving tables as ORM rows: routers and their history, served traffic,
webhooks and their deliveries, the serving change counter, and what running engines were
loaded with. Beside `models` (whose `Base` they share) so that each file reads in one sitting."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.sql.expression import false as sa_false

from portfolio.registry.models import Base, utcnow


class RouterRow(Base):
    """A named, versioned rule set that routes requests to versions (`portfolio.routing`)."""

    __tablename__ = "routers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RouteEventRow(Base):
    """Append-only: every change of a router, holding its whole rule set after the change, so
    the current rules are the latest event's and any earlier state can be restored."""

    __tablename__ = "route_events"
    __table_args__ = (UniqueConstraint("router_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    router_id: Mapped[int] = mapped_column(ForeignKey("routers.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(20))  # set | remove | rollback
    rule: Mapped[Optional[str]] = mapped_column(String(400))  # the label of the rule changed
    rules: Mapped[list[Any]] = mapped_column(JSON)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RequestCountRow(Base):
    """Served traffic, counted per (version, router, rule, hour) by `portfolio serve`."""

    __tablename__ = "request_counts"
    __table_args__ = (UniqueConstraint("version_id", "router", "rule", "hour"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"), index=True)
    router: Mapped[str] = mapped_column(String(100))  # "" when the request named the version itself
    rule: Mapped[str] = mapped_column(String(400))
    hour: Mapped[datetime] = mapped_column()
    requests: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)


class EngineLoadRow(Base):
    """A version loaded into (or unloaded from) a running serving engine under a name, by
    `portfolio deploy`: what a vLLM at ``engine_url`` answered with, and since when.
    Append-only."""

    __tablename__ = "engine_loads"

    id: Mapped[int] = mapped_column(primary_key=True)
    engine_url: Mapped[str] = mapped_column(String(500), index=True)
    name: Mapped[str] = mapped_column(String(300))  # the model name clients send, e.g. py@production
    version_id: Mapped[Optional[int]] = mapped_column(ForeignKey("adapter_versions.id"))
    action: Mapped[str] = mapped_column(String(20))  # load | unload
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WebhookRow(Base):
    """A URL that receives the portfolio's events (`registry.webhooks`), signed with its secret."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(2000))
    kinds: Mapped[list[Any]] = mapped_column(JSON)
    secret: Mapped[str] = mapped_column(String(200))
    # the last event row id queued for delivery, per source (alias, route, drift)
    cursor: Mapped[dict[str, Any]] = mapped_column(JSON)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    allow_link_local: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDeliveryRow(Base):
    """One event for one webhook: its payload, attempts, outcome."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (UniqueConstraint("webhook_id", "event_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id"), index=True)
    event_id: Mapped[str] = mapped_column(String(50))
    kind: Mapped[str] = mapped_column(String(20))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(20), index=True)  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    response_code: Mapped[Optional[int]] = mapped_column(Integer)
    last_error: Mapped[Optional[str]] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[Optional[datetime]] = mapped_column()


class ServingChangeRow(Base):
    """One row: a counter bumped in the same transaction as every change of an alias, a route
    or a version's status; a server re-reads its caches when it moves (`registry.changes`)."""

    __tablename__ = "serving_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    counter: Mapped[int] = mapped_column(BigInteger)
