"""`portfolio serve` as a real server process on loopback, driven by a real HTTP client:
routing, following promotions and rollbacks without a restart, traceability, the request log,
never serving an archived version, clean 4xx answers, streaming, metrics."""

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from portfolio import Registry
from tests.conftest import free_port, wait_until_healthy

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_base, lora_dir):
    from conftest import make_lora

    root = tmp_path_factory.mktemp("serve")
    db, store = f"sqlite:///{root / 'registry.db'}", root / "store"
    reg = Registry.open(db, store)
    reg.bases.add("tiny", tiny_base)
    other = make_lora(tiny_base, root / "other", seed=7)
    for name, folder in (("general", lora_dir), ("acme", lora_dir), ("acme", other), ("old", other)):
        reg.import_adapter(name, folder, base="tiny")
    reg.set_alias("general", "production", 1, reason="launch")
    reg.set_alias("acme", "production", 1, reason="launch")
    reg.routes.set("support", "general@production")
    reg.routes.set("support", "acme@production", {"tenant": "acme"})
    reg.routes.set("support", "old@1", {"tenant": "legacy"})
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PORTFOLIO_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", db, "--store", str(store), "serve", "--port", str(port),
                             "--router", "support", "--max-tokens", "32"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    wait_until_healthy(proc, client, lambda: proc.stderr.read())
    yield {"client": client, "registry": reg, "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)
    client.close()
    reg.close()


def chat(client, tenant=None, model=None, **extra):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, **extra}
    if model:
        body["model"] = model
    headers = AUTH | ({"X-Portfolio-Tenant": tenant} if tenant else {})
    return client.post("/v1/chat/completions", json=body, headers=headers)


def served_version(client, tenant=None, **extra) -> str:
    r = chat(client, tenant, **extra)
    assert r.status_code == 200, r.text
    assert r.headers["X-Portfolio-Version"] == r.json()["portfolio"]["version"] == r.json()["model"]
    return r.headers["X-Portfolio-Version"]


def until(fn, expected, seconds=8.0):
    deadline = time.time() + seconds
    while True:
        got = fn()
        if got == expected or time.time() > deadline:
            return got
        time.sleep(0.3)


def test_routing_by_tenant_task_and_body_fields(served):
    client = served["client"]
    assert served_version(client) == "general@1"
    assert served_version(client, "acme") == "acme@1"
    by_body = client.post("/v1/chat/completions", headers=AUTH,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tenant": "acme"})
    assert by_body.headers["X-Portfolio-Version"] == "acme@1"  # a body field works too
    r = chat(client, "acme")
    assert r.headers["X-Portfolio-Rule"] == "tenant=acme" and r.json()["portfolio"]["router"] == "support"
    # naming a version or an alias bypasses the router
    assert served_version(client, model="acme@2") == "acme@2"
    assert served_version(client, model="base:tiny") == "base:tiny"
    text = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 3, "model": "general@production"}, headers=AUTH)
    assert text.status_code == 200 and text.json()["object"] == "text_completion" and text.json()["model"] == "general@1"


def test_promotion_and_rollback_reach_the_next_request_without_a_restart(served):
    client, reg = served["client"], served["registry"]
    reg.set_alias("acme", "production", 2, reason="v2")
    assert until(lambda: served_version(client, "acme"), "acme@2") == "acme@2"
    reg.rollback("acme", "production", reason="back")
    assert until(lambda: served_version(client, "acme"), "acme@1") == "acme@1"
    # a route change, too
    reg.routes.set("support", "general@production", {"tenant": "acme"}, reason="merge acme into general")
    assert until(lambda: served_version(client, "acme"), "general@1") == "general@1"
    reg.routes.rollback("support")
    assert until(lambda: served_version(client, "acme"), "acme@1") == "acme@1"


def test_the_request_log_counts_per_version_and_rule(served):
    client, reg = served["client"], served["registry"]

    def by_rule():
        return {(t["router"], t["rule"]): t for t in reg.routes.traffic("general@1")}

    def default_requests():
        return by_rule().get(("support", "default"), {"requests": 0})["requests"]

    # the log is flushed in the background: earlier tests' requests may land after this read,
    # so the wait is on the default rule's own count, never on the version's total
    before = default_requests()
    for _ in range(3):
        served_version(client, "zeta")
    deadline = time.time() + 15
    while default_requests() < before + 3 and time.time() < deadline:
        time.sleep(0.3)
    rows = by_rule()
    assert rows[("support", "default")]["requests"] >= before + 3 and rows[("support", "default")]["tokens"] > 0
    # `portfolio show` tells how much traffic a version took, and `lineage` of it is one step away
    from click.testing import CliRunner

    from portfolio.cli import cli

    shown = CliRunner().invoke(cli, ["--db", str(reg.engine.url), "--store", str(reg.store.root), "show", "general@1"]).output
    assert "requests served" in shown and "via support default" in shown


def test_an_archived_version_is_never_served(served):
    client, reg = served["client"], served["registry"]
    assert served_version(client, "legacy") == "old@1"
    reg.deprecate("old@1", reason="retired")
    reg.archive("old@1", reason="retired")
    r = until(lambda: chat(client, "legacy").status_code, 409)
    assert r == 409
    body = chat(client, "legacy").json()
    assert "archived" in body["error"]["message"] and body["error"]["code"] == 409


@pytest.mark.parametrize("case", ["unknown model", "malformed json", "oversize", "no key", "wrong key", "too many tokens",
                                  "missing messages", "bad role", "bad tenant", "other base"])
def test_bad_requests_get_clean_4xx_json(served, case):
    client = served["client"]
    url, body, headers, raw = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, AUTH, None
    if case == "unknown model":
        body["model"] = "nope@production"
    elif case == "malformed json":
        raw = b'{"messages": ['
    elif case == "oversize":
        body["messages"][0]["content"] = "x" * 1_100_000
    elif case == "no key":
        headers = {}
    elif case == "wrong key":
        headers = {"Authorization": "Bearer nope"}
    elif case == "too many tokens":
        body["max_tokens"] = 10_000
    elif case == "missing messages":
        body = {"model": "general@1"}
    elif case == "bad role":
        body["messages"][0]["role"] = "wizard"
    elif case == "bad tenant":
        headers = AUTH | {"X-Portfolio-Tenant": "a b"}
    elif case == "other base":
        body["model"] = "base:other"
    r = client.post(url, content=raw, headers=headers | {"content-type": "application/json"}) if raw is not None \
        else client.post(url, json=body, headers=headers)
    expected = {"unknown model": 404, "oversize": 413, "no key": 401, "wrong key": 401, "other base": 404}.get(case, 400)
    assert r.status_code == expected, (case, r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == expected and error["message"] and "Traceback" not in r.text


def test_streaming_metrics_and_models(served):
    client = served["client"]
    with client.stream("POST", "/v1/chat/completions", headers=AUTH | {"X-Portfolio-Tenant": "acme"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Portfolio-Version"].startswith("acme@")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = client.get("/metrics", headers=AUTH).text
    assert "portfolio_requests_total{" in metrics and "portfolio_request_seconds_bucket" in metrics
    assert 'status="401"' in metrics or "portfolio_errors_total" in metrics
    ids = {m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]}
    assert {"general@production", "acme@1", "support", "base:tiny"} <= ids and "old@1" not in ids


def test_binding_beyond_loopback_needs_a_key(tmp_path):
    from click.testing import CliRunner

    from portfolio.cli import cli

    result = CliRunner(env={"PORTFOLIO_API_KEY": None}).invoke(
        cli, ["--db", f"sqlite:///{tmp_path / 'r.db'}", "--store", str(tmp_path / "s"), "serve", "--host", "0.0.0.0"])
    assert result.exit_code != 0 and "set --api-key" in result.stderr


# -- property test against the OpenAPI schema: any body, any header, never a 5xx ---------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)
FIELDS = {"model": st.one_of(st.none(), st.sampled_from(["general@1", "acme@production", "support", "base:tiny", "nope", "@", ""]), st.text(max_size=12)),
          "max_tokens": st.one_of(st.integers(-5, 40), JSON), "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), JSON),
          "stream": st.one_of(st.booleans(), JSON), "tenant": st.one_of(st.sampled_from(["acme", "zeta", "a b", ""]), JSON),
          "seed": st.one_of(st.integers(-3, 2**32), JSON)}
MESSAGES = st.one_of(JSON, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                           "content": st.one_of(st.text(max_size=30), JSON)}), max_size=3))


def _schema_paths(client) -> set[str]:
    return set(client.get("/openapi.json", headers=AUTH).json()["paths"])


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       body=st.fixed_dictionaries({}, optional={**FIELDS, "messages": MESSAGES, "prompt": st.one_of(st.text(max_size=30), JSON)}),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_any_request_gets_an_answer_or_a_clean_4xx(served, path, body, raw):
    client = served["client"]
    assert path in _schema_paths(client)
    if raw is not None:
        r = client.post(path, content=raw, headers=AUTH | {"content-type": "application/json"})
    else:
        r = client.post(path, json={k: v for k, v in body.items()}, headers=AUTH)
    assert r.status_code < 500, (path, body, raw, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["code"] == r.status_code and isinstance(error["message"], str) and error["message"]
    elif not body.get("stream"):
        assert r.headers["X-Portfolio-Version"] == r.json()["portfolio"]["version"]


# -- reliability round 3: bounded bodies, deep JSON, the schema behind the key --------------


def test_a_chunked_body_over_the_limit_is_refused_without_reading_it_whole(served):
    client = served["client"]
    sent = []

    def chunks():
        for i in range(200):  # 200 MB if it were read whole
            sent.append(i)
            yield b"x" * (1 << 20)

    try:
        r = client.post("/v1/chat/completions", content=chunks(), headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 413 and "over 1,000,000 bytes" in r.json()["error"]["message"]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered and closed while the client was still sending: also a refusal
    assert len(sent) < 50, f"the server read {len(sent)} MB before refusing"
    assert client.get("/health").status_code == 200


def test_deeply_nested_json_is_a_400_not_a_500(served):
    client = served["client"]
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        r = client.post("/v1/chat/completions", content=body, headers=AUTH | {"content-type": "application/json"})
        assert r.status_code == 400 and "nests deeper" in r.json()["error"]["message"], r.text
    assert served_version(client) == "general@1" or client.get("/health").status_code == 200


def test_with_a_key_the_schema_and_docs_need_it_too(served):
    client = served["client"]
    for path in ("/openapi.json", "/docs", "/metrics", "/v1/models"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert client.get("/health").status_code == 200  # the liveness probe stays open
