"""`portfolio serve` under churn, as real server processes on loopback: more versions than LRU
slots (in a loop, concurrently), archive reaching the very next request, and a soak with a
second process promoting, rolling back, deprecating and archiving while eight clients ask."""

import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from portfolio import Registry
from tests.conftest import free_port, make_lora, wait_until_healthy

N_LORAS = 5


@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_base) -> list[Path]:
    root = tmp_path_factory.mktemp("loras")
    return [make_lora(tiny_base, root / f"l{i}", seed=10 + i) for i in range(N_LORAS)]


def start_server(db: str, store: Path, max_adapters: int, tmp: Path):
    """A `portfolio serve` process; returns (process, client) once /health answers."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PORTFOLIO_CACHE": str(tmp / "cache")}
    log = open(tmp / f"serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", db, "--store", str(store), "serve", "--port", str(port),
                             "--max-adapters", str(max_adapters), "--max-tokens", "8", "--batch-size", "4"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    wait_until_healthy(proc, client, lambda: (tmp / f"serve-{port}.log").read_text())
    return proc, client


def stop_server(proc, client) -> None:
    client.close()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def ask(client, model: str, tokens: int = 2):
    return client.post("/v1/chat/completions", json={"model": model, "max_tokens": tokens,
                                                     "messages": [{"role": "user", "content": "Say hi."}]})


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture
def portfolio_of_versions(tmp_path, tiny_base, loras):
    db, store = f"sqlite:///{tmp_path / 'registry.db'}", tmp_path / "store"
    reg = Registry.open(db, store)
    reg.bases.add("tiny", tiny_base)
    for folder in loras:
        reg.import_adapter("t", folder, base="tiny")
    yield reg, db, store
    reg.close()


@pytest.mark.parametrize("slots", [1, 2])
def test_more_versions_than_slots_in_a_loop_and_concurrently(portfolio_of_versions, tmp_path, slots):
    """With 1 slot the old engine deleted PEFT's only (active) adapter and every later request,
    base included, failed; with 2 an evicted version could never load again."""
    reg, db, store = portfolio_of_versions
    proc, client = start_server(db, store, slots, tmp_path)
    try:
        models = [f"t@{v}" for v in range(1, N_LORAS + 1)] + ["base:tiny"]
        for _ in range(2):
            for model in models:
                r = ask(client, model)
                assert r.status_code == 200, (model, r.text)
                assert r.headers["X-Portfolio-Version"] == model
        answers: list = []

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=client.base_url, timeout=120) as c:
                for _ in range(6):
                    model = rng.choice(models)
                    r = ask(c, model)
                    answers.append((model, r.status_code, r.headers.get("X-Portfolio-Version")))

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert len(answers) == 36
        assert [a for a in answers if a[1] != 200 or a[0] != a[2]] == []
        assert client.get("/health").json()["loaded_adapters"] <= max(slots, 4)  # a batch may hold up to 4 at once
    finally:
        stop_server(proc, client)


def test_archiving_a_deprecated_version_in_use_reaches_the_next_request(portfolio_of_versions, tmp_path):
    """The old change marker counted deprecated and archived together, so deprecated ->
    archived went unnoticed for as long as the version stayed cached."""
    reg, db, store = portfolio_of_versions
    proc, client = start_server(db, store, 2, tmp_path)
    try:
        assert ask(client, "t@1").status_code == 200
        reg.deprecate("t@1", reason="replaced")
        assert ask(client, "t@1").status_code == 200  # deprecated is still served when asked for by name
        reg.archive("t@1", reason="retired")
        for _ in range(3):  # at once, not after a poll interval; and never a 5xx once its bytes are gone
            r = ask(client, "t@1")
            assert r.status_code == 409 and "archived" in r.json()["error"]["message"], r.text
        for v in range(2, N_LORAS + 1):  # evict whatever was cached
            assert ask(client, f"t@{v}").status_code == 200
        assert ask(client, "t@1").status_code == 409
        assert ask(client, "base:tiny").status_code == 200
    finally:
        stop_server(proc, client)


MUTATOR = textwrap.dedent('''
    import json, sys, time
    from portfolio import Registry

    db, store, loras, seconds, log_path = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    reg = Registry.open(db, store)
    log = open(log_path, "w")

    def note(action, ref):
        log.write(json.dumps({"t": time.time(), "action": action, "ref": ref}) + "\\n")
        log.flush()

    end, i = time.time() + seconds, 0
    while time.time() < end:
        v = reg.import_adapter("t", loras[i % len(loras)], base="tiny")
        note("import", v.ref)
        reg.set_alias("t", "production", v.version, reason="promote")
        note("promote", v.ref)
        if i % 3 == 2:
            event = reg.rollback("t", "production", reason="soak")
            note("rollback", f"t@{event.to_version}")
        current = reg.get_version("t@production").version
        for old in reg.list_versions(adapter="t"):
            if old.version < current - 2 and old.status not in ("archived", "deprecated") and not old.aliases:
                reg.deprecate(old.ref, reason="soak")
                note("deprecate", old.ref)
            elif old.version < current - 3 and old.status == "deprecated" and not old.aliases:
                reg.archive(old.ref, reason="soak")
                note("archive", old.ref)
        i += 1
        time.sleep(0.5)
    reg.close()
''')


def test_soak_eight_clients_while_another_process_promotes_and_archives(portfolio_of_versions, tmp_path, loras):
    """8 clients for PORTFOLIO_SOAK_S seconds (120 by default) over more versions than LRU
    slots while a second process promotes, rolls back, deprecates and archives in a loop:
    every answer names a version not archived when its request started, no 5xx, memory flat."""
    reg, db, store = portfolio_of_versions
    reg.set_alias("t", "production", N_LORAS, reason="start")
    seconds = float(os.environ.get("PORTFOLIO_SOAK_S", "120"))
    proc, client = start_server(db, store, 2, tmp_path)
    mutator_log = tmp_path / "mutator.jsonl"
    try:
        for v in range(1, N_LORAS + 1):  # warm up: every code path once, before memory is measured
            ask(client, f"t@{v}")
        memory = [rss_mb(proc.pid)]
        mutator = subprocess.Popen([sys.executable, "-c", MUTATOR, db, str(store), json.dumps([str(p) for p in loras]),
                                    str(seconds), str(mutator_log)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                   stderr=subprocess.PIPE, text=True)
        answers: list = []
        stop_at = time.time() + seconds

        def client_loop(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=client.base_url, timeout=120) as c:
                while time.time() < stop_at:
                    made = mutator_log.read_text().count('"import"') if mutator_log.exists() else 0
                    newest = N_LORAS + made
                    model = rng.choice(["t@production", "t@production", "base:tiny", f"t@{rng.randint(1, newest)}"])
                    started = time.time()
                    r = ask(c, model)
                    answers.append((started, model, r.status_code, r.headers.get("X-Portfolio-Version"), r.text[:200]))

        def sampler() -> None:
            while time.time() < stop_at:
                time.sleep(seconds / 8)
                memory.append(rss_mb(proc.pid))

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)] + [threading.Thread(target=sampler)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 300)
        mutator.wait(timeout=120)
        assert mutator.returncode == 0, mutator.stderr.read()
    finally:
        stop_server(proc, client)
    events = [json.loads(line) for line in mutator_log.read_text().splitlines()]
    archived_at = {e["ref"]: e["t"] for e in events if e["action"] == "archive"}
    assert archived_at, "the soak archived nothing: it proves nothing about archives"
    assert len({e["ref"] for e in events if e["action"] == "import"}) > 2  # more versions than slots
    served_5xx = [a for a in answers if a[2] >= 500]
    assert served_5xx == [], (served_5xx[:5], "".join(p.read_text()[-3000:] for p in tmp_path.glob("serve-*.log")))
    stale = [a for a in answers if a[2] == 200 and a[3] in archived_at and archived_at[a[3]] < a[0]]
    assert stale == [], f"answers from versions archived before the request started: {stale[:5]}"
    ok = [a for a in answers if a[2] == 200]
    assert len(ok) > 50 and {a[3] for a in ok if a[1] == "t@production"} - {"t@5"}, "the clients never saw a promotion"
    refused = [a for a in answers if a[2] != 200]
    assert all(a[2] in (404, 409) for a in refused), refused[:5]  # asked for a version not yet made, or archived
    # memory flat: after warm-up, the last samples are within a bound of the first
    assert max(memory[-3:]) - memory[0] < 300, f"server memory grew: {[round(m) for m in memory]} MB"


def test_a_keyless_server_answers_only_loopback_host_names(portfolio_of_versions, tmp_path):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    reg, db, store = portfolio_of_versions
    proc, client = start_server(db, store, 2, tmp_path)
    try:
        port = client.base_url.port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
            for path in ("/health", "/v1/models", "/openapi.json"):
                r = client.get(path, headers={"Host": host})
                assert r.status_code == 421 and "loopback" in r.json()["error"]["message"], (host, path, r.text)
        r = client.post("/v1/chat/completions", headers={"Host": "evil.example"},
                        json={"model": "t@1", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 421
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.1", f"[::1]:{port}"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    finally:
        stop_server(proc, client)


def test_a_version_archived_while_its_bytes_are_read_is_a_refusal_not_damage(registry_with_base, tiny_base, tmp_path):
    """The interleaving the soak found under load: the version's row is read as active, then
    another writer archives it (its bytes deleted) before the blob is opened. The reader gets
    the archived refusal (a server answers 409), never "artifact missing" (503)."""
    from portfolio.compose.merge import source_of
    from portfolio.errors import InvalidState

    reg = registry_with_base
    v = reg.import_adapter("a", make_lora(tiny_base, tmp_path / "l1", seed=1), "tiny")
    v2 = reg.import_adapter("b", make_lora(tiny_base, tmp_path / "l2", seed=2), "tiny")
    original, pending = reg.store.verified_path, []

    def archive_first(digest, what):
        if pending:  # another writer archives the version in the window
            other = Registry.open(str(reg.engine.url), reg.store.url)
            other.archive(pending.pop(), reason="retired meanwhile", force=True)
            other.close()
        return original(digest, what)

    reg.store.verified_path = archive_first
    pending.append(v.ref)
    with pytest.raises(InvalidState, match="archived while it was being read"):
        reg.export_weights(v.ref, tmp_path / "out")
    pending.append(v2.ref)
    with pytest.raises(InvalidState, match="archived while it was being read"):
        source_of(reg, v2, 1.0)


def test_a_read_begun_before_an_archive_is_not_cached_for_later_requests(registry_with_base, tiny_base, tmp_path):
    """The interleaving the soak found: request A misses the cache and reads t@1 as active; the
    version is archived; request B sees the counter move and drops the caches; only then does
    A's read return. A may answer from its own read (it began first), but a request made after
    the archive must be refused, not served from what A put back in the cache."""
    from portfolio.server.state import ApiError, Resolver, ServerSettings

    reg = registry_with_base
    v = reg.import_adapter("t", make_lora(tiny_base, tmp_path / "l1", seed=1), "tiny")
    resolver = Resolver(reg, reg.bases.get("tiny"), ServerSettings())
    read_done, archived = threading.Event(), threading.Event()
    original = reg.get_version

    def slow_read(ref):
        version = original(ref)  # read before the archive...
        read_done.set()
        archived.wait(timeout=30)  # ...returned after another request saw it
        return version

    reg.get_version = slow_read
    result: list = []
    a = threading.Thread(target=lambda: result.append(resolver.resolve("t@1", {})))
    a.start()
    assert read_done.wait(timeout=30)
    reg.get_version = original
    reg.archive(v.ref, reason="retired", force=True)
    with pytest.raises(ApiError) as b:  # B: after the archive
        resolver.resolve("t@1", {})
    assert b.value.status == 409
    archived.set()
    a.join(timeout=30)
    assert result and result[0].label == v.ref  # A: began before, answered from its read
    with pytest.raises(ApiError) as c:  # C: after A put its read back
        resolver.resolve("t@1", {})
    assert c.value.status == 409, "a read from before the archive was cached and served"
