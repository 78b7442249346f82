"""Training on the tiny model: learning, replay provenance, KL, resume, determinism."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from portfolio.data.splits import split_rows
from portfolio.errors import InvalidState
from portfolio.training.config import InvalidTrainConfig, TrainConfig
from portfolio.training.train import train_adapter
from portfolio.export import export_version
from tests.conftest import checkpoints

FAST = dict(batch_size=4, seq_len=32, lr=2e-2, checkpoint_every=5)


def quiet(*_):
    pass


def train(reg, **kw):
    cfg = TrainConfig(**{**FAST, **kw})
    return train_adapter(reg, cfg, log=quiet, progress=False)


def weights(reg, ref):
    return load_file(reg.store.verified_path(reg.get_version(ref).artifact_digest))


def assert_trained_alike(a: dict, b: dict, start: dict, within: float = 1e-3):
    """Two runs that must compute the same steps by different routes (one big batch or
    accumulated micro-batches, one process or several) land on the same weights: per tensor,
    ‖a − b‖ ≤ within · ‖a − start‖. Element-wise tolerances flake here: the routes round
    differently, and Adam turns rounding noise in near-zero gradients into whole steps,
    by an amount that varies with the CPU's kernels. Measured: 4e-6 of the update for float
    noise, 0.77 for a mis-weighted accumulation."""
    assert a.keys() == b.keys() == start.keys()
    for k in a:
        moved, apart = float((a[k] - start[k]).norm()), float((a[k] - b[k]).norm())
        assert moved > 0, f"{k} did not train"
        assert apart <= within * moved, f"{k}: the runs are {apart:.3g} apart, {apart / moved:.2g} of the update"


def straight_and_resumed(reg, stop_at: int = 5, **settings):
    """The stored weights of a run trained straight through and of the same run interrupted
    (Ctrl-C) after step ``stop_at`` and resumed with `--resume`."""
    import pytest

    from portfolio.errors import InvalidState

    straight = train(reg, adapter="straight", **settings)

    def stop(step, _stats):
        if step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(InvalidState, match="--resume"):
        train_adapter(reg, TrainConfig(**{**FAST, "adapter": "resumed", **settings}), log=quiet, progress=False, on_step=stop)
    [run] = reg.runs.list(adapter="resumed")
    resumed = train_adapter(reg, resume=run.id, log=quiet, progress=False)
    return weights(reg, straight.version.ref), weights(reg, resumed.version.ref)


def test_loss_falls_and_beats_the_base_on_held_out_rows(trainable):
    out = train(trainable, adapter="w", base="tiny", data="words@1", steps=30)
    curve = out.metrics["loss_curve"]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    [held] = out.evaluations
    assert held["snapshot"] == "words@1" and held["new_loss"] < held["parent_loss"] - 0.5
    assert out.version.ref == "w@1" and out.version.status == "candidate" and out.parent == "base:tiny"
    stored = {(e.model, e.metric) for e in trainable.evaluations.list("w@1")}
    assert {("w@1", "loss"), ("w@1", "perplexity"), ("w@1", "accuracy")} <= stored


def test_held_out_rows_are_never_trained_on(trainable):
    train(trainable, adapter="w", base="tiny", data="words@1", steps=20)
    _, held = split_rows(trainable.data.rows("words@1"))
    [edge] = [d for d in trainable.lineage("w@1").data if d.role == "train"]
    assert held and not set(edge.row_ids) & {r["row"] for r in held}


def test_replay_edges_name_real_rows_of_earlier_snapshots(trainable_any):
    trainable = trainable_any
    train(trainable, adapter="w", base="tiny", data="words@1", steps=10)
    out = train(trainable, adapter="w", data="numbers@1", replay_ratio=0.25, steps=10)
    lin = trainable.lineage(out.version.ref)
    assert [(p.child, p.parent, p.relation) for p in lin.parents] == [("w@2", "w@1", "finetune")]
    [replay] = [d for d in lin.data if d.version == "w@2" and d.role == "replay"]
    assert replay.snapshot == "words@1" and replay.row_ids
    train_rows, _ = split_rows(trainable.data.rows("words@1"))
    assert set(replay.row_ids) <= {r["row"] for r in train_rows}
    assert out.metrics["replay_sequences"] == 10  # 25% of 10 steps × 4 sequences
    # evaluated beside the parent on the held-out rows of the new data and on the adapter's
    # retention set, which draws the replayed snapshot's held-out rows
    assert {e["snapshot"] for e in out.evaluations} == {"numbers@1", "retention:w@1"}
    rset = trainable.retention.get("w")
    assert rset.strata == [("words@1", len(split_rows(trainable.data.rows("words@1"))[1]))]
    assert {e.model for e in trainable.evaluations.list("w@1")} == {"w@1"}  # parent scored too
    # with full_eval, on every involved snapshot's whole held-out split; w@1 on words@1 was
    # stored by w@1's own run, so it is reused, not recomputed
    full = train(trainable, adapter="w", data="numbers@1", from_ref="w@1", replay_ratio=0.25, steps=10, full_eval=True)
    assert {e["snapshot"] for e in full.evaluations} == {"numbers@1", "words@1"}
    assert len([e for e in trainable.evaluations.list("w@1") if e.snapshot == "words@1" and e.metric == "loss"]) == 1


def test_replay_keeps_more_of_the_first_domain(trainable):
    train(trainable, adapter="w", base="tiny", data="words@1", steps=30)
    train(trainable, adapter="naive", base="tiny", data="numbers@1", from_ref="w@1", replay_ratio=0.0, steps=30)
    replay = train(trainable, adapter="replay", base="tiny", data="numbers@1", from_ref="w@1", replay_ratio=0.5, steps=30,
                   full_eval=True)
    replay_words = next(e["new_loss"] for e in replay.evaluations if e["snapshot"] == "words@1")
    assert replay_words < _heldout_loss(trainable, "naive@1", "words@1")


def _heldout_loss(reg, ref, snapshot):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from portfolio.basemodel import resolve_source
    from portfolio.data.tokenize import encode_rows
    from portfolio.evaluation.metrics import evaluate_examples

    version = reg.get_version(ref)
    folder = resolve_source(reg.bases.get(version.base_model).source)
    tok = AutoTokenizer.from_pretrained(folder)
    export = export_version(reg, ref, Path(tempfile.mkdtemp()) / f"export-{ref.replace('@', '-')}")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), export)
    _, held = split_rows(reg.data.rows(snapshot))
    return evaluate_examples(model, encode_rows(held, "text", tok, 32), tok.eos_token_id)["loss"]


def test_kl_weight_changes_the_objective(trainable):
    train(trainable, adapter="w", base="tiny", data="words@1", steps=10)
    plain = train(trainable, adapter="a", base="tiny", data="numbers@1", from_ref="w@1", replay_ratio=0.5, kl_weight=0.0, steps=10)
    kl = train(trainable, adapter="b", base="tiny", data="numbers@1", from_ref="w@1", replay_ratio=0.5, kl_weight=5.0, steps=10)
    assert any(v > 0 for v in kl.metrics["kl_curve"])
    a, b = weights(trainable, "a@1"), weights(trainable, "b@1")
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert plain.metrics["loss_curve"][0] != kl.metrics["loss_curve"][0] or plain.metrics["loss_curve"][1:] != kl.metrics["loss_curve"][1:]


def test_default_kl_applies_only_when_there_are_replay_rows(trainable):
    from portfolio.training.config import DEFAULT_KL_WEIGHT, DEFAULT_REPLAY_RATIO

    first = train(trainable, adapter="w", base="tiny", data="words@1", steps=4)  # no earlier data: no KL, no error
    assert first.metrics["kl_curve"] == []
    second = train(trainable, adapter="w", data="numbers@1", steps=4)
    [edge] = trainable.lineage("w@2").parents
    assert edge.recipe["replay_ratio"] == DEFAULT_REPLAY_RATIO and edge.recipe["kl_weight"] == DEFAULT_KL_WEIGHT > 0
    assert second.metrics["kl_curve"]
    off = train(trainable, adapter="w", data="numbers@1", kl_weight=0.0, steps=4)
    assert trainable.lineage(off.version.ref).parents[0].recipe["kl_weight"] == 0.0 and off.metrics["kl_curve"] == []


def test_same_seed_same_adapter(trainable):
    train(trainable, adapter="a", base="tiny", data="words@1", steps=8, seed=3)
    train(trainable, adapter="b", base="tiny", data="words@1", steps=8, seed=3)
    train(trainable, adapter="c", base="tiny", data="words@1", steps=8, seed=4)
    a, b, c = weights(trainable, "a@1"), weights(trainable, "b@1"), weights(trainable, "c@1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_interrupted_run_leaves_no_version_and_resumes_to_the_same_weights(trainable):
    straight = train(trainable, adapter="s", base="tiny", data="words@1", steps=12, seed=5)

    def stop_at_7(step, _stats):
        if step == 7:
            raise KeyboardInterrupt

    cfg = TrainConfig(**{**FAST, "adapter": "r", "base": "tiny", "data": "words@1", "steps": 12, "seed": 5})
    with pytest.raises(InvalidState, match="--resume"):
        train_adapter(trainable, cfg, log=quiet, progress=False, on_step=stop_at_7)
    [run] = trainable.runs.list(adapter="r")
    assert run.status == "interrupted"
    assert trainable.list_versions(status="candidate") == [straight.version]  # nothing registered for r
    resumed = train_adapter(trainable, resume=run.id, log=quiet, progress=False)
    assert resumed.run_id == run.id and resumed.version.ref == "r@1"
    a, b = weights(trainable, "s@1"), weights(trainable, "r@1")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert trainable.runs.get(run.id).status == "succeeded"
    with pytest.raises(InvalidState, match="already finished"):
        train_adapter(trainable, resume=run.id, log=quiet, progress=False)


def test_kill_9_mid_training_then_resume(trainable, sqlite_url, store_dir):
    steps = 150
    env = {**os.environ, "PORTFOLIO_DB": sqlite_url, "PORTFOLIO_STORE": str(store_dir), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "portfolio", "train", "k", "--base", "tiny", "--data", "words@1", "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "32", "--lr", "0.02", "--checkpoint-every", "5", "--seed", "9", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = checkpoints(trainable.store)  # in the store itself (for S3: in the bucket)
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.02)
    assert checkpoint is not None, f"no checkpoint appeared: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [run] = trainable.runs.list(adapter="k")
    assert run.status == "interrupted"
    assert [v.ref for v in trainable.list_versions()] == []
    resumed = train_adapter(trainable, resume=run.id, log=quiet, progress=False)
    straight = train(trainable, adapter="s", base="tiny", data="words@1", steps=steps, seed=9)
    a, b = weights(trainable, resumed.version.ref), weights(trainable, straight.version.ref)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(rank=0), "--rank must be at least 1"),
        (dict(replay_ratio=1.0), "--replay-ratio must be in [0, 1)"),
        (dict(steps=5, epochs=1.0), "not both"),
        (dict(kl_weight=1.0, replay_ratio=0.0), "set --replay-ratio above 0"),
        (dict(targets=["q_proj", "nope_proj"]), "--targets nope_proj: not a linear layer"),
    ],
    ids=["rank-0", "ratio-1", "steps-and-epochs", "kl-without-replay", "unknown-target"],
)
def test_bad_settings_fail_before_any_work(trainable, settings, message):
    with pytest.raises(InvalidTrainConfig, match=message.replace("[", r"\[").replace(")", r"\)")):
        train(trainable, adapter="w", base="tiny", data="words@1", **settings)
    assert trainable.runs.list() == []


def test_new_adapter_needs_a_base(trainable):
    with pytest.raises(InvalidTrainConfig, match="name its base model with --base"):
        train(trainable, adapter="w", data="words@1")


def test_continues_from_latest_active_and_says_so(trainable):
    train(trainable, adapter="w", base="tiny", data="words@1", steps=5)
    train(trainable, adapter="w", data="words@1", steps=5, replay_ratio=0.0)
    trainable.set_alias("w", "production", 1)
    said = []
    cfg = TrainConfig(**{**FAST, "adapter": "w", "data": "numbers@1", "steps": 5})
    out = train_adapter(trainable, cfg, log=said.append, progress=False)
    assert any("continuing from w@1, the latest active version" in s for s in said)
    assert [p.parent for p in trainable.lineage(out.version.ref).parents if p.child == out.version.ref] == ["w@1"]


def test_train_cli_registers_and_reports(trainable, sqlite_url, store_dir):
    db_url = sqlite_url
    from click.testing import CliRunner

    from portfolio.cli import cli

    args = ["--db", db_url, "--store", str(store_dir), "train", "w", "--base", "tiny", "--data", "words@1", "--steps", "6",
            "--batch-size", "4", "--seq-len", "32", "--lr", "0.02", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + result.stderr
    assert "registered w@1 [candidate]" in result.output and "words@1" in result.output
    runs = json.loads(CliRunner().invoke(cli, ["--db", db_url, "--store", str(store_dir), "runs", "--json"]).output)
    assert runs[0]["status"] == "succeeded" and runs[0]["metrics"]["version"] == "w@1"
    assert runs[0]["packages"]["peft"] and runs[0]["config"]["seed"] == 0
    bad = CliRunner().invoke(cli, ["--db", db_url, "--store", str(store_dir), "train", "w", "--data", "words@1", "--rank", "0"])
    assert bad.exit_code == 1 and bad.stderr.startswith("error: --rank must be at least 1")
