"""The Python API, on SQLite and PostgreSQL."""

import hashlib
import json

import pytest
import sqlalchemy as sa

from portfolio import DataSpec, ParentSpec, Registry
from tests.conftest import corrupt_blob
from portfolio.errors import (
    AdapterNotFound,
    AlreadyExists,
    DatasetNotFound,
    IncompatibleAdapter,
    InvalidAdapter,
    InvalidState,
    SchemaOutOfDate,
)
from portfolio.registry import db
from portfolio.export import export_version


def blobs(store_dir):
    """Every blob in the store (a folder or an S3 bucket)."""
    from portfolio.store import open_store

    return sorted(open_store(store_dir).digests())


def test_base_registration_is_idempotent_and_guarded(registry, tiny_base, other_base):
    base, created = registry.bases.add("tiny", tiny_base)
    assert created and base.architecture == "LlamaForCausalLM"
    assert base.n_modules == 2 * 7 + 1  # q,k,v,o,gate,up,down per layer, plus lm_head
    again, created = registry.bases.add("tiny", tiny_base)
    assert not created and again.weights_sha256 == base.weights_sha256
    with pytest.raises(AlreadyExists, match="already registered with other weights"):
        registry.bases.add("tiny", other_base)
    weights = tiny_base / "model.safetensors"
    assert base.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_dataset_snapshots_are_content_addressed(registry, write_jsonl):
    path = write_jsonl("docs.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    snap, created = registry.data.add("docs", [path], "python")
    assert created and snap.version == 1 and snap.row_count == 2
    assert snap.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    same, created = registry.data.add("docs", [path], "python")
    assert not created and same.version == 1
    path2 = write_jsonl("docs2.jsonl", [{"text": "gamma"}])
    snap2, created = registry.data.add("docs", [path2], "python")
    assert created and snap2.version == 2
    assert [r["data"]["text"] for r in registry.data.rows("docs@1")] == ["alpha", "beta"]
    assert registry.data.get("docs").version == 2
    # the original file's bytes are kept, addressed by the sha256 users see
    assert registry.store.read_bytes(snap.sha256) == path.read_bytes()


def test_bad_dataset_writes_nothing(registry, write_jsonl, store_dir):
    bad = write_jsonl("bad.jsonl", ['{"text": "fine"}', "{broken"])
    with pytest.raises(Exception, match="line 2"):
        registry.data.add("docs", [bad], "python")
    assert registry.data.list() == [] and blobs(store_dir) == []


def test_import_records_version_artifact_and_data(registry_with_base, lora_dir, write_jsonl):
    reg = registry_with_base
    reg.data.add("docs", [write_jsonl("d.jsonl", [{"text": "x"}])], "python")
    v1 = reg.import_adapter("py", lora_dir, "tiny", data=["docs@1"])
    assert (v1.ref, v1.status, v1.rank, v1.alpha, v1.domain) == ("py@1", "candidate", 4, 8.0, "python")
    assert v1.target_modules == ["q_proj", "v_proj"]
    assert v1.artifact_digest == hashlib.sha256((lora_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert v1.n_params == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q: 32->32, v: 32->16 (GQA), two layers
    v2 = reg.import_adapter("py", lora_dir, "tiny")
    assert v2.version == 2 and v2.artifact_digest == v1.artifact_digest  # stored once


def test_adapter_for_another_base_is_refused_and_nothing_written(registry, tiny_base, other_base, lora_dir, store_dir):
    registry.bases.add("other", other_base)
    before = blobs(store_dir)
    with pytest.raises(IncompatibleAdapter, match=r"q_proj is \[out=32, in=32\] but base 'other' has \[out=48, in=48\]"):
        registry.import_adapter("py", lora_dir, "other")
    assert blobs(store_dir) == before
    with pytest.raises(AdapterNotFound):
        registry.get_version("py")


def test_failed_transaction_removes_new_blobs(registry_with_base, lora_dir, store_dir):
    # an unknown dataset is found only inside the transaction, after the artifact was stored
    before = blobs(store_dir)
    with pytest.raises(DatasetNotFound):
        registry_with_base.import_adapter("py", lora_dir, "tiny", data=["nope@1"])
    assert blobs(store_dir) == before
    assert registry_with_base.list_versions() == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "adapter_config.json").unlink(), "has no adapter_config.json"),
        (lambda d: (d / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
        (lambda d: _edit_config(d, peft_type="IA3"), "only LORA"),
        (lambda d: _edit_config(d, use_dora=True), "no lora_magnitude_vector but use_dora is set"),
        (lambda d: _poison(d), "NaN or inf"),
    ],
    ids=["no-config", "no-weights", "not-lora", "dora", "nan"],
)
def test_malformed_adapter_folders(registry_with_base, lora_dir, tmp_path, mutate, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(lora_dir, folder)
    mutate(folder)
    with pytest.raises(InvalidAdapter, match=message):
        registry_with_base.import_adapter("py", folder, "tiny")


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _poison(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")


def _chain(reg, lora_dir, write_jsonl, n):
    from portfolio.adapter_files import read_lora_folder

    lora = read_lora_folder(lora_dir)
    reg.data.add("docs", [write_jsonl("d1.jsonl", [{"text": f"row {i}"} for i in range(5)])], "python")
    reg.import_adapter("py", lora_dir, "tiny", data=["docs@1"])
    for i in range(2, n + 1):
        reg.data.add("docs", [write_jsonl(f"d{i}.jsonl", [{"text": f"drop {i} row {j}"} for j in range(3)])], "python")
        reg.register_version(
            "py", base="tiny", lora=lora,
            parents=[ParentSpec(f"py@{i - 1}", "finetune", {"lr": 1e-4})],
            data=[DataSpec(f"docs@{i}", "train"), DataSpec(f"docs@{i - 1}", "replay", [0, 2])],
        )


def test_lineage_walks_every_ancestor_with_data(registry_with_base, lora_dir, write_jsonl):
    reg = registry_with_base
    _chain(reg, lora_dir, write_jsonl, 3)
    lin = reg.lineage("py@3")
    assert lin.root == "py@3"
    assert [v.ref for v in lin.versions] == ["py@3", "py@2", "py@1"]
    assert {(p.child, p.parent, p.relation) for p in lin.parents} == {("py@3", "py@2", "finetune"), ("py@2", "py@1", "finetune")}
    roles = {(d.version, d.snapshot, d.role) for d in lin.data}
    assert ("py@1", "docs@1", "train") in roles and ("py@3", "docs@2", "replay") in roles
    replay = next(d for d in lin.data if d.version == "py@3" and d.role == "replay")
    assert replay.row_ids == [0, 2] and replay.n_rows == 2
    assert lin.base_model.name == "tiny"


def test_lineage_is_a_constant_number_of_queries(registry_with_base, lora_dir, write_jsonl):
    reg = registry_with_base
    _chain(reg, lora_dir, write_jsonl, 12)
    counts = []
    for ref in ("py@2", "py@12"):
        statements = []
        listener = lambda *args: statements.append(args[2])  # noqa: E731
        sa.event.listen(reg.engine, "before_cursor_execute", listener)
        try:
            reg.lineage(ref)
        finally:
            sa.event.remove(reg.engine, "before_cursor_execute", listener)
        counts.append(len(statements))
    assert counts[0] == counts[1], f"lineage issued {counts} statements for 2 and 12 hops"


def test_lineage_of_a_diamond_lists_each_ancestor_once(registry_with_base, lora_dir):
    from portfolio.adapter_files import read_lora_folder

    reg, lora = registry_with_base, read_lora_folder(lora_dir)
    reg.import_adapter("a", lora_dir, "tiny")
    reg.register_version("b", base="tiny", lora=lora, parents=[ParentSpec("a@1", "finetune", {})])
    reg.register_version("c", base="tiny", lora=lora, parents=[ParentSpec("a@1", "finetune", {})])
    reg.register_version("m", base="tiny", lora=lora, parents=[ParentSpec("b@1", "merge", {"method": "cat"}), ParentSpec("c@1", "merge", {"method": "cat"})])
    lin = reg.lineage("m")
    assert sorted(v.ref for v in lin.versions) == ["a@1", "b@1", "c@1", "m@1"]


def test_aliases_move_with_history(registry_with_base, lora_dir):
    reg = registry_with_base
    reg.import_adapter("py", lora_dir, "tiny")
    reg.import_adapter("py", lora_dir, "tiny")
    reg.set_alias("py", "production", 1, reason="first release")
    assert reg.get_version("py@production").version == 1
    assert reg.get_version("py@1").status == "active"
    e = reg.set_alias("py", "production", 2, reason="better loss")
    assert (e.from_version, e.to_version) == (1, 2)
    history = reg.alias_history("py")
    assert [(h.from_version, h.to_version, h.reason) for h in history] == [(None, 1, "first release"), (1, 2, "better loss")]
    reg.remove_alias("py", "production", reason="incident")
    with pytest.raises(AdapterNotFound, match="no alias 'production'"):
        reg.get_version("py@production")
    assert reg.alias_history("py")[-1].action == "remove"


def test_deprecated_version_needs_force_for_an_alias(registry_with_base, lora_dir):
    reg = registry_with_base
    reg.import_adapter("py", lora_dir, "tiny")
    reg.import_adapter("py", lora_dir, "tiny")
    v = reg.deprecate("py@1", "leaks test data", successor="py@2")
    assert (v.status, v.successor, v.status_reason) == ("deprecated", "py@2", "leaks test data")
    with pytest.raises(InvalidState, match="deprecated; it is replaced by py@2; pass --force"):
        reg.set_alias("py", "production", 1)
    e = reg.set_alias("py", "production", 1, reason="hotfix rollback", force=True)
    assert e.forced


def test_tags_filter_versions(registry_with_base, lora_dir):
    reg = registry_with_base
    reg.import_adapter("py", lora_dir, "tiny")
    reg.import_adapter("py", lora_dir, "tiny")
    reg.tag("py@2", {"team": "search", "tier": "gold"})
    assert [v.ref for v in reg.list_versions(tag=("team", "search"))] == ["py@2"]
    assert [v.ref for v in reg.list_versions(tag=("tier", None))] == ["py@2"]
    assert reg.list_versions(tag=("team", "ads")) == []


def test_export_loads_in_peft_and_reproduces_outputs(registry_with_base, lora_dir, tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    reg = registry_with_base
    reg.import_adapter("py", lora_dir, "tiny")
    out = export_version(reg, "py@1", tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    ids = torch.tensor([[1, 5, 9, 200, 3]])
    logits = []
    for folder in (lora_dir, out):
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), folder).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    base_logits = LlamaForCausalLM.from_pretrained(tiny_base).eval()(ids).logits
    assert torch.allclose(logits[0], logits[1])
    assert not torch.allclose(logits[0], base_logits, atol=1e-4)  # the adapter really changes the model
    with pytest.raises(InvalidAdapter, match="not an empty folder"):
        export_version(reg, "py@1", out)


def test_verify_names_damaged_artifacts(registry_with_base, lora_dir):
    reg = registry_with_base
    v = reg.import_adapter("py", lora_dir, "tiny")
    assert reg.verify().problems == []
    corrupt_blob(reg.store, v.artifact_digest)
    report = reg.verify()
    assert [(p["state"], p["used_by"]) for p in report.problems] == [("corrupt", "py@1")]


def test_out_of_date_schema_is_refused(db_url, store_dir):
    engine = db.create_engine(db_url)
    db.upgrade(engine)
    db.downgrade(engine, "base")
    engine.dispose()
    with pytest.raises(SchemaOutOfDate, match="run `portfolio init`"):
        Registry.open(db_url, store_dir)


def test_unknown_references_say_what_exists(registry_with_base, lora_dir):
    reg = registry_with_base
    with pytest.raises(AdapterNotFound, match="no adapter 'ghost'"):
        reg.get_version("ghost@1")
    reg.import_adapter("py", lora_dir, "tiny")
    with pytest.raises(AdapterNotFound, match="has no version 7"):
        reg.get_version("py@7")


def test_runs_record_environment_and_final_status(registry_with_base, lora_dir):
    reg = registry_with_base
    reg.import_adapter("py", lora_dir, "tiny")
    run = reg.runs.start("train", "py", {"lr": 1e-4, "rank": 8}, seed=7)
    assert run.status == "running" and run.adapter == "py" and run.seed == 7
    assert run.packages["torch"] and run.packages["peft"] and run.packages["python"]
    reg.runs.update(run.id, metrics={"loss": [3.1, 2.7]})
    done = reg.runs.update(run.id, status="succeeded", metrics={"tokens_per_s": 210.0})
    assert done.metrics == {"loss": [3.1, 2.7], "tokens_per_s": 210.0}
    assert done.finished_at is not None
    assert [r.id for r in reg.runs.list(status="succeeded")] == [run.id]
    with pytest.raises(InvalidState, match="unknown run status"):
        reg.runs.update(run.id, status="exploded")


def test_evaluations_are_stored_per_version_and_base(registry_with_base, lora_dir, write_jsonl):
    reg = registry_with_base
    reg.data.add("docs", [write_jsonl("d.jsonl", [{"text": "x"}])], "python")
    reg.import_adapter("py", lora_dir, "tiny")
    reg.evaluations.record("py@1", "docs@1", {"loss": 2.5, "accuracy": 0.4}, n_tokens=120)
    reg.evaluations.record("base:tiny", "docs@1", {"loss": 3.0})
    evals = reg.evaluations.list("py@1")
    assert [(e.model, e.snapshot, e.metric, e.value, e.n_tokens) for e in evals] == [
        ("py@1", "docs@1", "loss", 2.5, 120), ("py@1", "docs@1", "accuracy", 0.4, 120)
    ]
