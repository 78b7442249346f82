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
    reg.data.add("fresh", [write_jsonl("f.jsonl", [{"text": f"row {i}"} for i in range(4)])], "d")
    for _ in range(2):
        reg.import_adapter("a", lora_dir, base="tiny")
    reg.set_alias("a", "production", 1, reason="launch")
    reg.gates.record_refusal("a", "production", "a@2", "gates failed: retention")
    reg.set_alias("a", "production", 2, reason="accepted risk", force=True, action="override")
    reg.rollback("a", "production", reason="broke a tenant")
    reg.routes.set("r", "a@production", reason="catch-all")
    reg.gates.record_revalidations("a@1", "production", [{"snapshot": "fresh@1", "suite": None, "metric": "loss", "baseline": 1.0,
                                                    "baseline_snapshot": "fresh@1", "value": 1.3, "threshold": 0.05, "drifted": True}])
    return reg


def test_one_stream_of_events_with_a_cursor(history):
    events, cursor = history.events.since()
    assert [e.kind for e in events] == ["set", "refused", "override", "rollback", "route", "drift"]
    assert events[2].summary == "a@production -> a@2 (was a@1) (forced)" and events[2].reason == "accepted risk"
    assert events[5].summary.startswith("a@1 drifted on fresh@1: loss 1.3000 vs 1.0000")
    assert history.events.since(cursor)[0] == []
    history.routes.remove("r", {}, reason="gone")
    [new], _ = history.events.since(cursor)
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
        hook, secret = history.webhooks.add(receiver.url, ["promote,override,rollback,route,drift"], secret="k" * 16, past=True)
        assert secret == "k" * 16
        counts = history.webhooks.deliver()
        assert counts == {"queued": 4, "delivered": 3, "retrying": 1, "failed": 0}  # "set" and "refused" were not asked for
        assert history.webhooks.deliver() == {"queued": 0, "delivered": 0, "retrying": 0, "failed": 0}  # the retry is not due yet
        assert history.webhooks.deliver(now=utcnow() + timedelta(minutes=5))["delivered"] == 1
        assert sorted(k for k, _ in receiver.received) == ["drift", "override", "rollback", "route"]
        deliveries = {d.event_id: d for d in history.webhooks.deliveries(hook.id)}
        assert all(d.status == "delivered" for d in deliveries.values()) and sorted(d.attempts for d in deliveries.values()) == [1, 1, 1, 2]
        # new events after the first pass are queued once
        history.routes.set("r", "a@1", {"tenant": "x"})
        assert history.webhooks.deliver()["delivered"] == 1 and receiver.received[-1][1]["data"]["rule"] == "tenant=x -> a@1"
        [listed] = history.webhooks.list()
        assert (listed.delivered, listed.pending, listed.failed) == (5, 0, 0)
    finally:
        receiver.close()


def test_a_receiver_that_keeps_failing_ends_failed_and_new_hooks_skip_the_past(history):
    receiver = Receiver("s", fail_first=10**6)
    try:
        hook, _ = history.webhooks.add(receiver.url, ["drift"], secret="s", past=True)
        now = utcnow()
        for attempt in range(MAX_ATTEMPTS):
            counts = history.webhooks.deliver(now=now + timedelta(hours=attempt + 1))
        assert counts["failed"] == 1
        [d] = history.webhooks.deliveries(hook.id)
        assert d.status == "failed" and d.attempts == MAX_ATTEMPTS and d.last_error == "HTTP 500"
        fresh, key = history.webhooks.add(receiver.url, ["all"])
        assert len(key) == 64 and history.webhooks.deliver()["queued"] == 0  # events before it was added are not sent
    finally:
        receiver.close()
    with pytest.raises(InvalidState, match="http:// or https://"):
        history.webhooks.add("ftp://x", ["promote"])
    with pytest.raises(InvalidState, match="choose from"):
        history.webhooks.add("http://127.0.0.1:9/x", ["promot"])


# -- reliability round 3: redirects, blocked addresses, bounded deliveries, redaction ----------


class RawReceiver:
    """A loopback TCP server answering each connection with ``script(conn)``; counts every
    connection, and every POST body it received."""

    def __init__(self, script):
        import socket

        self.connections, self.bodies = 0, []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.closed = threading.Event()

        def serve():
            while not self.closed.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                threading.Thread(target=self._one, args=(conn, script), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def _one(self, conn, script):
        try:
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            self.bodies.append(data)
            script(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed.set()
        self.sock.close()


def test_a_redirect_is_never_followed_and_is_recorded_with_its_location(history):
    target = RawReceiver(lambda c: c.sendall(b"HTTP/1.1 204 No Content\r\n\r\n"))  # where a redirect would lead
    redirects = [f"ftp://127.0.0.1:{target.port}/x", f"http://127.0.0.1:{target.port}/elsewhere"]
    hooks = []
    for location in redirects:
        receiver = RawReceiver(lambda c, loc=location: c.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: {loc}\r\nContent-Length: 0\r\n\r\n".encode()))
        hook, _ = history.webhooks.add(receiver.url, ["drift"], secret="s", past=True)
        hooks.append((hook, receiver, location))
    try:
        counts = history.webhooks.deliver()
        assert counts["delivered"] == 0 and counts["retrying"] == 2
        assert target.connections == 0, "a redirect was followed"
        for hook, _, location in hooks:
            [d] = history.webhooks.deliveries(hook.id)
            assert d.status == "pending" and d.response_code == 302 and location in d.last_error and "not followed" in d.last_error
    finally:
        target.close()
        for _, receiver, _ in hooks:
            receiver.close()


def test_link_local_and_metadata_addresses_are_refused_unless_allowed(history):
    from portfolio import webhook_http

    for url in ("http://169.254.169.254/latest/meta-data", "http://[fd00:ec2::254]/", "http://[fe80::1]:8080/x"):
        with pytest.raises(InvalidState, match="link-local or metadata address.*--allow-link-local"):
            history.webhooks.add(url, ["drift"])
    hook, _ = history.webhooks.add("http://169.254.169.254/hook", ["drift"], allow_link_local=True)
    assert hook.allow_link_local
    assert webhook_http.blocked("::ffff:169.254.1.1") and not webhook_http.blocked("127.0.0.1")
    # a name resolving to a blocked address is refused at delivery, whatever it resolved to at add
    import socket

    real = socket.getaddrinfo
    try:
        socket.getaddrinfo = lambda host, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        answer = webhook_http.post("http://metadata.example/x", b"{}", {}, deadline_s=2)
    finally:
        socket.getaddrinfo = real
    assert answer.code is None and "refused" in answer.error and "--allow-link-local" in answer.error


def test_a_silent_or_trickling_receiver_costs_one_bounded_delivery(history):
    import time

    def trickle(conn):
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
            conn.sendall(bytes([byte]))
            time.sleep(0.2)

    silent = RawReceiver(lambda c: time.sleep(20))
    slow = RawReceiver(trickle)
    try:
        for receiver in (silent, slow):
            history.webhooks.add(receiver.url, ["drift"], secret="s", past=True)
        started = time.monotonic()
        counts = history.webhooks.deliver(timeout=1.5)
        elapsed = time.monotonic() - started
        assert counts["retrying"] == 2 and elapsed < 6, elapsed  # the trickle used to hold a delivery for minutes
        assert all("within 1.5 s" in d.last_error for d in history.webhooks.deliveries())
    finally:
        silent.close()
        slow.close()


def test_credentials_inside_a_webhook_url_are_never_shown(history, db_url, store_dir):
    receiver = Receiver("s")
    try:
        url = receiver.url.replace("http://", "http://alice:hunter2@")
        hook, _ = history.webhooks.add(url, ["drift"], secret="s", past=True)
        assert "hunter2" not in hook.url and hook.url.startswith("http://***@127.0.0.1:")
        assert history.webhooks.deliver()["delivered"] == 1  # delivery still uses them
        out = cli_invoker(db_url, store_dir)("webhook", "list").output
        assert "hunter2" not in out and "alice" not in out and "***@127.0.0.1" in out
    finally:
        receiver.close()


def test_a_worker_delivers_off_its_critical_path(history, monkeypatch):
    import time

    from portfolio.registry import webhooks
    from portfolio.scheduler.worker import Worker

    monkeypatch.setattr(webhooks, "TIMEOUT_S", 2.0)
    silent = RawReceiver(lambda c: time.sleep(20))
    try:
        history.webhooks.add(silent.url, ["drift"], secret="s", past=True)
        worker = Worker(history, "w", poll_s=0.01, log=lambda m: None)
        started = time.monotonic()
        worker.deliver_webhooks()  # returns at once; the delivery runs on its own thread
        assert time.monotonic() - started < 1.0
        worker._delivery.join(timeout=30)
    finally:
        silent.close()
