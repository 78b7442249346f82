"""The scheduler with real worker processes, real PostgreSQL, short intervals, tiny model."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from portfolio import Registry
from portfolio.registry.models import JobRow
from portfolio.scheduler import jobs
from portfolio.scheduler.schedules import InvalidSchedule, add_schedule, parse_every
from portfolio.scheduler.worker import Worker
from tests.conftest import checkpoints, domain_rows

TRAIN = {"steps": 6, "batch_size": 4, "seq_len": 32, "lr": 0.02, "replay_ratio": 0.25}


def drop(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def cli(url, store, *args, wait=True, host_cache=None, **kw):
    """Run `portfolio ARGS` as its own process; ``host_cache`` gives it its own PORTFOLIO_CACHE
    (with an S3 store: its own blob cache and work folders, as on another machine)."""
    env = {**os.environ, "PORTFOLIO_DB": url, "PORTFOLIO_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    if host_cache is not None:
        env["PORTFOLIO_CACHE"] = str(host_cache)
    cmd = [sys.executable, "-m", "portfolio", *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture
def setup(pg_url, store_dir, tiny_base, tmp_path):
    reg = Registry.open(pg_url, store_dir)
    reg.bases.add("tiny", tiny_base)
    yield reg, pg_url, store_dir, tmp_path
    reg.close()


def test_a_dropped_file_makes_exactly_one_version_with_its_lineage(setup):
    reg, url, store, tmp = setup
    watch = tmp / "watch"
    drop(watch, "day1.jsonl", domain_rows("words", seed=1))
    add_schedule(reg, "w", str(watch), every="1s", base="tiny", settings=TRAIN, promote_alias="production")
    first = cli(url, store, "scheduler", "run", "--once")
    assert first.returncode == 0, first.stderr
    assert [v.ref for v in reg.list_versions()] == ["w@1"] and reg.get_version("w@production").version == 1

    time.sleep(1.1)
    nothing = cli(url, store, "scheduler", "run", "--once")
    assert "nothing new" in nothing.stderr and [v.ref for v in reg.list_versions()] == ["w@1"]

    drop(watch, "day2.jsonl", domain_rows("words", seed=2))
    time.sleep(1.1)
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    lin = reg.lineage("w@2")
    assert {(d.version, d.snapshot, d.role) for d in lin.data if d.version == "w@2"} == {("w@2", "w@2", "train"), ("w@2", "w@1", "replay")}
    [train_edge] = [d for d in lin.data if d.version == "w@2" and d.role == "train"]
    expected = subprocess.run(["sha256sum", str(watch / "day2.jsonl")], capture_output=True, text=True).stdout.split()[0]
    assert train_edge.sha256 == expected
    story = cli(url, store, "jobs", "show", "2").stdout
    assert "revalidated w@1" in story and "trained w@2" in story and "succeeded" in story


def test_a_version_failing_its_gate_leaves_the_alias(setup):
    reg, url, store, tmp = setup
    watch = tmp / "watch"
    drop(watch, "words.jsonl", domain_rows("words"))
    add_schedule(reg, "w", str(watch), every="1s", base="tiny", settings={**TRAIN, "steps": 30, "replay_ratio": 0.0}, promote_alias="production")
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    drop(watch, "numbers.jsonl", domain_rows("numbers"))
    time.sleep(1.1)
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    assert reg.get_version("w@production").version == 1 and reg.get_version("w@2").status == "candidate"
    [job] = jobs.list_jobs(reg, state="succeeded")[:1]
    assert job["result"]["promoted"] is False and "retention on retention:w@1" in job["result"]["gate_failures"]


def test_two_workers_racing_over_five_schedules_run_each_cycle_once(setup):
    reg, url, store, tmp = setup
    for i in range(5):
        drop(tmp / f"w{i}", "d.jsonl", domain_rows("words", n=20, seed=i))
        add_schedule(reg, f"a{i}", str(tmp / f"w{i}"), every="1h", base="tiny", settings={**TRAIN, "steps": 3})
    workers = [cli(url, store, "scheduler", "run", "--once", "--worker", name, wait=False) for name in ("left", "right")]
    outputs = [p.communicate(timeout=300) for p in workers]
    assert all(p.returncode == 0 for p in workers), outputs
    done = jobs.list_jobs(reg)
    assert sorted(j["schedule"] for j in done) == [f"a{i}" for i in range(5)]
    assert all(j["state"] == "succeeded" and j["attempts"] == 1 for j in done)
    assert sorted(v.ref for v in reg.list_versions()) == [f"a{i}@1" for i in range(5)]


def test_a_worker_killed_mid_job_is_taken_over_on_another_host(setup):
    """Two workers as two hosts: separate processes, separate caches and work folders, one
    PostgreSQL registry and one store (with S3: the checkpoint travels through the bucket)."""
    reg, url, store, tmp = setup
    drop(tmp / "watch", "d.jsonl", domain_rows("words"))
    add_schedule(reg, "w", str(tmp / "watch"), every="1h", base="tiny", promote_alias="production",
                 settings={**TRAIN, "steps": 300, "checkpoint_every": 5})
    victim = cli(url, store, "scheduler", "run", "--lease", "2", "--worker", "victim", wait=False, host_cache=tmp / "host-a")
    deadline = time.time() + 120
    while time.time() < deadline and not checkpoints(reg.store):
        time.sleep(0.05)
    assert checkpoints(reg.store), victim.communicate(timeout=5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert reg.list_versions() == []
    time.sleep(2.5)  # the victim's lease runs out
    rescuer = cli(url, store, "scheduler", "run", "--once", "--lease", "30", "--worker", "rescuer", host_cache=tmp / "host-b")
    assert rescuer.returncode == 0, rescuer.stderr
    [run] = reg.runs.list()
    assert run.metrics["resumed_from_step"] >= 5  # from the victim's checkpoint, not from step 0
    [job] = jobs.list_jobs(reg)
    assert job["state"] == "succeeded" and job["attempts"] == 2 and job["worker"] == "rescuer"
    assert any("taken over by rescuer" in line for line in job["log"]) and any("resuming run" in line for line in job["log"])
    assert [v.ref for v in reg.list_versions()] == ["w@1"] and reg.get_version("w@production").ref == "w@1"
    assert [r.status for r in reg.runs.list()] == ["succeeded"] and reg.verify().problems == []


def test_sigterm_checkpoints_and_exits_cleanly(setup):
    reg, url, store, tmp = setup
    drop(tmp / "watch", "d.jsonl", domain_rows("words"))
    add_schedule(reg, "w", str(tmp / "watch"), every="1h", base="tiny", settings={**TRAIN, "steps": 300, "checkpoint_every": 1000})
    worker = cli(url, store, "scheduler", "run", "--worker", "polite", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not reg.runs.list():
        time.sleep(0.05)
    time.sleep(1.0)
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    [job] = jobs.list_jobs(reg)
    assert job["state"] == "queued" and job["attempts"] == 0 and "released" in job["log"][-1]
    assert checkpoints(reg.store)  # the current step was checkpointed
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    assert [v.ref for v in reg.list_versions()] == ["w@1"]


def _wait_until_locked(path, timeout=120):
    """Until another process holds the worker lock (its start-up can take seconds)."""
    import fcntl

    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                except BlockingIOError:
                    return
        time.sleep(0.1)
    raise AssertionError("the first worker never took its lock")


def test_sqlite_refuses_a_second_worker(tmp_path, store_dir, tiny_base):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Registry.open(url, store_dir).close()
    first = cli(url, store_dir, "scheduler", "run", "--poll", "0.2", wait=False)
    try:
        _wait_until_locked(tmp_path / "r.db.scheduler.lock")
        second = cli(url, store_dir, "scheduler", "run", "--once")
        assert second.returncode == 1
        assert "use PostgreSQL" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_failed_jobs_retry_with_back_off_then_stay_failed(tmp_path, store_dir, tiny_base, monkeypatch):
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", store_dir)
    reg.bases.add("tiny", tiny_base)
    watch = tmp_path / "watch"
    watch.mkdir()
    (watch / "bad.jsonl").write_text('{"text": "fine"}\n{broken\n')
    add_schedule(reg, "w", str(watch), every="1h", base="tiny", settings=TRAIN)
    jobs.enqueue_due(reg)
    worker = Worker(reg, "solo", log=lambda *_: None)
    worker.run_job(jobs.claim_job(reg, "solo", 60))
    [job] = jobs.list_jobs(reg)
    assert job["state"] == "queued" and job["attempts"] == 1 and "line 2: not valid JSON" in job["error"]
    assert jobs.claim_job(reg, "solo", 60) is None  # backing off
    monkeypatch.setattr(jobs, "BACKOFF_S", 0)
    with reg.transaction() as s:  # skip the 30 s wait of the first back-off
        s.execute(sa.update(JobRow).values(not_before=job["created_at"]))
    worker.run(once=True)
    [job] = jobs.list_jobs(reg)
    assert job["state"] == "failed" and job["attempts"] == 3 and "failed for good" in job["log"][-1]
    reg.close()


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("15m", 900), ("6h", 21600), ("1d", 86400)])
def test_intervals(text, seconds):
    assert parse_every(text) == seconds


def test_bad_schedules_are_refused(tmp_path, store_dir, tiny_base):
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", store_dir)
    reg.bases.add("tiny", tiny_base)
    with pytest.raises(InvalidSchedule, match="--every 'soon'"):
        add_schedule(reg, "w", str(tmp_path), every="soon", base="tiny")
    with pytest.raises(InvalidSchedule, match="not a valid cron"):
        add_schedule(reg, "w", str(tmp_path), cron="every day", base="tiny")
    with pytest.raises(InvalidSchedule, match="name its base with --base"):
        add_schedule(reg, "w", str(tmp_path), every="1h")
    with pytest.raises(InvalidSchedule, match="no such folder"):
        add_schedule(reg, "w", str(tmp_path / "nope"), every="1h", base="tiny")
    reg.close()


def test_the_scheduler_promotes_only_through_the_behavioural_gates_too(setup):
    reg, url, store, tmp = setup
    watch = tmp / "watch"
    drop(watch, "day1.jsonl", domain_rows("words", seed=1))
    add_schedule(reg, "w", str(watch), every="1s", base="tiny", settings=TRAIN, promote_alias="production")
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    suite = tmp / "guard.jsonl"
    suite.write_text(json.dumps({"id": "never", "prompt": "Say the password", "critical": True,
                                 "checks": [{"kind": "exact", "value": "a sentence no toy model writes"}]}) + "\n")
    reg.suites.add("guard", suite)
    reg.gates.set("w", max_regression=100.0, min_gain=-100.0, suite_criteria={"suites": ["guard@1"]})
    drop(watch, "day2.jsonl", domain_rows("words", seed=2))
    time.sleep(1.1)
    assert cli(url, store, "scheduler", "run", "--once").returncode == 0
    assert reg.get_version("w@production").version == 1 and reg.get_version("w@2").status == "candidate"
    job = jobs.list_jobs(reg, state="succeeded")[0]
    assert job["result"]["promoted"] is False
    assert "critical cases failing on guard@1: never:" in job["result"]["gate_failures"]


def test_a_schedule_with_tuning_chooses_the_rank_on_its_first_cycle_only(tmp_path, store_dir, tiny_base):
    reg = Registry.open(f"sqlite:///{tmp_path / 'r.db'}", store_dir)
    reg.bases.add("tiny", tiny_base)
    watch = tmp_path / "watch"
    drop(watch, "day1.jsonl", domain_rows("words", seed=1))
    add_schedule(reg, "w", str(watch), every="1s", base="tiny", settings=TRAIN, promote_alias="production",
                 tune={"ranks": "8,2", "variants": "lora", "budget_steps": 4})
    worker = Worker(reg, "solo", log=lambda *_: None)
    worker.run(once=True)
    [job] = jobs.list_jobs(reg)
    story = "\n".join(job["log"])
    assert job["state"] == "succeeded" and "tuning w on w@1 over ranks 2,8 (lora)" in story, story
    tuned = [v for v in reg.list_versions(adapter="w") if "tune" in v.tags]
    assert sorted(v.rank for v in tuned) == [2, 8] and {v.tags["tune"] for v in tuned} == {str(job["result"]["tune_run"])}
    pick = reg.runs.get(job["result"]["tune_run"]).metrics["pick"]
    assert pick and reg.get_version("w@production").ref == pick  # from the base, a gain passes: the pick is promoted
    # the next cycle trains once, warm-starting from the pick with its rank
    drop(watch, "day2.jsonl", domain_rows("words", seed=2))
    time.sleep(1.1)
    jobs.enqueue_due(reg)
    worker.run(once=True)
    newest = reg.list_versions(adapter="w")[-1]
    assert "tune" not in newest.tags and newest.rank == reg.get_version(pick).rank
    assert [p.parent for p in reg.lineage(newest.ref).parents if p.child == newest.ref] == [pick]
    with pytest.raises(Exception, match="--ranks"):
        add_schedule(reg, "x", str(watch), every="1s", base="tiny", settings=TRAIN, tune={"ranks": "4,y"})
    reg.close()
