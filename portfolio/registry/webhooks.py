"""Webhooks: the portfolio's events (`registry.events`) POSTed to URLs so that CI/CD and
gateways can react to promotions, refusals, overrides, rollbacks, route changes and drift.

Delivery is at-least-once and recorded. `deliver` first queues, in one transaction per webhook,
a delivery row for every new event of the kinds the webhook asked for (a per-source cursor on
the webhook says what was queued; the (webhook, event) pair is unique, so two dispatchers never
queue an event twice), then POSTs every due delivery:

    POST URL
    Content-Type: application/json
    X-Portfolio-Event: promote
    X-Portfolio-Delivery: 17
    X-Portfolio-Signature: sha256=HMAC_SHA256(secret, body)

    {"id": "alias:12", "kind": "promote", "subject": ..., "summary": ..., "reason": ..., "at": ..., "data": {...}}

A 2xx answer marks it delivered; anything else (a 3xx too: redirects are never followed, and
the Location is recorded; or no complete answer within `TIMEOUT_S` for the whole delivery) is
retried with exponential back-off (`BACKOFF_S` · 2^(attempt−1), at most `MAX_BACKOFF_S`) until
`MAX_ATTEMPTS`, then marked failed. Link-local and metadata addresses are refused unless the
webhook allows them (`portfolio.webhook_http`). Who runs it: `portfolio webhook deliver`, and
every scheduler worker, on a thread of its own so a slow receiver never delays a job.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from portfolio import webhook_http
from portfolio.errors import InvalidState, NotFound
from portfolio.registry import db
from portfolio.registry import entities as E
from portfolio.registry.events import KINDS, SOURCES, Event, latest_cursor, read_events
from portfolio.registry.models import utcnow
from portfolio.registry.serving_rows import WebhookDeliveryRow, WebhookRow
from portfolio.registry.namespace import Namespace

MAX_ATTEMPTS = 8
BACKOFF_S = 5.0
MAX_BACKOFF_S = 3600.0
TIMEOUT_S = 10.0  # for the whole of one delivery: connect, send, and the complete answer


@dataclass(frozen=True)
class Webhook(E.Entity):
    """A URL and the event kinds it receives."""

    id: int
    url: str
    kinds: list[str]
    active: bool
    created_at: datetime
    pending: int
    delivered: int
    failed: int
    allow_link_local: bool = False


@dataclass(frozen=True)
class Delivery(E.Entity):
    """One event for one webhook."""

    id: int
    webhook_id: int
    event_id: str
    kind: str
    status: str
    attempts: int
    response_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


def signature(secret: str, body: bytes) -> str:
    """The ``X-Portfolio-Signature`` header value of a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def parse_kinds(text: str) -> list[str]:
    """``"promote,rollback"`` -> checked kinds (``all`` for every kind)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if kinds == ["all"]:
        return list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InvalidState(f"--on {text!r}: choose from {', '.join(KINDS)} (comma-separated), or all")
    return kinds


def _check_url(url: str, allow_link_local: bool = False) -> None:
    if not url.startswith(("http://", "https://")) or len(url) > 2000 or any(c.isspace() for c in url):
        raise InvalidState(f"webhook URL {webhook_http.redact(url)[:80]!r} must be an http:// or https:// URL without spaces, "
                           "up to 2000 characters")
    try:
        webhook_http.check_url(url, allow_link_local)
    except (webhook_http.DeliveryRefused, ValueError) as exc:
        raise InvalidState(f"webhook URL: {exc}") from None


def _to_webhook(session: Session, row: WebhookRow) -> Webhook:
    counts = dict(session.execute(sa.select(WebhookDeliveryRow.status, sa.func.count()).where(WebhookDeliveryRow.webhook_id == row.id)
                                  .group_by(WebhookDeliveryRow.status)).all())
    # credentials inside the URL are for delivery only, never shown
    return Webhook(row.id, webhook_http.redact(row.url), list(row.kinds), bool(row.active), E.as_utc(row.created_at),
                   counts.get("pending", 0), counts.get("delivered", 0), counts.get("failed", 0), bool(row.allow_link_local))


def _to_delivery(r: WebhookDeliveryRow) -> Delivery:
    return Delivery(r.id, r.webhook_id, r.event_id, r.kind, r.status, r.attempts, r.response_code, r.last_error,
                    E.as_utc(r.created_at), E.as_utc(r.delivered_at))


class Events(Namespace):
    """``reg.events``: the change feed (behind `portfolio events`)."""

    def since(self, after: dict[str, int] | None = None, limit: int = 1000) -> tuple[list[Event], dict[str, int]]:
        """Events after a cursor (all when None), oldest first, and the cursor after them."""
        with self._read() as session:
            return read_events(session, after, limit)

    def recent(self, limit: int = 200) -> list[Event]:
        """The newest events, at most ``limit`` per source, newest first."""
        with self._read() as session:
            after = {s: max(0, n - limit) for s, n in latest_cursor(session).items()}
            return list(reversed(read_events(session, after, limit)[0]))

class Webhooks(Namespace):
    """``reg.webhooks``: URLs that receive the change feed (behind `portfolio webhook`)."""

    def add(self, url: str, kinds: list[str], secret: str | None = None, past: bool = False,
                    allow_link_local: bool = False) -> tuple[Webhook, str]:
        """Register a URL for these event kinds; returns it and its signing secret (generated
        when not given). Only events from now on are sent, unless ``past``; link-local and
        metadata addresses only with ``allow_link_local``."""
        _check_url(url, allow_link_local)
        kinds = parse_kinds(",".join(kinds))
        secret = secret or secrets.token_hex(32)
        with self._write() as (session, _put):
            cursor = {s: 0 for s in SOURCES} if past else latest_cursor(session)
            row = WebhookRow(url=url, kinds=kinds, secret=secret, cursor=cursor, active=True, allow_link_local=allow_link_local)
            session.add(row)
            session.flush()
            return _to_webhook(session, row), secret

    def remove(self, webhook_id: int) -> Webhook:
        """Stop a webhook (its deliveries stay on record)."""
        with self._write() as (session, _put):
            row = session.get(WebhookRow, webhook_id)
            if row is None:
                raise NotFound(f"no webhook {webhook_id}; see `portfolio webhook list`")
            row.active = False
            session.flush()
            return _to_webhook(session, row)

    def list(self) -> list[Webhook]:
        """Every webhook with its delivery counts."""
        with self._read() as session:
            return [_to_webhook(session, r) for r in session.scalars(sa.select(WebhookRow).order_by(WebhookRow.id))]

    def deliveries(self, webhook_id: int | None = None, limit: int = 100) -> list[Delivery]:
        """The newest deliveries (of one webhook)."""
        query = sa.select(WebhookDeliveryRow).order_by(WebhookDeliveryRow.id.desc()).limit(limit)
        if webhook_id is not None:
            query = query.where(WebhookDeliveryRow.webhook_id == webhook_id)
        with self._read() as session:
            return [_to_delivery(r) for r in session.scalars(query)]

    def deliver(self, now: datetime | None = None, timeout: float | None = None) -> dict[str, int]:
        """Queue new events for every active webhook, then POST every due delivery once, each
        within ``timeout`` seconds in all (default `TIMEOUT_S`). Returns counts: queued,
        delivered, retrying, failed."""
        timeout = TIMEOUT_S if timeout is None else timeout
        out = {"queued": 0, "delivered": 0, "retrying": 0, "failed": 0}
        with self._read() as session:
            hooks = [r.id for r in session.scalars(sa.select(WebhookRow).where(WebhookRow.active.is_(True)))]
        for hook_id in hooks:
            with self._write() as (session, _put):
                db.lock_name(session, "webhook", str(hook_id))
                hook = session.get(WebhookRow, hook_id)
                events, cursor = read_events(session, dict(hook.cursor))
                for e in events:
                    if e.kind in hook.kinds:
                        payload = json.loads(json.dumps(e.to_dict(), default=str))
                        if db.insert_ignore(session, WebhookDeliveryRow.__table__, {
                                "webhook_id": hook_id, "event_id": e.id, "kind": e.kind, "payload": payload, "status": "pending",
                                "attempts": 0, "next_attempt_at": utcnow(), "created_at": utcnow()}):
                            out["queued"] += 1
                hook.cursor = cursor
        now = now or utcnow()
        with self._read() as session:
            due = session.execute(
                sa.select(WebhookDeliveryRow.id, WebhookRow.url, WebhookRow.secret, WebhookRow.allow_link_local)
                .join(WebhookRow, WebhookRow.id == WebhookDeliveryRow.webhook_id)
                .where(WebhookDeliveryRow.status == "pending", WebhookDeliveryRow.next_attempt_at <= now, WebhookRow.active.is_(True))
                .order_by(WebhookDeliveryRow.id)
            ).all()
        for delivery_id, url, secret, allow_link_local in due:
            out[self._post(delivery_id, url, secret, timeout, bool(allow_link_local))] += 1
        return out

    def _post(self, delivery_id: int, url: str, secret: str, timeout: float, allow_link_local: bool = False) -> str:
        with self._read() as session:
            row = session.get(WebhookDeliveryRow, delivery_id)
            body = json.dumps(row.payload, sort_keys=True).encode()
            kind = row.kind
        answer = webhook_http.post(url, body, {
            "Content-Type": "application/json", "User-Agent": "portfolio-webhook", "X-Portfolio-Event": kind,
            "X-Portfolio-Delivery": str(delivery_id), "X-Portfolio-Signature": signature(secret, body)},
            deadline_s=timeout, allow_link_local=allow_link_local)
        code, error = answer.code, answer.error
        with self._write() as (session, _put):
            row = session.get(WebhookDeliveryRow, delivery_id)
            row.attempts += 1
            row.response_code = code
            if code is not None and 200 <= code < 300:
                row.status, row.delivered_at, row.last_error = "delivered", utcnow(), None
                return "delivered"
            row.last_error = (error or f"HTTP {code}")[:2000]
            if row.attempts >= MAX_ATTEMPTS:
                row.status = "failed"
                return "failed"
            row.next_attempt_at = utcnow() + timedelta(seconds=min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (row.attempts - 1)))
            return "retrying"

