"""Routers: rule precedence, validation of targets, following aliases, append-only history and
rollback — in the library, on SQLite and PostgreSQL, and through the CLI."""

import json

import pytest

from conftest import cli_invoker
from portfolio.errors import InvalidState
from portfolio.routing import InvalidRoute, Rule, match, ordered, parse_when


def test_precedence_is_most_specific_then_priority_then_order():
    rules = [
        Rule("general@production"),
        Rule("acme@production", {"tenant": "acme"}),
        Rule("code@production", {"task": "code"}),
        Rule("safe@production", {"tenant": "acme", "risk": "high"}),
        Rule("urgent@production", {"risk": "high"}, priority=5),
    ]
    route = lambda **req: match(rules, req).to  # noqa: E731
    assert route(tenant="acme", task="code", risk="high") == "safe@production"  # two conditions beat one
    assert route(tenant="acme", task="code") == "acme@production"  # tie on one condition: the older rule
    assert route(task="code", risk="high") == "urgent@production"  # tie on one condition: higher priority
    assert route(tenant="other") == "general@production"
    assert match(rules[1:], {"tenant": "other"}) is None  # no default
    assert [r.label for r in ordered(rules)][:2] == ["tenant=acme,risk=high", "risk=high"]


@pytest.mark.parametrize("text, problem", [
    ("tenant", "write KEY=VALUE"), ("colour=red", "KEY one of tenant, task, risk"), ("tenant=a b", "not a valid value"),
    ("tenant=a,tenant=b", "tenant given twice"), ("tenant=", "not a valid value"),
])
def test_bad_conditions_are_refused(text, problem):
    with pytest.raises(InvalidRoute, match=problem):
        parse_when(text)


@pytest.fixture
def versions(registry_with_base, lora_dir):
    reg = registry_with_base
    for name in ("general", "acme", "safe"):
        reg.import_adapter(name, lora_dir, base="tiny")
        reg.set_alias(name, "production", 1, reason="launch")
    reg.import_adapter("acme", lora_dir, base="tiny")  # acme@2, a candidate
    return reg


def test_routes_follow_promotions_and_roll_back(versions):
    reg = versions
    reg.routes.set("r", "general@production", reason="catch-all")
    reg.routes.set("r", "acme@production", {"tenant": "acme"}, reason="acme's own")
    reg.routes.set("r", "safe@production", {"tenant": "acme", "risk": "high"})
    rule, version = reg.routes.resolve("r", tenant="acme", risk="high")
    assert (rule.label, version.ref) == ("tenant=acme,risk=high", "safe@1")
    assert reg.routes.resolve("r", tenant="acme")[1].ref == "acme@1"
    # promotion moves the alias; the route follows it without any change to the router
    reg.set_alias("acme", "production", 2, reason="v2")
    assert reg.routes.resolve("r", tenant="acme")[1].ref == "acme@2"
    assert reg.routes.resolve("r", tenant="zeta", task="chat")[1].ref == "general@1"
    # replacing a rule keeps one rule per condition set; removing and rolling back are recorded
    reg.routes.set("r", "general@production", {"tenant": "acme"}, priority=2, reason="acme back to general")
    assert len(reg.routes.rules("r")[0]) == 3 and reg.routes.resolve("r", tenant="acme")[1].ref == "general@1"
    reg.routes.remove("r", {"tenant": "acme", "risk": "high"}, reason="retired")
    assert reg.routes.resolve("r", tenant="acme", risk="high")[1].ref == "general@1"
    reg.routes.rollback("r", reason="too early")
    assert reg.routes.resolve("r", tenant="acme", risk="high")[1].ref == "safe@1"
    reg.routes.rollback("r")
    assert reg.routes.resolve("r", tenant="acme")[1].ref == "acme@2"
    history = reg.routes.history("r")
    assert [(e.version, e.action) for e in history] == [(1, "set"), (2, "set"), (3, "set"), (4, "set"), (5, "remove"),
                                                        (6, "rollback"), (7, "rollback")]
    assert history[0].reason == "catch-all" and history[4].rule == "tenant=acme,risk=high"
    assert history[6].rules == history[2].rules  # two rollbacks: back to the state after v3


def test_targets_are_checked_when_set(versions):
    reg = versions
    with pytest.raises(Exception, match="nope"):
        reg.routes.set("r", "nope@production")
    reg.deprecate("safe@1", reason="old")
    with pytest.raises(InvalidState, match="safe@1 is deprecated; pass --force"):
        reg.routes.set("r", "safe@1")
    assert reg.routes.set("r", "safe@1", force=True).forced
    with pytest.raises(InvalidState, match="no earlier rule set"):
        reg.routes.rollback("r")
    reg.routes.remove("r", {})  # its only rule: the router now routes nothing
    with pytest.raises(InvalidState, match="no rule for tenant=x and no default"):
        reg.routes.resolve("r", tenant="x")
    assert reg.routes.rules("r")[0] == []
    assert len(reg.routes.history("r")) == 2  # a refused change records nothing


def test_cli(versions, db_url, store_dir):
    run = cli_invoker(db_url, store_dir)
    assert "r v1: default -> general@production" in run("route", "set", "r", "--default", "--to", "general@production").output
    run("route", "set", "r", "--when", "tenant=acme,risk=high", "--to", "safe@production", "--reason", "risky acme")
    assert run("route", "resolve", "r", "--tenant", "acme", "--risk", "high").output.strip() == \
        "safe@1 (via safe@production) by rule 'tenant=acme,risk=high'"
    resolved = json.loads(run("route", "resolve", "r", "--tenant", "acme", "--json").stdout)
    assert resolved == {"router": "r", "version": "general@1", "target": "general@production", "rule": "default", "priority": 0}
    shown = run("route", "show", "r").output
    assert shown.index("tenant=acme,risk=high") < shown.index("default") and "safe@1" in shown
    assert "risky acme" in run("route", "history", "r").output
    assert json.loads(run("route", "list", "--json").stdout)[0] | {"changed_at": None} == \
        {"router": "r", "version": 2, "rules": 2, "changed_at": None}
    bad = run("route", "set", "r", "--when", "colour=red", "--to", "safe@production", ok=False)
    assert bad.exit_code != 0 and bad.stderr.count("\n") == 1 and "KEY one of tenant, task, risk" in bad.stderr
    both = run("route", "set", "r", "--default", "--when", "tenant=a", "--to", "safe@production", ok=False)
    assert "exactly one of --when" in both.stderr
    missing = run("route", "show", "nope", ok=False)
    assert "no router 'nope'" in missing.stderr
    assert "rolled back" in run("route", "rollback", "r").output
    assert json.loads(run("route", "show", "r", "--json").stdout)["rules"][0]["label"] == "default"


def test_a_change_committed_late_still_moves_the_serving_marker(registry_with_base, lora_dir, db_url, store_dir):
    """The forced interleaving that lost a promotion on PostgreSQL with a ``max(id)`` marker:
    A draws the lower event id and commits last; a reader that refreshed in between saw B's
    higher id, so A's commit never moved the marker and the server kept the old version."""
    import threading

    from portfolio import Registry

    reg = registry_with_base
    for name in ("a", "b"):
        reg.import_adapter(name, lora_dir, "tiny")
        reg.import_adapter(name, lora_dir, "tiny")
        reg.set_alias(name, "production", 1)
    ra, rb = Registry.open(db_url, store_dir), Registry.open(db_url, store_dir)
    paused, go = threading.Event(), threading.Event()
    real = ra._alias_event

    def held(session, event, adapter):  # A, inside its transaction after its flush: id drawn, not committed
        paused.set()
        go.wait(timeout=30)
        return real(session, event, adapter)

    ra._alias_event = held

    def state():
        return tuple(reg.get_version(f"{n}@production").version for n in ("a", "b"))

    # a server's cache: refresh only when the marker moved
    cached_marker, cached = reg.routes.marker(), state()
    try:
        a = threading.Thread(target=ra.set_alias, args=("a", "production", 2))
        a.start()
        assert paused.wait(timeout=30)
        b = threading.Thread(target=rb.set_alias, args=("b", "production", 2))
        b.start()
        b.join(timeout=1.5)  # the old marker let B commit here; the counter makes it wait for A
        marker = reg.routes.marker()
        if marker != cached_marker:
            cached_marker, cached = marker, state()
        go.set()
        a.join(timeout=30)
        b.join(timeout=30)
        marker = reg.routes.marker()
        if marker != cached_marker:
            cached_marker, cached = marker, state()
        assert state() == (2, 2)
        assert cached == (2, 2), f"the server's cache kept {cached}: a committed promotion never moved the marker"
    finally:
        go.set()
        ra.close()
        rb.close()


def test_every_change_that_decides_serving_moves_the_marker(registry_with_base, lora_dir):
    reg = registry_with_base
    reg.import_adapter("a", lora_dir, "tiny")
    reg.import_adapter("a", lora_dir, "tiny")
    steps = [lambda: reg.set_alias("a", "production", 1), lambda: reg.set_alias("a", "production", 2),
             lambda: reg.rollback("a"), lambda: reg.routes.set("main", "a@production"),
             lambda: reg.remove_alias("a", "production"), lambda: reg.deprecate("a@2", reason="old"),
             lambda: reg.archive("a@2")]
    seen = [reg.routes.marker()]
    for step in steps:
        step()
        seen.append(reg.routes.marker())
    assert all(later > earlier for earlier, later in zip(seen, seen[1:])), seen
