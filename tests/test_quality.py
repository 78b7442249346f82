"""Evaluation history, gates, promotion, rollback, revalidation, matrix and plots."""

import json

import pytest
from click.testing import CliRunner

from portfolio.cli import cli
from portfolio.evaluation.continual import backward_transfer, forgetting
from portfolio.evaluation.gates import GatePolicy, InvalidGate, check_gates
from portfolio.training.config import TrainConfig
from portfolio.training.train import train_adapter

FAST = dict(batch_size=4, seq_len=32, lr=2e-2, checkpoint_every=100)


@pytest.mark.parametrize(
    "metric, cand, inc, limit, passed",
    [
        ("loss", 2.04, 2.0, 0.02, True),   # 2% worse: allowed
        ("loss", 2.05, 2.0, 0.02, False),  # 2.5% worse
        ("loss", 1.5, 2.0, 0.0, True),
        ("accuracy", 0.49, 0.5, 0.02, True),
        ("accuracy", 0.40, 0.5, 0.02, False),
    ],
    ids=["loss-within", "loss-beyond", "loss-better", "acc-within", "acc-beyond"],
)
def test_retention_gate(metric, cand, inc, limit, passed):
    policy = GatePolicy("a", metric=metric, max_regression=limit)
    [check] = check_gates(policy, [], ["old@1"], {"old@1": cand}, {"old@1": inc})
    assert check.passed is passed and check.kind == "retention"


def test_gain_gate_needs_the_minimum_improvement():
    policy = GatePolicy("a", min_gain=0.1)
    [check] = check_gates(policy, ["new@1"], [], {"new@1": 1.85}, {"new@1": 2.0})
    assert not check.passed and check.change == pytest.approx(0.075)


def test_bad_gate_settings():
    with pytest.raises(InvalidGate, match="--max-regression must be ≥ 0"):
        GatePolicy("a", max_regression=-1)


def test_forgetting_and_bwt_on_a_hand_made_matrix():
    # losses: v1 learned t1 (1.0); v2 learned t2 but t1 rose to 1.5; v3 learned t3, t1 at 1.2, t2 at 2.0
    R = {"a@1": {"t1": 1.0, "t2": 3.0}, "a@2": {"t1": 1.5, "t2": 1.0}, "a@3": {"t1": 1.2, "t2": 2.0, "t3": 0.5}}
    tasks = {"a@1": "t1", "a@2": "t2", "a@3": "t3"}
    order = ["a@1", "a@2", "a@3"]
    assert forgetting(R, order, tasks, "loss") == pytest.approx({"t1": 0.2, "t2": 1.0})
    assert backward_transfer(R, order, tasks, "loss") == pytest.approx(((1.0 - 1.2) + (1.0 - 2.0)) / 2)


@pytest.fixture
def drifting(trainable):
    """w@1 learned words and is in production; w@2 was then trained hard on numbers alone."""
    quiet = dict(log=lambda *_: None, progress=False)
    train_adapter(trainable, TrainConfig(**FAST, adapter="w", base="tiny", data="words@1", steps=30), **quiet)
    trainable.set_alias("w", "production", 1, reason="launch")
    train_adapter(trainable, TrainConfig(**FAST, adapter="w", data="numbers@1", steps=40, replay_ratio=0.0), **quiet)
    return trainable


@pytest.fixture
def run(sqlite_url, store_dir):
    def invoke(*args, ok=True):
        result = CliRunner().invoke(cli, ["--db", sqlite_url, "--store", str(store_dir), *map(str, args)])
        if ok:
            assert result.exit_code == 0, result.output + result.stderr
        return result

    return invoke


def test_forgetful_candidate_is_refused_then_forced_then_rolled_back(drifting, run):
    refused = run("promote", "w@2", ok=False)
    assert refused.exit_code == 1
    assert "retention  words@1" in refused.output and "FAIL" in refused.output
    assert "production stays at w@1" in refused.stderr
    assert drifting.get_version("w@production").version == 1
    forced = run("promote", "w@2", "--force", "--reason", "numbers launch")
    assert "OVERRIDE" in forced.output and drifting.get_version("w@production").version == 2
    history = json.loads(run("alias", "history", "w", "--json").stdout)
    assert [(h["action"], h["forced"], h["to_version"]) for h in history] == [
        ("set", False, 1), ("refused", False, 2), ("override", True, 2)]
    assert history[1]["reason"].startswith("gates failed: retention on words@1")
    assert history[2]["reason"] == "numbers launch"
    assert "rolled back from w@2" in run("rollback", "w").output
    assert drifting.get_version("w@production").version == 1
    assert json.loads(run("alias", "history", "w", "--json").stdout)[-1]["action"] == "rollback"


def test_promote_passes_gates_it_meets(drifting, run):
    run("gate", "set", "w", "--max-regression", "10.0", "--retention", "words@1")
    assert "max regression  1000.0%" in run("gate", "show", "w").output
    out = run("promote", "w@2", "--alias", "production")
    assert "gates passed" in out.output
    assert json.loads(run("alias", "history", "w", "--json").stdout)[-1]["action"] == "promote"


def test_force_needs_a_reason_and_gates_need_real_snapshots(drifting, run):
    assert "--force needs --reason" in run("promote", "w@2", "--force", ok=False).stderr
    assert "no dataset snapshot 'nope@1'" in run("gate", "set", "w", "--retention", "nope@1", ok=False).stderr


def test_revalidation_flags_drift_on_shifted_data_only(drifting, run):
    same = run("revalidate", "w@production", "--data", "words@1")
    assert "holds up" in same.output and not drifting.get_version("w@1").drifted
    shifted = run("revalidate", "w@production", "--data", "numbers@1")
    assert "has drifted on numbers@1" in shifted.output
    assert drifting.get_version("w@1").drifted
    assert "(drifted)" in run("list").output


def test_second_identical_eval_reuses_the_stored_result(drifting, run):
    first = json.loads(run("eval", "w@1", "base:tiny", "--data", "numbers@1", "--json").stdout)
    assert [r["reused"] for r in first] == [False, False]
    count = len(drifting.evaluations("w@1"))
    second = json.loads(run("eval", "w@1", "base:tiny", "--data", "numbers@1", "--json").stdout)
    assert [r["reused"] for r in second] == [True, True]
    assert [r["loss"] for r in second] == [r["loss"] for r in first]
    assert len(drifting.evaluations("w@1")) == count


def test_training_results_are_reused_by_eval(drifting, run):
    out = json.loads(run("eval", "w@2", "--data", "numbers@1", "--seq-len", "32", "--json").stdout)
    assert out[0]["reused"] is True  # training scored w@2 on numbers@1 held-out rows at seq-len 32


def test_matrix_history_and_plots(drifting, run, tmp_path):
    m = json.loads(run("matrix", "--json").stdout)
    assert {"base:tiny", "w@1", "w@2"} <= set(m["rows"])
    [cl] = m["continual"]
    assert cl["adapter"] == "w" and cl["bwt"] < 0 and cl["forgetting"]["words@1"] > 0
    png = tmp_path / "m.png"
    run("matrix", "--plot", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = tmp_path / "h.html"
    run("history", "w", "--plot", page)
    text = page.read_text()
    assert "<img src='data:image/png;base64," in text and "<table>" in text
    rows = json.loads(run("history", "w", "--data", "words@1", "--json").stdout)
    assert [r["version"] for r in rows] == [1, 2] and rows[1]["value"] > rows[0]["value"]
    assert "write a .png or .html" in run("matrix", "--plot", tmp_path / "m.pdf", ok=False).stderr
