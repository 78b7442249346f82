"""Events (one stream over alias, route and drift records) and webhooks (signed, retried with
back-off, recorded), against a real HTTP receiver on loopback."""

import hashlib
import hmac
import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import cli_invoker
from portfolio.errors import InvalidState
from portfolio.registry.models import utcnow
from portfolio.registry.webhooks import MAX_ATTEMPTS


@pytest.fixture
def history(registry_with_base, lora_dir, write_jsonl):
    reg = registry_with_base
    reg.add_dataset("fresh", [write_jsonl("f.jsonl", [{"text": f"row {i}"} for i in range(4)])], "d")
    for _ in range(2):
        reg.import_adapter("a", lora_dir, base="tiny")
    reg.set_alias("a", "production", 1, reason="launch")
    reg.record_refusal("a", "production", "a@2", "gates failed: retention")
    reg.set_alias("a", "production", 2, reason="accepted risk", force=True, action="override")
    reg.rollback("a", "production", reason="broke a tenant")
    reg.route_set("r", "a@production", reason="catch-all")
    reg.record_revalidations("a@1", "production", [{"snapshot": "fresh@1", "suite": None, "metric": "loss", "baseline": 1.0,
                                                    "baseline_snapshot": "fresh@1", "value": 1.3, "threshold": 0.05, "drifted": True}])
    return reg


def test_one_stream_of_events_with_a_cursor(history):
    events, cursor = history.events()
    assert [e.kind for e in events] == ["set", "refused", "override", "rollback", "route", "drift"]
    assert events[2].summary == "a@production -> a@2 (was a@1) (forced)" and events[2].reason == "accepted risk"
    assert events[5].summary.startswith("a@1 drifted on fresh@1: loss 1.3000 vs 1.0000")
    assert history.events(cursor)[0] == []
    history.route_remove("r", {}, reason="gone")
    [new], _ = history.events(cursor)
    assert new.kind == "route" and new.data["action"] == "remove" and new.reason == "gone"


def test_events_cli(history, db_url, store_dir):
    run = cli_invoker(db_url, store_dir)
    out = run("events").output
    assert "promote" not in out and "override  a@production -> a@2" in out and "— broke a tenant" in out
    drift = json.loads(run("events", "--kind", "drift", "--json").stdout)
    assert [e["kind"] for e in drift] == ["drift"]
    assert "choose from" in run("events", "--kind", "nope", ok=False).stderr


class Receiver:
    """A real HTTP server that checks signatures and can fail the first N requests."""

    def __init__(self, secret: str, fail_first: int = 0):
        self.secret, self.fail_left, self.received = secret, fail_first, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(outer.secret.encode(), body, hashlib.sha256).hexdigest()
                assert hmac.compare_digest(self.headers["X-Portfolio-Signature"], expected)
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_response(500)
                else:
                    outer.received.append((self.headers["X-Portfolio-Event"], json.loads(body)))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_webhooks_are_signed_filtered_retried_and_recorded(history):
    receiver = Receiver("k" * 16, fail_first=1)
    try:
        hook, secret = history.add_webhook(receiver.url, ["promote,override,rollback,route,drift"], secret="k" * 16, past=True)
        assert secret == "k" * 16
        counts = history.deliver()
        assert counts == {"queued": 4, "delivered": 3, "retrying": 1, "failed": 0}  # "set" and "refused" were not asked for
        assert history.deliver() == {"queued": 0, "delivered": 0, "retrying": 0, "failed": 0}  # the retry is not due yet
        assert history.deliver(now=utcnow() + timedelta(minutes=5))["delivered"] == 1
        assert sorted(k for k, _ in receiver.received) == ["drift", "override", "rollback", "route"]
        deliveries = {d.event_id: d for d in history.deliveries(hook.id)}
        assert all(d.status == "delivered" for d in deliveries.values()) and sorted(d.attempts for d in deliveries.values()) == [1, 1, 1, 2]
        # new events after the first pass are queued once
        history.route_set("r", "a@1", {"tenant": "x"})
        assert history.deliver()["delivered"] == 1 and receiver.received[-1][1]["data"]["rule"] == "tenant=x -> a@1"
        [listed] = history.webhooks()
        assert (listed.delivered, listed.pending, listed.failed) == (5, 0, 0)
    finally:
        receiver.close()


def test_a_receiver_that_keeps_failing_ends_failed_and_new_hooks_skip_the_past(history):
    receiver = Receiver("s", fail_first=10**6)
    try:
        hook, _ = history.add_webhook(receiver.url, ["drift"], secret="s", past=True)
        now = utcnow()
        for attempt in range(MAX_ATTEMPTS):
            counts = history.deliver(now=now + timedelta(hours=attempt + 1))
        assert counts["failed"] == 1
        [d] = history.deliveries(hook.id)
        assert d.status == "failed" and d.attempts == MAX_ATTEMPTS and d.last_error == "HTTP 500"
        fresh, key = history.add_webhook(receiver.url, ["all"])
        assert len(key) == 64 and history.deliver()["queued"] == 0  # events before it was added are not sent
    finally:
        receiver.close()
    with pytest.raises(InvalidState, match="http:// or https://"):
        history.add_webhook("ftp://x", ["promote"])
    with pytest.raises(InvalidState, match="choose from"):
        history.add_webhook("http://127.0.0.1:9/x", ["promot"])
