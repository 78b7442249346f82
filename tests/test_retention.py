"""The bounded retention set: size and stratification as snapshots arrive, reproducible from
its seed, stored with its exact rows; the example cache; gates on the set."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cli_invoker, domain_rows
from portfolio.data.splits import split_rows
from portfolio.policy import retention as R
from portfolio.training.config import TrainConfig
from portfolio.training.train import train_adapter

FAST = dict(batch_size=4, seq_len=32, lr=2e-2, checkpoint_every=100)
quiet = dict(log=lambda *_: None, progress=False)


def _rows(stratum: int, n: int) -> list[tuple[int, str]]:
    import hashlib

    return [(i, hashlib.sha256(f"{stratum}/{i}".encode()).hexdigest()) for i in range(n)]


def test_quotas_share_equally_and_pass_on_what_a_small_stratum_cannot_use():
    assert R.quotas({"a": 100, "b": 100}, 10) == {"a": 5, "b": 5}
    assert R.quotas({"a": 2, "b": 100, "c": 100}, 10) == {"a": 2, "b": 4, "c": 4}
    assert R.quotas({"a": 2, "b": 3}, 10) == {"a": 2, "b": 3}  # fewer rows than the size: all of them
    assert sum(R.quotas({i: 50 for i in range(7)}, 100).values()) == 100


@settings(max_examples=60, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12), size=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_extending_as_snapshots_arrive_equals_drawing_from_scratch(sizes, size, seed):
    """Reservoir-style updates, reading only the new snapshot, give exactly the set drawn
    afresh over every stratum with the same seed; the size stays fixed and the strata share it."""
    members: list[R.Member] = []
    counts: dict[int, int] = {}
    for stratum, n in enumerate(sizes):
        members = R.extend(members, list(counts), counts, {stratum: _rows(stratum, n)}, size, seed,
                           reread=lambda s: pytest.fail(f"stratum {s} re-read"))
        counts[stratum] = n
        scratch = R.draw({s: _rows(s, c) for s, c in counts.items()}, size, seed)
        assert sorted((m.stratum, m.row) for m in members) == sorted((m.stratum, m.row) for m in scratch)
        assert len(members) == min(size, sum(counts.values()))
        per = {s: sum(1 for m in members if m.stratum == s) for s in counts}
        full = [s for s in counts if per[s] < counts[s]]  # strata that could give more
        if full:  # stratified: no stratum holds more than one row beyond a stratum that could give more
            assert max(per.values()) - min(per[s] for s in full) <= 1


def test_a_different_seed_draws_different_rows():
    strata = {s: _rows(s, 50) for s in range(3)}
    a, b = R.draw(strata, 30, 0), R.draw(strata, 30, 1)
    assert {(m.stratum, m.row) for m in a} != {(m.stratum, m.row) for m in b}
    assert {(m.stratum, m.row) for m in a} == {(m.stratum, m.row) for m in R.draw(strata, 30, 0)}


@pytest.fixture
def drops(registry_with_base, write_jsonl):
    """Five text snapshots of one dataset, as a schedule would register them, and an adapter."""
    reg = registry_with_base
    for i in range(5):
        reg.data.add("d", [write_jsonl(f"d{i}.jsonl", domain_rows("words" if i % 2 == 0 else "numbers", n=200, seed=i))], "d")
    return reg


def test_the_registry_keeps_versions_of_the_set_with_their_exact_rows(drops):
    reg = drops
    train_adapter(reg, TrainConfig(**FAST, adapter="a", base="tiny", data="d@1", steps=2), **quiet)
    reg.gates.set("a", retention_size=12, retention_seed=7)
    sets = []
    for k in range(2, 6):
        sets.append(reg.retention.build("a", [f"d@{i}" for i in range(1, k)]))
        assert sets[-1].version == k - 1 and sets[-1].n_rows == 12 and sets[-1].seed == 7
    # asking again for covered strata returns the stored version, not a new one
    assert reg.retention.build("a", ["d@1", "d@2"]).version == 4
    last = reg.retention.get("a")
    assert [ref for ref, _ in last.strata] == ["d@1", "d@2", "d@3", "d@4"]
    assert all(len(rows) == 3 for rows in last.members.values())  # 12 rows, 4 strata
    # every member is a held-out row of its snapshot, and the set replays from its seed
    for ref, rows in last.members.items():
        held = {r["row"]: r["sha"] for r in split_rows(reg.data.rows(ref))[1]}
        assert set(rows) <= set(held)
    scratch = R.draw({ref: [(r["row"], r["sha"]) for r in split_rows(reg.data.rows(ref))[1]] for ref, _ in last.strata}, 12, 7)
    assert sorted((m.stratum, m.row) for m in scratch) == sorted((ref, r) for ref, rows in last.members.items() for r in rows)
    # a new size draws afresh as the next version
    assert reg.gates.set("a", retention_size=20)["retention_size"] == 20
    assert reg.retention.build("a", ["d@1"]).n_rows == 20 and reg.retention.get("a").version == 5
    assert [s.version for s in reg.retention.list("a")] == [1, 2, 3, 4, 5]


def test_cli_shows_the_set_and_refuses_bad_settings(drops, db_url, store_dir):
    reg = drops
    train_adapter(reg, TrainConfig(**FAST, adapter="a", base="tiny", data="d@1", steps=2), **quiet)
    run = cli_invoker(db_url, store_dir)
    assert "no retention set" in run("retention", "show", "a", ok=False).stderr
    reg.retention.build("a", ["d@1", "d@2"], size=10)
    out = run("retention", "show", "a", "--rows").output
    assert "retention:a@1: 10 of 10 rows over 2 snapshots, seed 0" in out and "d@2" in out
    shown = json.loads(run("retention", "show", "a", "--json").stdout)
    assert shown["members"] == reg.retention.get("a").members
    assert "retention:a@1" in run("retention", "list", "a").output
    bad = run("gate", "set", "a", "--retention-size", "3", ok=False)
    assert bad.exit_code != 0 and "--retention-size must be a whole number from 8" in bad.stderr
    assert reg.gates.get("a") is None  # nothing stored


def test_gates_scheduler_style_loop_reuses_scores_and_stays_bounded(drops):
    """Three retrain cycles on successive drops: each candidate is gated on the retention set
    (not on every earlier snapshot), the parent's example scores come from the cache, and the
    set keeps its size as strata arrive."""
    from portfolio.evaluation.promote import promote

    reg = drops
    train_adapter(reg, TrainConfig(**FAST, adapter="a", base="tiny", data="d@1", steps=3), **quiet)
    reg.gates.set("a", max_regression=10.0, retention_size=16)
    reg.set_alias("a", "production", 1, reason="launch")
    for k in range(2, 5):
        parent = reg.get_version("a@production").ref
        out = train_adapter(reg, TrainConfig(**FAST, adapter="a", data=f"d@{k}", from_ref=parent, steps=3), **quiet)
        logs: list[str] = []
        outcome = promote(reg, out.version.ref, seq_len=32, log=logs.append)
        assert outcome.promoted, outcome.checks
        # training scored candidate and parent on the same set: the gate loaded no model
        assert not [line for line in logs if line.startswith("evaluating")], logs
        [ret] = [c for c in outcome.checks if c.kind == "retention"]
        rset = reg.retention.get("a")
        assert ret.snapshot == rset.ref and rset.n_rows == 16 and len(rset.strata) == k - 1
        assert ret.n == 16 and ret.ci is not None  # decided on a paired interval over the set's rows
        # the recorded decision names the set's version: it replays on the exact rows
        assert reg.alias_history("a", "production")[-1].reason.endswith(f"retention on {rset.ref})")
    # --full still checks every earlier snapshot's whole held-out split
    full = promote(reg, "a@3", "staging", full=True, seq_len=32, log=lambda *_: None)
    assert {c.snapshot for c in full.checks if c.kind == "retention"} == {"d@1", "d@2"}


def test_evaluate_reuses_example_scores_across_targets(drops):
    from portfolio.evaluation.evaluate import evaluate, retention_target

    reg = drops
    train_adapter(reg, TrainConfig(**FAST, adapter="a", base="tiny", data="d@1", steps=2), **quiet)
    rset = reg.retention.build("a", ["d@2", "d@3"], size=10)
    logs: list[str] = []
    first = evaluate(reg, ["a@1", "base:tiny"], [], targets=[retention_target(rset)], seq_len=32, log=logs.append)
    assert sum(line.startswith("evaluating") for line in logs) == 2 and [s.reused for s in first] == [False, False]
    # a smaller set of the same rows: nothing to compute, same per-row scores
    smaller = reg.retention.build("a", ["d@2", "d@3"], size=6)
    logs.clear()
    second = evaluate(reg, ["a@1"], [], targets=[retention_target(smaller)], seq_len=32, log=logs.append)
    assert not logs and second[0].reused
    assert set(map(tuple, second[0].per_example)) <= set(map(tuple, first[0].per_example))
