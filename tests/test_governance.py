"""Data governance: reverse lineage, revoking a snapshot (taint, refusals, no replay) and
purging its bytes while lineage still names its sha256."""

import json

import pytest
import sqlalchemy as sa

from portfolio import DataSpec, ParentSpec
from portfolio.errors import InvalidState
from portfolio.registry.governance import DataRevoked, record_purge, plan_purge
from portfolio.export import export_version
from tests.conftest import cli_invoker


@pytest.fixture
def portfolio_dag(registry_with_base, lora_dir, write_jsonl):
    """docs@1 reaches a@1 (train), b@1 (replay of rows 0 and 2), a@2 (finetune of a@1),
    m@1 (merge of a@2 and c@1) and s@1 (stack over b@1); c@1, e@1 (evaluated on docs@1 only)
    and u@1 never used docs@1's rows in their weights."""
    from portfolio.adapter_files import read_lora_folder

    reg, lora = registry_with_base, read_lora_folder(lora_dir)
    reg.data.add("docs", [write_jsonl("docs1.jsonl", [{"text": f"doc row {i}"} for i in range(6)])], "python", license="CC-BY-4.0")
    reg.data.add("docs", [write_jsonl("docs2.jsonl", [{"text": f"second drop {i}"} for i in range(6)])], "python")
    reg.data.add("nums", [write_jsonl("nums.jsonl", [{"text": f"{i} {i * 7}"} for i in range(6)])], "numbers")
    reg.import_adapter("a", lora_dir, "tiny", data=["docs@1"])
    reg.register_version("b", base="tiny", lora=lora, data=[DataSpec("nums@1", "train"), DataSpec("docs@1", "replay", [0, 2])])
    reg.register_version("a", base="tiny", lora=lora, parents=[ParentSpec("a@1", "finetune", {})], data=[DataSpec("docs@2", "train")])
    reg.import_adapter("c", lora_dir, "tiny", data=["nums@1"])
    reg.register_version("m", base="tiny", lora=lora, parents=[ParentSpec("a@2", "merge", {"method": "ties"}),
                                                               ParentSpec("c@1", "merge", {"method": "ties"})])
    reg.register_version("s", base="tiny", lora=lora, parents=[ParentSpec("b@1", "stack", {})])
    reg.register_version("e", base="tiny", lora=lora, data=[DataSpec("nums@1", "train"), DataSpec("docs@1", "eval")])
    reg.import_adapter("u", lora_dir, "tiny", data=["docs@2"])
    reg.set_alias("a", "production", 2, reason="release")
    reg.set_alias("s", "staging", 1)
    return reg


def test_reverse_lineage_follows_train_replay_finetune_merge_and_stack(portfolio_dag):
    uses = portfolio_dag.governance.uses("docs@1")
    by = {u.version: u for u in uses.uses}
    assert set(by) == {"a@1", "b@1", "a@2", "m@1", "s@1"}
    assert by["a@1"].edges == [{"via": "train", "source": "docs@1", "rows": 6}] and by["a@1"].depth == 0
    assert by["b@1"].edges == [{"via": "replay", "source": "docs@1", "rows": 2}]
    assert by["a@2"].edges == [{"via": "finetune", "source": "a@1", "rows": None}] and by["a@2"].depth == 1
    assert by["m@1"].edges == [{"via": "merge", "source": "a@2", "rows": None}] and by["m@1"].depth == 2
    assert by["s@1"].edges == [{"via": "stack", "source": "b@1", "rows": None}]
    assert [u.depth for u in uses.uses] == sorted(u.depth for u in uses.uses)  # nearest first
    portfolio_dag.routes.set("main", "b@1", {"tenant": "acme"})
    routed = {u.version: u.routes for u in portfolio_dag.governance.uses("docs@1").uses}
    assert routed["b@1"] == ["main: tenant=acme"] and routed["a@1"] == []
    portfolio_dag.routes.remove("main", {"tenant": "acme"})
    deployed = portfolio_dag.governance.uses("docs@1", deployed=True).uses
    assert [(u.version, u.aliases) for u in deployed] == [("s@1", ["staging"]), ("a@2", ["production"])] or \
        sorted((u.version, tuple(u.aliases)) for u in deployed) == [("a@2", ("production",)), ("s@1", ("staging",))]
    assert {u.version for u in portfolio_dag.governance.uses("nums@1").uses} == {"b@1", "c@1", "e@1", "m@1", "s@1"}
    assert not uses.revoked and not portfolio_dag.list_versions(adapter="a")[0].tainted


def test_reverse_lineage_is_one_walk_whatever_the_depth(registry_with_base, lora_dir, write_jsonl):
    from tests.test_registry import _chain

    reg = registry_with_base
    _chain(reg, lora_dir, write_jsonl, 10)
    counts = []
    for ref in ("docs@9", "docs@1"):  # two versions downstream, then ten
        statements = []
        listener = lambda *args: statements.append(args[2])  # noqa: E731
        sa.event.listen(reg.engine, "before_cursor_execute", listener)
        try:
            found = reg.governance.uses(ref)
        finally:
            sa.event.remove(reg.engine, "before_cursor_execute", listener)
        counts.append(len(statements))
    # py@1 trained on docs@1 and py@2 replayed it; the rest inherit through finetune edges
    assert len(found.uses) == 10 and [u.depth for u in found.uses] == [0, 0] + list(range(1, 9))
    assert counts[0] == counts[1], f"data uses issued {counts} statements for 2 and 10 versions"


def test_revoke_taints_descendants_and_blocks_their_promotion(portfolio_dag):
    reg = portfolio_dag
    with pytest.raises(InvalidState, match="needs --reason"):
        reg.governance.revoke("docs@1", "  ")
    event, uses = reg.governance.revoke("docs@1", "licence withdrawn by the publisher", who="alice@host")
    assert (event.action, event.actor, event.snapshot) == ("revoke", "alice@host", "docs@1")
    assert len(uses.uses) == 5 and uses.revoked
    with pytest.raises(InvalidState, match="already revoked .* alice@host: licence withdrawn"):
        reg.governance.revoke("docs@1", "again")
    snap = reg.data.get("docs@1")
    assert snap.revoked and snap.revoked_by == "alice@host" and snap.revoke_reason == "licence withdrawn by the publisher"
    assert not snap.purged
    tainted = {v.ref: v.tainted_by for v in reg.list_versions() if v.tainted}
    assert tainted == {r: ["docs@1"] for r in ("a@1", "b@1", "a@2", "m@1", "s@1")}
    assert not reg.get_version("c@1").tainted and not reg.get_version("e@1").tainted
    lin = reg.lineage("m@1")
    assert {v.ref for v in lin.versions if v.tainted} == {"m@1", "a@2", "a@1"}
    assert [d.revoked for d in lin.data if d.snapshot == "docs@1"] == [True]
    # alias moves, routes and promotions refuse it; an override needs a reason and is recorded
    with pytest.raises(DataRevoked, match="m@1 is tainted: it descends from revoked data docs@1"):
        reg.set_alias("m", "production", 1)
    with pytest.raises(InvalidState, match="needs --reason"):
        reg.set_alias("m", "production", 1, force=True)
    with pytest.raises(InvalidState, match="tainted by revoked data docs@1"):
        reg.routes.set("main", "m@1")
    from portfolio.evaluation.promote import promote

    with pytest.raises(DataRevoked, match="a@1 is tainted"):
        promote(reg, "a@1", "canary", log=lambda *_: None)
    refused = reg.alias_history("a", "canary")[-1]
    assert refused.action == "refused" and "revoked data docs@1" in refused.reason
    e = reg.set_alias("m", "production", 1, reason="legal signed off on a 7-day grace period", force=True)
    assert e.forced and reg.alias_history("m")[-1].reason.startswith("legal signed off")
    # clean versions move as before
    reg.set_alias("c", "production", 1)
    kinds = [ev.kind for ev in reg.events.since()[0]]
    assert "revoke" in kinds


def test_rollback_to_a_tainted_version_needs_force(portfolio_dag):
    reg = portfolio_dag
    reg.set_alias("a", "production", 1, reason="back to the first")  # history: 2, then 1
    reg.set_alias("a", "production", 2, reason="forward again")
    reg.governance.revoke("docs@1", "personal data found")  # a@1 and a@2 both tainted now
    with pytest.raises(DataRevoked, match="the version before, is tainted"):
        reg.rollback("a", "production")
    e = reg.rollback("a", "production", reason="incident: need yesterday's", force=True)
    assert e.forced


def test_revoked_data_is_never_trained_on_or_replayed(trainable, tmp_path):
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import plan_training, train_adapter

    fast = dict(batch_size=4, seq_len=32, lr=2e-2, checkpoint_every=5, steps=6)
    train_adapter(trainable, TrainConfig(adapter="w", base="tiny", data="words@1", **fast), log=lambda *_: None, progress=False)
    train_adapter(trainable, TrainConfig(adapter="n", base="tiny", data="numbers@1", **fast), log=lambda *_: None, progress=False)
    trainable.governance.revoke("words@1", "licence problem")
    with pytest.raises(DataRevoked, match="words@1 was revoked .* cannot be used for training or replay"):
        plan_training(trainable, TrainConfig(adapter="x", base="tiny", data="words@1", **fast))
    with pytest.raises(DataRevoked, match="words@1 was revoked"):
        plan_training(trainable, TrainConfig(adapter="n", data="numbers@1", replay_from=["words@1"], replay_ratio=0.25, **fast))
    # continuing w (trained on words@1) on fresh data: words@1 is not replayed, and the child is tainted
    logs = []
    out = train_adapter(trainable, TrainConfig(adapter="w", data="numbers@1", replay_ratio=0.25, **fast), log=logs.append, progress=False)
    assert any("not replaying words@1: revoked" in line for line in logs)
    assert any("w@1 is tainted" in line for line in logs)
    lin = trainable.lineage(out.version.ref)
    assert not [d for d in lin.data if d.version == out.version.ref and d.snapshot == "words@1"]
    assert out.version.ref == "w@2" and trainable.get_version("w@2").tainted_by == ["words@1"]
    assert {e["snapshot"] for e in out.evaluations} == {"numbers@1"}  # no retention check on revoked rows
    # the one door refuses it too, whoever calls it
    from portfolio.adapter_files import read_lora_folder

    with pytest.raises(DataRevoked, match="cannot be replayed on it"):
        trainable.register_version("z", base="tiny", lora=read_lora_folder(export_version(trainable, "n@1", tmp_path / "n1", card=False)),
                                   data=[DataSpec("numbers@1", "train"), DataSpec("words@1", "replay", [0])])
    assert [v.ref for v in trainable.list_versions() if v.adapter == "z"] == []


def test_retention_set_drops_a_revoked_snapshot(trainable, lora_dir):
    from portfolio.data.splits import split_rows

    trainable.import_adapter("w", lora_dir, "tiny")

    first = trainable.retention.build("w", ["words@1", "numbers@1"], size=16, seed=1)
    assert {ref for ref, _ in first.strata} == {"words@1", "numbers@1"}
    trainable.governance.revoke("words@1", "withdrawn")
    second = trainable.retention.build("w", ["numbers@1"], size=16, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert [ref for ref, _ in second.strata] == ["numbers@1"]
    assert second.n_rows == min(16, len(split_rows(trainable.data.rows("numbers@1"))[1]))


def test_purge_deletes_the_bytes_and_keeps_the_record(portfolio_dag, write_jsonl):
    reg = portfolio_dag
    snap = reg.data.get("docs@1")
    blobs = [f["sha256"] for f in snap.files] + [snap.rows_digest]
    assert all(reg.store.exists(d) for d in blobs)
    with pytest.raises(InvalidState, match="docs@1 is not revoked; revoke it first"):
        reg.governance.purge(["docs@1"])
    reg.governance.revoke("docs@1", "personal data found in rows 3-5")
    [event] = reg.governance.purge(["docs@1"], reason="GDPR erasure request 2026-118")
    assert event.action == "purge" and event.detail["bytes"] > 0 and set(event.detail["blobs"]) == set(blobs)
    assert not any(reg.store.exists(d) for d in blobs)
    purged = reg.data.get("docs@1")
    assert purged.purged and purged.sha256 == snap.sha256 and purged.row_count == 6 and purged.license == "CC-BY-4.0"
    with pytest.raises(DataRevoked, match=f"docs@1 was purged .* only its sha256 {snap.sha256[:12]}"):
        reg.data.rows("docs@1")
    with pytest.raises(InvalidState, match="already purged"):
        reg.governance.purge(["docs@1"])
    # lineage still names what was used, down to the sha256
    from portfolio.lineage_format import render_tree

    tree = render_tree(reg.lineage("a@2"))
    assert f"docs@1 [python] sha256 {snap.sha256}" in tree and "PURGED" in tree and "TAINTED by docs@1" in tree
    report = reg.verify()
    assert report.problems == []
    assert [i for i in reg.gc(dry_run=True, min_age=0).items if i.get("digest") in blobs] == []
    # the same bytes cannot come back under the same name
    with pytest.raises(DataRevoked, match="revoked data is not registered again"):
        reg.data.add("docs", [write_jsonl("docs1.jsonl", [{"text": f"doc row {i}"} for i in range(6)])], "python")


def test_purge_refuses_bytes_shared_with_a_snapshot_that_stays(portfolio_dag, write_jsonl):
    reg = portfolio_dag
    rows = [{"text": f"doc row {i}"} for i in range(6)]
    reg.data.add("mirror", [write_jsonl("docs1.jsonl", rows)], "python")  # the same bytes under another name
    reg.governance.revoke("docs@1", "withdrawn")
    with pytest.raises(InvalidState, match="mirror@1 holds identical bytes .* purge docs@1 mirror@1"):
        reg.governance.purge(["docs@1"])
    assert reg.store.exists(reg.data.get("mirror@1").rows_digest)
    reg.governance.revoke("mirror@1", "same file")
    events = reg.governance.purge(["docs@1", "mirror@1"])
    assert [e.snapshot for e in events] == ["docs@1", "mirror@1"]
    assert not reg.store.exists(reg.data.get("mirror@1").rows_digest)


def test_a_purge_killed_before_deleting_leaves_bytes_that_gc_removes(portfolio_dag):
    reg = portfolio_dag
    reg.governance.revoke("docs@1", "withdrawn")
    with reg.transaction() as session:  # what purge commits, as if the process died right after
        snaps, digests = plan_purge(session, ["docs@1"])
        record_purge(session, snaps, digests, "killed")
    assert all(reg.store.exists(d) for d in digests)
    report = reg.gc(min_age=0)
    assert {i["digest"] for i in report.items} >= set(digests)
    assert not any(reg.store.exists(d) for d in digests) and reg.verify().problems == []


def test_governance_cli(portfolio_dag, db_url, store_dir):
    invoke = cli_invoker(db_url, store_dir)
    out = invoke("data", "uses", "docs@1").output
    assert "docs@1" in out and "5 versions downstream, 2 deployed" in out and "SERVED AS" in out and "replay docs@1 (2 rows)" in out
    assert "merge a@2" in out
    dot = invoke("data", "uses", "docs@1", "--format", "dot").output
    assert dot.startswith("digraph uses") and '"a@1" -> "a@2" [label="finetune"]' in dot
    mermaid = invoke("data", "uses", "docs@1", "--deployed", "--format", "mermaid").output
    assert mermaid.startswith("flowchart BT") and "a@2" in mermaid and "m@1" not in mermaid
    data = json.loads(invoke("data", "uses", "docs@1", "--json").output)
    assert data["snapshot"] == "docs@1" and len(data["uses"]) == 5
    bad = invoke("data", "revoke", "docs@1", ok=False)
    assert bad.exit_code != 0 and "--reason" in bad.output
    out = invoke("data", "revoke", "docs@1", "--reason", "licence withdrawn").output
    assert "revoked docs@1" in out and "5 version(s) now tainted" in out
    result = invoke("data", "revoke", "docs@1", "--reason", "x", ok=False)
    assert result.exit_code == 1 and "already revoked" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "(TAINTED)" in invoke("list", "--adapter", "a").output
    assert "TAINTED: descends from revoked data docs@1" in invoke("show", "a@2").output
    refused = invoke("alias", "set", "m", "production", "1", ok=False)
    assert refused.exit_code == 1 and "tainted" in refused.stderr
    assert "revoked" in invoke("data", "list").output
    out = invoke("data", "purge", "docs@1", "--reason", "erasure").output
    assert "purged docs@1" in out and "sha256" in out
    events = invoke("data", "events").output
    assert "revoke" in events and "purge" in events and "licence withdrawn" in events
    assert "PURGED" in invoke("lineage", "a@1").output


# -- reliability round 3: purge never deletes bytes another record uses ---------------------


def test_purge_refuses_bytes_a_suite_holds_and_verify_names_a_lost_reference(registry_with_base, tmp_path):
    """A file that is both a valid suite and a valid dataset, added as both: purging the
    dataset must not take the suite's bytes; and if the bytes go anyway, verify says so."""
    reg = registry_with_base
    both = tmp_path / "both.jsonl"
    turns = [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    both.write_text(json.dumps({"id": "c1", "messages": turns, "checks": [{"kind": "contains", "value": "hi"}]}) + "\n")
    snap, _ = reg.data.add("chat", [both], "chat")
    suite, _ = reg.suites.add("greet", both)
    assert suite.sha256 == snap.sha256
    reg.governance.revoke("chat@1", "withdrawn")
    with pytest.raises(InvalidState, match="suite greet@1 holds identical bytes .*suites are never retired"):
        reg.governance.purge(["chat@1"])
    assert reg.store.exists(suite.sha256) and len(reg.suites.cases("greet@1").cases) == 1
    assert reg.verify().problems == []
    # the bytes lost behind the registry's back (as the old purge did): verify names the suite,
    # even though the blob's artifacts row says it was removed on purpose
    with reg._write() as (session, _put):
        from portfolio.registry.models import ArtifactRow
        from portfolio.registry.models import utcnow

        session.get(ArtifactRow, suite.sha256).removed_at = utcnow()
    reg.store.delete(suite.sha256)
    problems = reg.verify().problems
    assert [(p["digest"], p["state"]) for p in problems] == [(suite.sha256, "missing")]
    assert "suite greet@1" in problems[0]["used_by"]


def test_purge_refuses_bytes_of_a_versions_config_until_it_is_archived(registry_with_base, lora_dir, tmp_path):
    """A .txt dataset whose bytes equal a version's stored config blob."""
    reg = registry_with_base
    version = reg.import_adapter("a", lora_dir, "tiny")
    with reg._read() as session:
        from portfolio.registry.models import AdapterVersionRow

        config_digest = session.scalar(sa.select(AdapterVersionRow.config_digest).where(
            AdapterVersionRow.artifact_digest == version.artifact_digest))
    config_bytes = reg.store.read_bytes(config_digest)
    txt = tmp_path / "config.txt"
    txt.write_bytes(config_bytes)
    snap, _ = reg.data.add("cfg", [txt], "misc")
    assert snap.files[0]["sha256"] == config_digest
    reg.governance.revoke("cfg@1", "withdrawn")
    with pytest.raises(InvalidState, match="a@1 holds identical bytes .*archive it first"):
        reg.governance.purge(["cfg@1"])
    assert reg.store.exists(config_digest)
    export_version(reg, "a@1", tmp_path / "out", card=False)  # the version still reads its config
    reg.deprecate("a@1", reason="retired")
    reg.archive("a@1")
    reg.governance.purge(["cfg@1"])
    assert not reg.store.exists(config_digest) and reg.verify().problems == []


def test_purge_racing_a_writer_of_the_same_bytes_keeps_them(registry_with_base, db_url, store_dir, write_jsonl, monkeypatch):
    """`data add` of the same bytes (another name) committing while purge deletes: the new
    snapshot keeps its blobs. The delete is slowed and the writer given time to commit in the
    window; under the row-lock protocol it waits instead, then writes the bytes back."""
    import threading

    from portfolio import Registry

    reg = registry_with_base
    path = write_jsonl("same.jsonl", [{"text": f"row {i}"} for i in range(5)])
    snap, _ = reg.data.add("old", [path], "x")
    reg.governance.revoke("old@1", "withdrawn")
    other = Registry.open(db_url, store_dir)
    done: list = []
    writer = threading.Thread(target=lambda: done.append(other.data.add("new", [path], "x")[0]))
    real_delete = reg.store.delete

    def slow_delete(digest):
        if not writer.is_alive() and not done:
            writer.start()
            writer.join(timeout=2.0)  # the old purge held no lock here: the writer committed
        return real_delete(digest)

    monkeypatch.setattr(reg.store, "delete", slow_delete)
    reg.governance.purge(["old@1"])
    writer.join(timeout=60)
    assert done, "the concurrent data add did not finish"
    new = done[0]
    other.close()
    assert new.sha256 == snap.sha256
    assert reg.store.exists(new.rows_digest) and reg.store.exists(new.files[0]["sha256"])
    assert len(reg.data.rows("new@1")) == 5
    assert reg.verify().problems == []
