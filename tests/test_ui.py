"""The dashboard: pages and /api over a real registry through the ASGI app, then the real
`portfolio ui` process driven by a headless Chromium (Debian's, through playwright)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from portfolio import DataSpec, ParentSpec, Registry
from tests.conftest import free_port

KEY = "test-key-0123456789"


def build_portfolio(reg: Registry, lora_dir: Path, write_jsonl) -> Registry:
    """Two domains, a replayed drop, a finetune chain, a merge, evaluations on a matrix, a
    suite result with per-case outputs, alias moves (a promotion, a refusal, an override)."""
    from portfolio.adapter_files import read_lora_folder

    lora = read_lora_folder(lora_dir)
    reg.data.add("docs", [write_jsonl("ui-docs1.jsonl", [{"text": f"the docs say {i}"} for i in range(8)])], "python",
                    source="https://docs.python.org/3/", license="PSF-2.0")
    reg.data.add("docs", [write_jsonl("ui-docs2.jsonl", [{"text": f"second drop {i}"} for i in range(8)])], "python")
    reg.data.add("nums", [write_jsonl("ui-nums.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(8)])], "math")
    reg.import_adapter("py", lora_dir, "tiny", data=["docs@1"], description="python docs <b>assistant</b>")
    reg.register_version("py", base="tiny", lora=lora, parents=[ParentSpec("py@1", "finetune", {"lr": 1e-4})],
                         data=[DataSpec("docs@2", "train"), DataSpec("docs@1", "replay", [0, 3])])
    reg.import_adapter("calc", lora_dir, "tiny", data=["nums@1"])
    reg.register_version("blend", base="tiny", lora=lora, parents=[ParentSpec("py@2", "merge", {"method": "ties", "weight": 0.5}),
                                                                   ParentSpec("calc@1", "merge", {"method": "ties", "weight": 0.5})])
    for model, snap, loss in [("py@1", "docs@1", 2.1), ("py@1", "docs@2", 2.9), ("py@2", "docs@1", 2.2), ("py@2", "docs@2", 1.7),
                              ("base:tiny", "docs@1", 3.5), ("base:tiny", "docs@2", 3.6)]:
        reg.evaluations.record(model, snap, {"loss": loss, "perplexity": 2.718 ** loss})
    reg.set_alias("py", "production", 1, reason="first release")
    reg.gates.record_refusal("py", "production", "py@2", "gates failed: loss on docs@1 regressed 4.8% (limit 2%)")
    reg.set_alias("py", "production", 2, reason="accepted: docs@1 regression is within noise", force=True, action="override")
    suite_file = write_jsonl("ui-suite.jsonl", [
        {"id": "json-1", "prompt": "Give the user as JSON", "slice": {"format": "json"}, "critical": True,
         "checks": [{"kind": "json_schema", "schema": {"type": "object"}}]},
    ])
    reg.suites.add("format", suite_file)
    reg.suites.record_result("py@2", "format@1", "k" * 64, {"max_new_tokens": 16},
                            {"overall": {"n": 1, "passed": 0, "pass_rate": 0.0, "critical_failures": 1, "critical_failed": ["json-1"]}, "slices": {}},
                            [{"id": "json-1", "slice": {"format": "json"}, "critical": True, "output": "Sure! {name: bob}",
                              "checks": [{"kind": "json_schema", "passed": False, "note": "not JSON"}], "passed": False}])
    return reg


@pytest.fixture
def dashboard(registry_with_base, lora_dir, write_jsonl):
    from fastapi.testclient import TestClient

    from portfolio.ui.app import create_app

    reg = build_portfolio(registry_with_base, lora_dir, write_jsonl)
    return reg, TestClient(create_app(reg, KEY), base_url="http://127.0.0.1"), TestClient(create_app(reg, None), base_url="http://127.0.0.1")


def test_pages_show_the_portfolio(dashboard):
    reg, client, _ = dashboard
    home = client.get("/")
    assert home.status_code == 200
    for text in ("py", "calc", "blend", "production→2", "python"):
        assert text in home.text
    assert "<b>assistant</b>" not in client.get("/adapters/py").text  # escaped, never markup
    version = client.get("/versions/py/2").text
    assert 'class="lineage"' in version and 'href="/versions/py/1"' in version and 'href="/datasets/docs/1"' in version
    assert reg.data.get("docs@1").sha256[:16] in version  # data edges show the sha256
    assert "replay · 2 rows" in version and "Sure! {name: bob}" in version and "json-1" in version
    assert "override" in version and "regressed 4.8%" in version  # its refusal, then its forced promotion
    timeline = client.get("/adapters/py/aliases").text
    assert "refused" in timeline and "regressed 4.8%" in timeline and "override" in timeline and "first release" in timeline
    matrix = client.get("/adapters/py/matrix").text
    assert 'class="heatmap"' in matrix and "2.2000" in matrix and "BWT" in matrix and 'class="history"' in matrix
    dataset = client.get("/datasets/docs/1").text
    assert "PSF-2.0" in dataset and "the docs say 0" in dataset and "3 version(s) downstream" in dataset
    assert 'href="/versions/blend/1"' in dataset
    assert client.get("/schedules").status_code == 200 and client.get("/events").status_code == 200
    missing = client.get("/versions/py/99")
    assert missing.status_code == 404 and "has no version 99" in missing.text


def test_overview_filters_and_pages(dashboard):
    reg, client, _ = dashboard
    page = client.get("/api/adapters", params={"q": "CAL"}).json()
    assert [a["name"] for a in page["items"]] == ["calc"] and page["total"] == 1
    assert [a["name"] for a in client.get("/api/adapters", params={"domain": "math"}).json()["items"]] == ["calc"]
    first = client.get("/api/adapters", params={"per_page": 2}).json()
    second = client.get("/api/adapters", params={"per_page": 2, "page_no": 2}).json()
    assert first["pages"] == 2 and [a["name"] for a in first["items"] + second["items"]] == ["blend", "calc", "py"]
    assert 'rel="next"' in client.get("/", params={"per_page": 2}).text
    reg.governance.revoke("nums@1", "licence")
    tainted = client.get("/api/adapters", params={"flag": "tainted"}).json()["items"]
    assert sorted(a["name"] for a in tainted) == ["blend", "calc"] and tainted[0]["tainted"] == [1]
    assert client.get("/api/adapters", params={"flag": "bogus"}).status_code == 409


def test_api_mirrors_the_pages(dashboard):
    reg, client, _ = dashboard
    version = client.get("/api/versions/py/2").json()
    assert version["version"]["aliases"] == ["production"] and {e["snapshot"] for e in version["evaluations"]} == {"docs@1", "docs@2"}
    assert version["suites"][0]["cases"][0]["output"] == "Sure! {name: bob}"
    dot = client.get("/api/versions/blend/1/lineage", params={"format": "dot"}).text
    assert dot.startswith("digraph lineage") and '"calc@1" -> "blend@1"' in dot
    lineage = client.get("/api/versions/py/2/lineage").json()
    assert lineage["root"] == "py@2" and {d["sha256"] for d in lineage["data"]} == {reg.data.get("docs@1").sha256, reg.data.get("docs@2").sha256}
    uses = client.get("/api/datasets/docs/1/uses").json()
    assert {u["version"] for u in uses["uses"]} == {"py@1", "py@2", "blend@1"}
    matrix = client.get("/api/adapters/py/matrix").json()
    assert {"model": "py@2", "snapshot": "docs@1", "value": 2.2} in matrix["values"] and matrix["continual"][0]["bwt"] is not None
    schema = client.get("/api/openapi.json").json()
    assert {"/api/adapters", "/api/versions/{name}/{number}/lineage", "/api/datasets/{name}/{number}/revoke"} <= set(schema["paths"])
    assert client.get("/api/versions/py/2/lineage", params={"format": "png"}).status_code == 409


def test_writes_need_the_key_and_are_recorded_as_the_cli_records_them(dashboard):
    reg, client, readonly = dashboard
    body = {"reason": "incident 42: bad answers", "alias": "production"}
    refused = readonly.post("/api/adapters/py/rollback", json=body)
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]
    assert client.post("/api/adapters/py/rollback", json=body).status_code == 401
    assert client.post("/api/adapters/py/rollback", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert reg.get_version("py@production").version == 2  # nothing moved
    no_reason = client.post("/api/adapters/py/rollback", json={"alias": "production"}, headers={"X-API-Key": KEY})
    assert no_reason.status_code == 409 and "reason" in no_reason.json()["error"]
    done = client.post("/api/adapters/py/rollback", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert done.status_code == 200 and done.json()["to"] == 1
    last = reg.alias_history("py")[-1]
    assert (last.action, last.to_version, last.reason) == ("rollback", 1, "incident 42: bad answers")
    # revoke through a form post, as the page sends it
    form = "ref=nums%401&reason=personal+data&api_key=" + KEY
    r = client.post("/actions/revoke", content=form, headers={"content-type": "application/x-www-form-urlencoded"}, follow_redirects=False)
    assert r.status_code == 303 and "revoked" in r.headers["location"]
    [event] = reg.governance.events()
    assert event.snapshot == "nums@1" and event.reason == "personal data" and "via ui" in event.actor
    # promotion of a tainted version is refused and recorded as a refusal, like the CLI's
    r = client.post("/api/versions/blend/1/promote", json={"reason": "try"}, headers={"X-API-Key": KEY})
    assert r.status_code == 409 and "tainted" in r.json()["error"]
    assert reg.alias_history("blend")[-1].action == "refused"
    wrong = client.post("/actions/rollback", content="adapter=py&reason=x&api_key=nope", headers={"content-type": "application/x-www-form-urlencoded"})
    assert wrong.status_code == 401 and "wrong API key" in wrong.text


def test_no_input_makes_the_dashboard_fail(dashboard):
    """Any query, path segment or form body: an answer, never a server error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    reg, client, _ = dashboard
    text = st.text(max_size=30)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(q=text, domain=text, status=text, flag=st.sampled_from(["", "drifted", "tainted", "x"]),
           page_no=st.integers(-5, 10**6), per_page=st.integers(-5, 10**6), name=text, number=st.integers(-5, 10**9), body=st.binary(max_size=200))
    def check(q, domain, status, flag, page_no, per_page, name, number, body):
        params = {"q": q, "domain": domain, "status": status, "flag": flag, "page_no": page_no, "per_page": per_page}
        for path in ("/", "/api/adapters"):
            assert client.get(path, params=params).status_code in (200, 400, 409, 422)
        from urllib.parse import quote

        segment = quote(name, safe="") or "x"
        for path in (f"/versions/{segment}/{number}", f"/api/versions/{segment}/{number}/lineage", f"/datasets/{segment}/{number}",
                     f"/adapters/{segment}/matrix"):
            assert client.get(path).status_code in (200, 400, 404, 409, 422), path
        for path in ("/actions/revoke", "/actions/rollback", "/api/adapters/py/rollback"):
            assert client.post(path, content=body).status_code in (400, 401, 403, 409, 422)

    check()
    assert reg.get_version("py@production").version == 2 and reg.governance.events() == []


def test_ui_command_refuses_a_short_key(db_url, store_dir):
    from tests.conftest import cli_invoker

    result = cli_invoker(db_url, store_dir)("ui", "--api-key", "short", ok=False)
    assert result.exit_code == 2 and "shorter than 12" in result.output


# -- in a real browser ------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        reason = "playwright is not installed"
    else:
        reason = None if CHROMIUM else "no chromium on this machine (apt-get install chromium chromium-driver)"
    if reason:
        if os.environ.get("PORTFOLIO_REQUIRE_BROWSER"):
            pytest.fail(f"browser tests required (PORTFOLIO_REQUIRE_BROWSER) but {reason}")
        pytest.skip(reason)


@pytest.fixture
def live_ui(tmp_path, tiny_base, lora_dir, write_jsonl):
    _browser_or_skip()
    db, store = f"sqlite:///{tmp_path / 'ui.db'}", tmp_path / "store"
    reg = Registry.open(db, store)
    reg.bases.add("tiny", tiny_base)
    build_portfolio(reg, lora_dir, write_jsonl)
    reg.close()
    port = free_port()
    env = dict(os.environ, PORTFOLIO_UI_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", db, "--store", str(store), "ui", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(150):
        try:
            if httpx.get(url + "/api/adapters", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"`portfolio ui` did not start: {proc.communicate()[0]}")
    yield url, db, store
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def browser_page(live_ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: d.accept())
        yield page, live_ui, errors
        browser.close()


def _shot(page, name: str) -> None:
    """Screenshots for docs/ when PORTFOLIO_SCREENSHOTS names a folder (`make screenshots`)."""
    folder = os.environ.get("PORTFOLIO_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"ui-{name}.png"), full_page=True)


def test_browser_walks_from_the_overview_through_lineage_links(browser_page):
    page, (url, _db, _store), errors = browser_page
    page.goto(url + "/")
    rows = page.locator("#adapters tbody tr")
    assert rows.count() == 3 and "production→2" in page.inner_text("#adapters")
    _shot(page, "overview")
    page.click("#adapters >> text=py@2")
    assert page.url.endswith("/versions/py/2")
    graph = page.locator("#lineage svg.lineage")
    assert graph.count() == 1
    nodes = page.locator("#lineage a.node")
    assert {nodes.nth(i).get_attribute("data-ref") for i in range(nodes.count())} == {"py@2", "py@1", "docs@1", "docs@2"}
    _shot(page, "version")
    page.click('#lineage a.node[data-ref="py@1"]')
    assert page.url.endswith("/versions/py/1") and page.inner_text("h1").startswith("py@1")
    page.click('#lineage a.node[data-ref="docs@1"]')
    assert page.url.endswith("/datasets/docs/1")
    assert "the docs say 0" in page.inner_text("#preview") and "blend@1" in page.inner_text("#uses")
    _shot(page, "dataset")
    page.click("#uses >> text=blend@1")
    assert page.locator('#lineage a.node[data-ref="calc@1"]').count() == 1
    page.goto(url + "/adapters/py/matrix")
    assert page.locator("#heatmap svg rect.cell").count() == 6 and page.locator("#history svg polyline").count() == 2
    _shot(page, "matrix")
    page.goto(url + "/adapters/py/aliases")
    assert "regressed 4.8%" in page.inner_text("#timeline")
    _shot(page, "aliases")
    for path in ("/datasets", "/schedules", "/events"):
        assert page.goto(url + path).status == 200
    assert errors == []


def _submit(page, url: str, form: str, reason: str, key: str | None) -> None:
    """Open ``url``, unfold the write form ``form``, fill it in and send it."""
    page.goto(url)
    page.click(f"#{form} summary")
    page.fill(f'#{form} input[name="reason"]', reason)
    if key:
        page.fill(f'#{form} input[name="api_key"]', key)
    page.click(f"#{form} button")


def test_browser_writes_are_refused_without_the_key_and_recorded_with_it(browser_page):
    page, (url, db, store), errors = browser_page
    _submit(page, url + "/adapters/py/aliases", "rollback-form", "bad answers in prod", None)
    assert "wrong API key" in page.inner_text("#message")
    reg = Registry.open(db, store)
    try:
        assert reg.get_version("py@production").version == 2
        _submit(page, url + "/adapters/py/aliases", "rollback-form", "bad answers in prod", KEY)
        page.wait_for_selector("#done")
        assert "rolled back" in page.inner_text("#done") and "bad answers in prod" in page.inner_text("#timeline")
        last = reg.alias_history("py")[-1]
        assert (last.action, last.to_version, last.reason) == ("rollback", 1, "bad answers in prod")
        _submit(page, url + "/datasets/nums/1", "revoke-form", "licence withdrawn", KEY)
        page.wait_for_selector("#revoked")
        assert reg.data.get("nums@1").revoke_reason == "licence withdrawn"
        page.goto(url + "/versions/blend/1")
        assert "Tainted" in page.inner_text("#taint")
        _shot(page, "tainted")
    finally:
        reg.close()
    # the refused post shows as the browser's own 401 line; nothing else may fail
    assert [e for e in errors if "status of 401" not in e] == []


def test_huge_numbers_security_headers_origin_and_host(dashboard, registry_with_base):
    """Round 3: 2**63 in a page number or depth was a 500; no CSP or framing headers; a write
    from another site's page was accepted; every Host header was answered."""
    from fastapi.testclient import TestClient

    from portfolio.ui.app import create_app

    reg, keyed, readonly = dashboard
    for path in (f"/?page_no={2**63}", f"/api/adapters?page_no={2**63}", f"/api/versions/py/1/lineage?depth={2**63}",
                 f"/versions/py/{2**63}", f"/adapters/py?page_no={10**30}"):
        r = readonly.get(path)
        assert r.status_code == 400 and "out of range" in r.text, (path, r.status_code, r.text[:200])
    r = readonly.get("/")
    assert r.status_code == 200
    assert "default-src 'self'" in r.headers["content-security-policy"] and "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert readonly.get("/api/adapters").headers["x-frame-options"] == "DENY"
    # a cross-site write, with the right key even: refused by Origin
    r = keyed.post("/api/adapters/py/rollback", json={"reason": "x"}, headers={"Authorization": f"Bearer {KEY}", "Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.text
    r = keyed.post("/actions/rollback", data={"adapter": "py", "reason": "x", "api_key": KEY}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert reg.get_version("py@production").version == 2
    # Host: without a key only loopback names (or --allow-host ones)
    assert TestClient(create_app(reg, None)).get("/").status_code == 421  # Host: testserver
    assert TestClient(create_app(reg, None), base_url="http://localhost:8080").get("/").status_code == 200
    assert TestClient(create_app(reg, None, ("dash.internal",)), base_url="http://dash.internal").get("/").status_code == 200
    assert TestClient(create_app(reg, KEY)).get("/").status_code == 200  # with a key, the key is the guard


def test_ui_beyond_loopback_without_a_key_is_refused(db_url, store_dir):
    from tests.conftest import cli_invoker

    result = cli_invoker(db_url, store_dir)("ui", "--host", "0.0.0.0", ok=False)
    assert result.exit_code == 2 and "--api-key" in result.output
