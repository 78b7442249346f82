"""Evaluation history, gates, promotion, rollback, revalidation, matrix and plots."""

import json
import re

import pytest
from click.testing import CliRunner

from portfolio.cli import cli
from portfolio.evaluation.continual import backward_transfer, forgetting
from portfolio.policy.gates import GatePolicy, InvalidGate, check_gates
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
    # by default retention is checked on the adapter's bounded retention set (words@1's rows)
    assert "retention  retention:w@1" in refused.output and "FAIL" in refused.output
    assert "production stays at w@1" in refused.stderr
    assert drifting.get_version("w@production").version == 1
    forced = run("promote", "w@2", "--force", "--reason", "numbers launch")
    assert "OVERRIDE" in forced.output and drifting.get_version("w@production").version == 2
    history = json.loads(run("alias", "history", "w", "--json").stdout)
    assert [(h["action"], h["forced"], h["to_version"]) for h in history] == [
        ("set", False, 1), ("refused", False, 2), ("override", True, 2)]
    assert history[1]["reason"].startswith("gates failed: retention on retention:w@1")
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
    count = len(drifting.evaluations.list("w@1"))
    second = json.loads(run("eval", "w@1", "base:tiny", "--data", "numbers@1", "--json").stdout)
    assert [r["reused"] for r in second] == [True, True]
    assert [r["loss"] for r in second] == [r["loss"] for r in first]
    assert len(drifting.evaluations.list("w@1")) == count


def test_training_results_are_reused_by_eval(drifting, run):
    out = json.loads(run("eval", "w@2", "--data", "numbers@1", "--seq-len", "32", "--json").stdout)
    assert out[0]["reused"] is True  # training scored w@2 on numbers@1 held-out rows at seq-len 32


def test_matrix_history_and_plots(drifting, run, tmp_path):
    # training scored w@2 on its fresh data and the retention set only: the cell of w@2 on
    # words@1 is empty until asked for (the hint says how)
    assert "not evaluated yet" in run("matrix").output
    run("eval", "w@2", "--data", "words@1", "--seq-len", "32")
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


# -- paired intervals: signal, not noise ---------------------------------------------------

def _paired(n: int, shift: float, noise: float, seed: int = 0):
    """Per-example [loss sum, correct, tokens] of an incumbent and of a candidate whose loss
    per example is the incumbent's × (1 + shift) plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 60, size=n)
    inc_loss = rng.uniform(1.5, 3.5, size=n)
    cand_loss = inc_loss * (1 + shift) + rng.normal(0, noise, size=n)
    inc = [[float(l * t), int(t // 2), int(t)] for l, t in zip(inc_loss, tokens)]
    cand = [[float(l * t), int(t // 2), int(t)] for l, t in zip(cand_loss, tokens)]
    mean = lambda rows: sum(r[0] for r in rows) / sum(r[2] for r in rows)  # noqa: E731
    return cand, inc, mean(cand), mean(inc)


def test_a_candidate_worse_only_by_noise_passes_with_its_interval():
    from portfolio.policy.gates import GatePolicy, check_gates

    cand, inc, c, i = _paired(40, shift=0.015, noise=0.6)
    policy = GatePolicy("a", max_regression=0.01)
    [check] = check_gates(policy, [], ["old@1"], {"old@1": c}, {"old@1": i}, {"old@1": (cand, inc)})
    assert check.change < -0.01  # the bare means say "regressed beyond the limit"...
    lo, hi = check.ci
    assert lo < -0.01 < hi and check.passed and check.n == 40  # ...but not significantly


def test_a_significantly_worse_candidate_is_refused_with_the_interval_printed():
    from portfolio.policy.gates import GatePolicy, check_gates
    from portfolio.evaluation.promote import describe_failure

    cand, inc, c, i = _paired(40, shift=0.10, noise=0.02)
    [check] = check_gates(GatePolicy("a", max_regression=0.02), [], ["old@1"], {"old@1": c}, {"old@1": i}, {"old@1": (cand, inc)})
    lo, hi = check.ci
    assert hi < -0.02 and not check.passed
    assert re.fullmatch(r"retention on old@1: -\d+\.\d% ± \d\.\d% \(limit -2\.0%\)", describe_failure(check))


def test_the_interval_is_reproducible_and_narrows_with_confidence():
    from portfolio.policy.gates import paired_interval

    cand, inc, _, _ = _paired(30, shift=0.03, noise=0.3)
    assert paired_interval(cand, inc, "loss", 0.95) == paired_interval(cand, inc, "loss", 0.95)
    lo95, hi95 = paired_interval(cand, inc, "loss", 0.95)
    lo80, hi80 = paired_interval(cand, inc, "loss", 0.80)
    assert lo95 < lo80 < hi80 < hi95
    acc_lo, acc_hi = paired_interval(cand, inc, "accuracy", 0.95)
    assert acc_lo == acc_hi == 0.0  # equal accuracies in every resample


def test_a_too_small_set_is_reported_and_decided_on_the_point_estimate():
    from portfolio.policy.gates import GatePolicy, check_gates

    cand, inc, c, i = _paired(4, shift=0.10, noise=0.01)
    [check] = check_gates(GatePolicy("a", max_regression=0.02), [], ["old@1"], {"old@1": c}, {"old@1": i}, {"old@1": (cand, inc)})
    assert check.ci is None and check.n == 4 and not check.passed
    assert "too few examples to decide (4 < 8)" in check.detail


def test_promote_prints_intervals_from_stored_per_example_scores(trainable, write_jsonl):
    from conftest import cli_invoker, domain_rows

    run = cli_invoker(str(trainable.engine.url), trainable.store.root)
    run("data", "add", "many", write_jsonl("many.jsonl", domain_rows("words", n=1500, seed=3)), "--domain", "words")
    run("train", "w", "--base", "tiny", "--data", "many@1", "--steps", "4", "--seq-len", "16", "--batch-size", "4", "--no-progress")
    run("gate", "set", "w", "--confidence", "0.9")
    assert "confidence      90%" in run("gate", "show", "w").output
    out = run("promote", "w@1", ok=False).output
    assert "INTERVAL" in out and re.search(r"gain\s+many@1 .*± \d+\.\d%\s+\[[-+]\d+\.\d%, [-+]\d+\.\d%\] n=\d+", out), out


def test_suite_pass_regression_is_decided_on_the_paired_interval():
    from portfolio.policy.gates import SuiteCriteria, check_suite_gates

    def cases(passed):
        return [{"id": f"c{i}", "passed": p, "slice": {}, "output": "", "critical": False} for i, p in enumerate(passed)]

    def metrics(passed):
        rate = sum(passed) / len(passed)
        return {"overall": {"pass_rate": rate, "critical_failures": 0, "critical_failed": [], "refusal_rate": None,
                            "mean_words": None, "ece": None}, "slices": {}}

    incumbent = [True] * 20
    noisy = [True] * 18 + [False] * 2          # 10 points down: within noise on 20 cases
    broken = [False] * 12 + [True] * 8          # 60 points down: significant
    criteria = SuiteCriteria(["s@1"], critical_must_pass=False, max_pass_regression=0.05)
    [noise] = check_suite_gates(criteria, "s@1", metrics(noisy), metrics(incumbent), cases(noisy), cases(incumbent))
    [bad] = check_suite_gates(criteria, "s@1", metrics(broken), metrics(incumbent), cases(broken), cases(incumbent))
    assert noise.passed and noise.ci[0] < -0.05 < noise.ci[1] and noise.n == 20
    assert not bad.passed and bad.ci[1] < -0.05


def test_every_behavioural_criterion_is_one_table_entry():
    """`gates.CRITERIA` is the one list: each SuiteCriteria setting is switched by exactly one
    entry, and every kind formats its score and limit."""
    import dataclasses

    from portfolio.policy.gates import CRITERIA, SuiteCriteria, describe_criteria

    kinds = [c.kind for c in CRITERIA]
    assert len(kinds) == len(set(kinds))
    # suites and parity_engine say where criteria apply; every other field switches one criterion
    settings = [f.name for f in dataclasses.fields(SuiteCriteria) if f.name not in ("suites", "parity_engine")]
    assert sorted(c.setting for c in CRITERIA if c.setting) == sorted(settings)
    for c in CRITERIA:
        assert c.value(0.25) and c.limit(0.1)
    line = describe_criteria(SuiteCriteria(["s@1"], 0.9, {"risk=high": 1.0}, True, 0.05, 0.5, 0.1, 0.2).to_dict())
    assert line == ("suites s@1; pass ≥ 90%; risk=high pass ≥ 100%; every critical case passes; refusal rate rises ≤5%; "
                    "mean words change ≤ ±50%; pass rate drops ≤10%; ECE ≤0.200")
    parity = describe_criteria(SuiteCriteria(["s@1"], parity_engine="llamacpp", max_parity_drop=0.05).to_dict())
    assert parity.endswith("served pass rate ≤5% below the reference model's (on llamacpp)")
