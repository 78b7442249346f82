"""Merge, stack, generate, export of stacks, archive and gc, through the registry and the
CLI, on SQLite and PostgreSQL, with real PEFT loading of the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_invoker, make_lora


@pytest.fixture
def composed(trainable_any, db_url, store_dir, tiny_base, tmp_path):
    """Adapters a@1 (q,v r=4 α=8, trained on words@1), b@1 (q,v r=8 α=4 rsLoRA-free, numbers@1)
    and o@1 (o_proj only, r=2) on the tiny base."""
    reg = trainable_any
    reg.import_adapter("a", make_lora(tiny_base, tmp_path / "a", r=4, alpha=8, seed=1), "tiny", data=["words@1"])
    reg.import_adapter("b", make_lora(tiny_base, tmp_path / "b", r=8, alpha=4, seed=2), "tiny", data=["numbers@1"])
    reg.import_adapter("o", make_lora(tiny_base, tmp_path / "o", r=2, alpha=2, targets=("o_proj",), seed=3), "tiny")
    reg.run = cli_invoker(db_url, store_dir)
    return reg


def dense_model(tiny_base, updates: list[tuple[str, float]], reg):
    """The base with Σ w·s·B·A of each (ref, weight) added to its weights by hand."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_base).eval()
    params = dict(model.named_parameters())
    for ref, weight in updates:
        v = reg.get_version(ref)
        tensors = load_file(reg.store.verified_path(v.artifact_digest))
        scale = v.lora_config["lora_alpha"] / v.lora_config["r"]
        with torch.no_grad():
            for key, a in tensors.items():
                if key.endswith("lora_A.weight"):
                    b = tensors[key.replace("lora_A", "lora_B")]
                    module = key[len("base_model.model."):-len(".lora_A.weight")]
                    params[f"{module}.weight"] += weight * scale * (b @ a)
    return model


def logits_of(model) -> torch.Tensor:
    ids = torch.arange(5, 37).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_logits(tiny_base, folder) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return logits_of(PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), folder).eval())


def test_merge_records_recipe_run_and_inherited_provenance(composed):
    out = composed.run("merge", "ab", "--from", "a@1", "--from", "b@1", "--method", "ties", "--weights", "0.7,0.3",
                       "--density", "0.5", "--rank", "8", "--seed", "3", "--json").stdout
    merged = json.loads(out)
    assert merged["version"]["adapter"] == "ab" and merged["version"]["rank"] == 8
    assert 0 < merged["stats"]["reconstruction_error"] < 1
    lineage = json.loads(composed.run("lineage", "ab@1", "--format", "json").stdout)
    edges = [e for e in lineage["parents"] if e["child"] == "ab@1"]
    assert [(e["parent"], e["relation"], e["recipe"]["method"], e["recipe"]["weight"]) for e in edges] == [
        ("a@1", "merge", "ties", 0.7), ("b@1", "merge", "ties", 0.3)]
    assert edges[0]["recipe"]["density"] == 0.5 and edges[0]["recipe"]["seed"] == 3
    assert edges[0]["recipe"]["reconstruction_error"] == pytest.approx(merged["stats"]["reconstruction_error"])
    assert sorted(d["snapshot"] for d in lineage["data"]) == ["numbers@1", "words@1"]
    run = composed.runs.get(composed.get_version("ab@1").run_id)
    assert run.kind == "merge" and run.status == "succeeded" and run.metrics["rank"] == 8
    tree = composed.run("lineage", "ab@1").stdout
    assert "merge (ties, w=0.7) ← a@1" in tree


def test_exact_merge_with_negative_weight_loads_in_peft_and_equals_dense(composed, tiny_base, tmp_path):
    composed.run("merge", "diff", "--from", "a@1", "--from", "b@1", "--method", "linear", "--weights", "1,-1")
    assert composed.get_version("diff@1").rank == 12  # exact: 4 + 8
    composed.run("export", "diff@1", tmp_path / "diff")
    want = logits_of(dense_model(tiny_base, [("a@1", 1.0), ("b@1", -1.0)], composed))
    torch.testing.assert_close(peft_logits(tiny_base, tmp_path / "diff"), want, rtol=1e-4, atol=1e-4)


def test_stacked_version_equals_base_with_summed_updates(composed, tiny_base, tmp_path):
    from transformers import LlamaForCausalLM

    from portfolio.serving import activate, attach

    composed.run("stack", "combo", "--from", "a@1", "--from", "o@1", "--weights", "0.5,2")
    combo = composed.get_version("combo@1")
    assert combo.kind == "stack" and combo.artifact_digest is None and combo.rank == 6
    want = logits_of(dense_model(tiny_base, [("a@1", 0.5), ("o@1", 2.0)], composed))

    model, names = attach(LlamaForCausalLM.from_pretrained(tiny_base), composed, "combo@1", tmp_path / "work")
    activate(model, names)
    assert len(names) == 2 and sorted(model.base_model.active_adapters) == sorted(names)
    torch.testing.assert_close(logits_of(model.eval()), want, rtol=1e-4, atol=1e-4)

    composed.run("export", "combo@1", tmp_path / "combo")  # one adapter: the exact cat merge
    config = json.loads((tmp_path / "combo" / "adapter_config.json").read_text())
    assert config["r"] == 4  # per layer: q, v have 4; o_proj has 2, zero-padded
    assert sorted(config["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    torch.testing.assert_close(peft_logits(tiny_base, tmp_path / "combo"), want, rtol=1e-4, atol=1e-4)
    shown = composed.run("show", "combo@1").stdout
    assert "0.5·a@1 + 2·o@1" in shown


def test_generate_works_for_single_merged_and_stacked_versions(composed):
    composed.run("merge", "ab", "--from", "a@1", "--from", "b@1", "--method", "svd", "--rank", "4")
    composed.run("stack", "s", "--from", "a@1", "--from", "b@1")
    composed.run("merge", "cat", "--from", "a@1", "--from", "b@1", "--method", "cat")
    texts = {}
    for ref in ["a@1", "ab@1", "s@1", "cat@1", "base:tiny"]:
        out = json.loads(composed.run("generate", ref, "hello there", "--max-new-tokens", "6", "--json").stdout)
        assert out["new_tokens"] > 0
        texts[ref] = out["text"]
    assert texts["s@1"] == texts["cat@1"]  # a stack serves exactly its cat merge
    assert texts["a@1"] != texts["base:tiny"]


def test_eval_scores_a_stack_and_reuses_the_score(composed):
    composed.run("stack", "s", "--from", "a@1", "--from", "o@1")
    first = json.loads(composed.run("eval", "s@1", "--data", "words@1", "--json").stdout)
    again = json.loads(composed.run("eval", "s@1", "--data", "words@1", "--json").stdout)
    assert first[0]["reused"] is False and again[0]["reused"] is True
    assert again[0]["loss"] == pytest.approx(first[0]["loss"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "a@1", "--from", "o@1"], "stack them instead"),
        (["--from", "a@1", "--from", "b@1", "--weights", "1"], "1 weights for 2 adapters"),
        (["--from", "a@1", "--from", "b@1", "--weights", "1,x"], "not a comma-separated list"),
        (["--from", "a@1", "--from", "nope@1"], "nope"),
        (["--from", "a@1", "--from", "b@1", "--method", "cat", "--rank", "4"], "cat is exact"),
        (["--from", "a@1", "--from", "b@1", "--weights", "1e38,1e38"], "weights must be finite numbers between"),
    ],
    ids=["modules", "weights", "weights-syntax", "unknown-ref", "cat-rank", "overflow"],
)
def test_bad_merges_fail_with_one_line_and_leave_nothing(composed, args, message):
    before = (len(composed.list_versions()), sorted(composed.store.digests()))
    result = composed.run("merge", "bad", *args, "--no-progress", ok=False)
    assert result.exit_code != 0 and message in result.output
    assert (len(composed.list_versions()), sorted(composed.store.digests())) == before
    assert all(r.status != "running" for r in composed.runs.list())


def test_merge_refuses_adapters_of_another_base(composed, other_base, tmp_path):
    composed.bases.add("other", other_base)
    composed.import_adapter("x", make_lora(other_base, tmp_path / "x", seed=5), "other")
    result = composed.run("merge", "bad", "--from", "a@1", "--from", "x@1", ok=False)
    assert result.exit_code == 1 and "different weights" in result.output


def test_archive_keeps_records_and_lineage_and_frees_bytes(composed, tmp_path):
    composed.run("merge", "ab", "--from", "a@1", "--from", "b@1", "--method", "linear")
    composed.run("alias", "set", "a", "production", "1")
    refused = composed.run("archive", "a@1", ok=False)
    assert refused.exit_code == 1 and "move the alias first" in refused.output
    composed.run("alias", "remove", "a", "production")
    refused = composed.run("archive", "a@1", ok=False)
    assert "deprecate it first" in refused.output
    composed.run("deprecate", "a@1", "--reason", "folded into ab", "--successor", "ab@1")
    assert "replaced by ab@1" in composed.run("alias", "set", "a", "staging", "1", ok=False).output

    weights = composed.get_version("a@1").artifact_digest
    out = json.loads(composed.run("archive", "a@1", "--reason", "retired", "--json").stdout)
    assert out["version"]["status"] == "archived" and weights in [r["digest"] for r in out["removed"]]
    assert not composed.store.exists(weights)
    assert composed.run("verify").exit_code == 0  # removed on purpose is not "missing"
    tree = composed.run("lineage", "ab@1").stdout
    assert "a@1" in tree and "[archived]" in tree and "words@1" in tree
    assert "archived" in composed.run("export", "a@1", tmp_path / "x", ok=False).output
    assert "archived" in composed.run("merge", "z", "--from", "a@1", ok=False).output
    assert "already archived" in composed.run("archive", "a@1", ok=False).output
    assert composed.evaluations.list("a@1") == composed.evaluations.list("a@1")  # still readable


def test_archive_refuses_a_part_of_a_live_stack(composed):
    composed.run("stack", "s", "--from", "a@1", "--from", "o@1")
    result = composed.run("archive", "o@1", "--force", ok=False)
    assert result.exit_code == 1 and "part of the live stack s@1" in result.output


def test_shared_bytes_survive_until_the_last_user_is_archived(composed, tiny_base, tmp_path):
    lora_dir = make_lora(tiny_base, tmp_path / "twin", seed=9)
    composed.import_adapter("twin1", lora_dir, "tiny")
    composed.import_adapter("twin2", lora_dir, "tiny")
    digest = composed.get_version("twin1@1").artifact_digest
    out = json.loads(composed.run("archive", "twin1@1", "--force", "--json").stdout)
    assert [k["digest"] for k in out["kept"] if k["digest"] == digest] and composed.store.exists(digest)
    assert "twin2@1" in [k for k in out["kept"] if k["digest"] == digest][0]["needed_by"]
    composed.run("archive", "twin2@1", "--force")
    assert not composed.store.exists(digest)
    # importing the same bytes again writes them back
    composed.import_adapter("twin3", lora_dir, "tiny")
    assert composed.store.exists(digest)
    assert composed.run("verify").exit_code == 0


def test_gc_lists_then_removes_leftovers_only(composed):
    orphan, _ = composed.store.put_bytes(b"left behind by a killed writer")
    tmp = Path(composed.store.stage(b"partial").tmp)  # a writer killed between staging and committing
    live = set(composed.store.digests()) - {orphan}

    young = json.loads(composed.run("gc", "--dry-run", "--json").stdout)
    assert young["items"] == []  # within the grace period: a write may be in flight
    dry = json.loads(composed.run("gc", "--dry-run", "--min-age", "0", "--json").stdout)
    assert {i["type"] for i in dry["items"]} == {"unrecorded", "temp"} and composed.store.exists(orphan)
    composed.run("gc", "--min-age", "0")
    assert not composed.store.exists(orphan) and not tmp.exists()
    assert set(composed.store.digests()) == live
    assert composed.run("verify").exit_code == 0


def test_gc_finishes_an_archive_cut_short_and_clears_finished_run_folders(composed):
    from portfolio.registry import lifecycle

    composed.run("merge", "ab", "--from", "a@1", "--from", "b@1")
    with composed.transaction() as session:  # archived, killed before its bytes were removed
        lifecycle.mark_archived(session, "b@1", "cut short", force=True)
    digest = composed.get_version("b@1").artifact_digest
    merge_run = composed.get_version("ab@1").run_id
    workdir = composed.store.work_dir(merge_run)
    (workdir / "checkpoint.safetensors").write_bytes(b"x" * 100)
    composed.store.push_work(merge_run, workdir / "checkpoint.safetensors")

    dry = json.loads(composed.run("gc", "--dry-run", "--json").stdout)
    assert {(i["type"], i["digest"]) for i in dry["items"]} >= {("artifact", digest), ("run-workdir", f"{composed.store.url}/work/runs/{merge_run}")}
    assert composed.store.exists(digest) and workdir.exists() and merge_run in composed.store.work_runs()
    composed.run("gc")
    assert not composed.store.exists(digest) and not workdir.exists() and merge_run not in composed.store.work_runs()
    assert composed.run("verify").exit_code == 0
    assert json.loads(composed.run("gc", "--dry-run", "--json").stdout)["items"] == []
