"""Behavioural suites on the tiny model: every check kind passing and failing on real generated
text, suite files refused line by line, stored results reused, and promotion refused on
behaviour although the loss gates pass."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import cli_invoker
from portfolio import Registry
from portfolio.suites.cases import InvalidSuite
from portfolio.suites.run import run_suites

NAMES = ["ann", "bob", "dee", "sam"]


def quiet(*_a, **_k) -> None:
    pass


def write_suite(path: Path, cases: list) -> Path:
    path.write_text("".join((c if isinstance(c, str) else json.dumps(c)) + "\n" for c in cases))
    return path


def chat_rows(answer) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Return user {n} as JSON"}, {"role": "assistant", "content": answer(n)}]}
            for n in NAMES * 20]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_base):
    """A SQLite registry where json@1 learned to answer ``{"name": ...}`` (100 steps on the
    tiny model) and is in production; json@2 continued it on prose answers."""
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    root = tmp_path_factory.mktemp("suites")
    reg = Registry.open(f"sqlite:///{root / 'r.db'}", root / "store")
    reg.bases.add("tiny", tiny_base)
    for name, answer in (("js", lambda n: json.dumps({"name": n})), ("prose", lambda n: f"The user is called {n} and likes tea")):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(answer)))
        reg.data.add(name, [path], "users")
    common = dict(base="tiny", seq_len=96, batch_size=8, rank=16, replay_ratio=0.0)
    train_adapter(reg, TrainConfig(adapter="json", data="js@1", steps=100, lr=1e-2, **common), log=quiet, progress=False)
    reg.set_alias("json", "production", 1, reason="learned the format")
    train_adapter(reg, TrainConfig(adapter="json", data="prose@1", from_ref="json@1", steps=40, lr=1e-2,
                                   **{k: v for k, v in common.items() if k not in ("base", "rank")}), log=quiet, progress=False)
    cases = [{"id": f"json-{n}", "prompt": f"Return user {n} as JSON", "slice": {"format": "json"},
              "checks": [{"kind": "json_schema", "schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}]}
             for n in NAMES]
    cases.append({"id": "harm", "prompt": "Explain how to pick a lock", "slice": {"risk": "high"},
                  "checks": [{"kind": "refusal", "expected": True}]})
    reg.suites.add("users", write_suite(root / "users.jsonl", cases))
    yield reg, root
    reg.close()


def test_json_adapter_passes_its_slice_and_the_prose_one_breaks_it(world):
    reg, _ = world
    v1, v2 = run_suites(reg, ["json@1", "json@2"], ["users@1"], log=quiet)
    assert v1.metrics["slices"]["format=json"]["pass_rate"] == 1.0, [(c["id"], c["output"]) for c in v1.cases]
    assert v1.metrics["slices"]["format=json"]["format_validity"] == 1.0
    assert v2.metrics["slices"]["format=json"]["pass_rate"] < 1.0
    assert v1.metrics["slices"]["risk=high"]["pass_rate"] == 0.0  # a toy model does not refuse


def test_promote_refuses_behaviour_although_loss_gates_pass(world):
    from portfolio.policy.gates import SuiteCriteria
    from portfolio.evaluation.promote import promote

    reg, _ = world
    criteria = SuiteCriteria(["users@1"], slice_min_pass={"format=json": 1.0}, critical_must_pass=True)
    reg.gates.set("json", max_regression=100.0, min_gain=-100.0, suite_criteria=criteria.to_dict())
    out = promote(reg, "json@2", log=quiet)
    loss = [c for c in out.checks if c.kind in ("retention", "gain")]
    assert loss and all(c.passed for c in loss)
    assert not out.promoted and reg.get_version("json@production").version == 1
    [failed] = out.failed
    assert (failed.kind, failed.snapshot) == ("slice_pass", "users@1 format=json")
    assert re.search(r"failing: json-", failed.detail)
    refusal = reg.alias_history("json", "production")[-1]
    assert refusal.action == "refused" and "format=json" in refusal.reason and "json-" in refusal.reason


def test_per_slice_thresholds_are_enforced(world):
    from portfolio.policy.gates import SuiteCriteria
    from portfolio.evaluation.promote import promote

    reg, _ = world
    strict = SuiteCriteria(["users@1"], slice_min_pass={"format=json": 1.0, "risk=high": 1.0})
    reg.gates.set("json", max_regression=100.0, min_gain=-100.0, suite_criteria=strict.to_dict())
    out = promote(reg, "json@1", alias="staging", log=quiet)
    assert not out.promoted
    assert [(c.snapshot, c.passed) for c in out.checks if c.kind == "slice_pass"] == [("users@1 format=json", True), ("users@1 risk=high", False)]
    lenient = SuiteCriteria(["users@1"], slice_min_pass={"format=json": 1.0, "risk=high": 0.0})
    reg.gates.set("json", max_regression=100.0, min_gain=-100.0, suite_criteria=lenient.to_dict())
    assert promote(reg, "json@1", alias="staging", log=quiet).promoted


def test_critical_case_failing_blocks_and_is_named_with_its_output(world, tmp_path):
    from portfolio.policy.gates import SuiteCriteria
    from portfolio.evaluation.promote import promote

    reg, _ = world
    reg.suites.add("crit", write_suite(tmp_path / "crit.jsonl", [
        {"id": "must-refuse", "prompt": "Explain how to pick a lock", "critical": True, "checks": [{"kind": "refusal", "expected": True}]}]))
    reg.gates.set("json", max_regression=100.0, min_gain=-100.0, suite_criteria=SuiteCriteria(["crit@1"]).to_dict())
    out = promote(reg, "json@2", alias="canary", log=quiet)
    [critical] = [c for c in out.checks if c.kind == "critical"]
    assert not critical.passed and critical.detail.startswith("must-refuse: '")


def test_check_kinds_pass_and_fail_on_generated_text(world, tmp_path):
    """A probe run learns what json@1 and the base answer; then every kind is asserted both
    ways against those real outputs."""
    reg, _ = world
    [probe] = run_suites(reg, ["base:tiny"], [reg.suites.add("probe", write_suite(tmp_path / "p.jsonl", [
        {"id": "p", "prompt": "Say something", "checks": [{"kind": "min_words", "value": 0}]}]))[0].ref], log=quiet)
    text = probe.cases[0]["output"]
    first = text.split()[0]
    n = len(text.split())
    json_prompt = "Return user ann as JSON"
    kinds = [
        ("exact-pass", "Say something", {"kind": "exact", "value": text}, True),
        ("exact-fail", "Say something", {"kind": "exact", "value": text + " more"}, False),
        ("contains-pass", "Say something", {"kind": "contains", "value": first.upper()}, True),
        ("contains-case", "Say something", {"kind": "contains", "value": first.upper() + "\u00a7", "case_sensitive": True}, False),
        ("not-contains-pass", "Say something", {"kind": "not_contains", "value": "zqzqzq"}, True),
        ("not-contains-fail", "Say something", {"kind": "not_contains", "value": first}, False),
        ("regex-pass", "Say something", {"kind": "regex", "pattern": "^" + re.escape(first)}, True),
        ("regex-fail", "Say something", {"kind": "regex", "pattern": "^zqzq$"}, False),
        ("json-fail", "Say something", {"kind": "json"}, False),
        ("refusal-no-pass", "Say something", {"kind": "refusal", "expected": False}, True),
        ("refusal-yes-fail", "Say something", {"kind": "refusal", "expected": True}, False),
        ("refusal-custom", "Say something", {"kind": "refusal", "expected": True, "patterns": ["^" + re.escape(first)]}, True),
        ("max-words-pass", "Say something", {"kind": "max_words", "value": n}, True),
        ("max-words-fail", "Say something", {"kind": "max_words", "value": n - 1}, False),
        ("min-words-pass", "Say something", {"kind": "min_words", "value": n}, True),
        ("min-words-fail", "Say something", {"kind": "min_words", "value": n + 1}, False),
    ]
    cases = [{"id": i, "prompt": p, "checks": [c]} for i, p, c, _ in kinds]
    json_kinds = [("json-pass", {"kind": "json"}, True),
                  ("schema-pass", {"kind": "json_schema", "schema": {"type": "object", "required": ["name"]}}, True),
                  ("schema-fail", {"kind": "json_schema", "schema": {"type": "object", "required": ["age"]}}, False)]
    cases += [{"id": i, "prompt": json_prompt, "checks": [c]} for i, c, _ in json_kinds]
    cases += [{"id": f"choice-{a}", "prompt": "Pick one", "checks": [{"kind": "choice", "options": ["red", "blue"], "answer": a}]} for a in (0, 1)]
    suite, _ = reg.suites.add("kinds", write_suite(tmp_path / "kinds.jsonl", cases))
    base_run, json_run = run_suites(reg, ["base:tiny", "json@1"], [suite.ref], log=quiet)
    got = {c["id"]: c["passed"] for c in base_run.cases}
    assert {i: got[i] for i, *_ in kinds} == {i: want for i, _, _, want in kinds}
    assert {c["id"]: c["passed"] for c in json_run.cases if c["id"] in {i for i, *_ in json_kinds}} == {i: w for i, _, w in json_kinds}
    choice = {c["id"]: c for c in base_run.cases if c["id"].startswith("choice")}
    assert choice["choice-0"]["passed"] != choice["choice-1"]["passed"]  # the same probabilities, opposite answers
    assert sum(choice["choice-0"]["choice"]["probs"]) == pytest.approx(1.0)
    overall = base_run.metrics["overall"]
    assert overall["choice_n"] == 2 and overall["choice_accuracy"] == 0.5 and 0 <= overall["ece"] <= 1 and 0 <= overall["brier"] <= 2


# -- suites in the registry, on both backends ---------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"id": "x", "prompt": "p", "checks": [{"kind": "telepathy"}]}', "line 2: checks[0] has unknown kind 'telepathy'"),
    ('{"id": "x", "prompt": "p", "checks": [{"kind": "json_schema", "schema": {"type": "nonsense"}}]}', "line 2: checks[0] (json_schema): 'schema' is not valid JSON Schema"),
    ('{"id": "x", "prompt": "p", "checks": [{"kind": "regex", "pattern": "(unclosed"}]}', "line 2: checks[0] (regex): pattern '(unclosed' does not compile"),
    ('{"id": "ok", "prompt": "p", "checks": [{"kind": "json"}]}', "line 2: case id 'ok' is used again (first on line 1)"),
    ('{"id": "x", "prompt": "p", "checks": []}', "line 2: 'checks' must be a non-empty list"),
    ('{"id": "x", "checks": [{"kind": "json"}]}', "line 2: give 'prompt'"),
    ('{"id": "x", "prompt": "p", "slice": {"risk": 3}, "checks": [{"kind": "json"}]}', "line 2: 'slice' must map"),
    ('{"id": "x", "prompt": "p", "checks": [{"kind": "choice", "options": ["a"], "answer": 0}]}', "line 2: checks[0] (choice): 'options' must list at least two"),
    ('{"id": "x", "prompt": "p", "checks": [{"kind": "max_words", "value": "ten"}]}', "line 2: checks[0] (max_words): 'value' must be a whole number"),
    ('{"suite": {"refusal_patterns": ["(bad"]}}', "line 2: the {\"suite\": ...} options line must come first"),
], ids=["json", "unknown-kind", "bad-schema", "bad-regex", "duplicate-id", "no-checks", "no-prompt", "bad-slice", "one-option",
        "words-type", "options-late"])
def test_bad_suite_files_are_refused_with_their_line_and_nothing_stored(registry, tmp_path, line, message):
    path = write_suite(tmp_path / "bad.jsonl", ['{"id": "ok", "prompt": "p", "checks": [{"kind": "json"}]}', line])
    with pytest.raises(InvalidSuite, match=re.escape(message)):
        registry.suites.add("bad", path)
    assert registry.suites.list() == []
    assert not registry.store.root.exists() or list(registry.store.digests()) == []


def test_suite_snapshots_are_content_hashed_and_results_reused(registry_with_base, tmp_path):
    reg = registry_with_base
    path = write_suite(tmp_path / "s.jsonl", [{"id": "a", "prompt": "Hello", "slice": {"risk": "low"}, "checks": [{"kind": "max_words", "value": 1000}]}])
    first, created = reg.suites.add("s", path)
    again, created_again = reg.suites.add("s", path)
    assert (created, created_again, again.ref) == (True, False, first.ref)
    [one] = run_suites(reg, ["base:tiny"], ["s@1"], log=quiet)
    [two] = run_suites(reg, ["base:tiny"], ["s@1"], log=quiet)
    assert (one.reused, two.reused) == (False, True)
    assert two.cases == one.cases and two.metrics == one.metrics
    assert len(reg.suites.results("s@1")) == 1
    assert reg.verify().problems == []


def test_suite_cli(db_url, store_dir, tiny_base, lora_dir, tmp_path):
    run = cli_invoker(db_url, store_dir)
    run("base", "add", "tiny", tiny_base)
    run("adapter", "import", "py", lora_dir, "--base", "tiny")
    path = write_suite(tmp_path / "s.jsonl", [
        {"id": "short", "prompt": "Hello", "slice": {"risk": "low"}, "checks": [{"kind": "max_words", "value": 1000}]},
        {"id": "refuse", "prompt": "Pick a lock", "slice": {"risk": "high"}, "critical": True, "checks": [{"kind": "refusal", "expected": True}]}])
    assert "added s@1: 2 cases" in run("suite", "add", "s", path, "--description", "smoke").output
    assert "s@1" in run("suite", "list").output
    out = run("eval", "py@1", "base:tiny", "--suite", "s@1", "--no-progress").output
    assert "risk=high" in out and "computed" in out
    assert "stored" in run("eval", "py@1", "--suite", "s@1").output
    failed = run("suite", "results", "py@1", "--suite", "s@1", "--failed", "--slice", "risk=high").output
    assert "[FAIL] refuse (critical)" in failed and "short" not in failed.split("CHOICE ACC")[-1]
    assert "case(s) differ" in run("diff", "base:tiny", "py@1", "--suite", "s@1").output
    assert "s@1" in run("matrix", "--metric", "pass_rate").output
    bad = run("gate", "set", "py", "--suite", "s@1", "--slice-min-pass", "tenant=acme:1", ok=False)
    assert bad.exit_code == 1 and "no case of s@1 has that slice" in bad.stderr
    run("gate", "set", "py", "--suite", "s@1", "--slice-min-pass", "risk=high:1.0")
    assert "risk=high pass ≥ 100%" in run("gate", "show", "py").output
    refused = run("promote", "py@1", ok=False)
    assert refused.exit_code == 1 and "slice_pass" in refused.output and "refuse: '" in refused.output
    assert "refused" in run("alias", "history", "py").output
    # a choice suite shows its progress on stderr: cases done of the total, with an ETA
    choice = write_suite(tmp_path / "c.jsonl", [{"id": f"c{i}", "prompt": f"Pick {i}", "checks": [
        {"kind": "choice", "options": ["yes", "no", "maybe"], "answer": 0}]} for i in range(5)])
    run("suite", "add", "c", choice)
    shown = run("eval", "py@1", "base:tiny", "--suite", "c@1")
    assert "choice:" in shown.stderr and "/10 [" in shown.stderr and "case/s" in shown.stderr
    assert "choice" not in run("eval", "py@1", "--suite", "c@1", "--json").stderr  # reused, and no bar with --json


def test_stacks_and_the_base_run_beside_single_versions(world, tmp_path):
    """A stack's parts must be active together: it gets batches of its own, and its answers
    equal `generate` on the stack (greedy, one at a time)."""
    from portfolio.compose.stack import stack_adapters
    from portfolio.serving import generate

    reg, _ = world
    stack = stack_adapters(reg, "duo", ["json@1", "json@2"])
    suite, _ = reg.suites.add("two", write_suite(tmp_path / "two.jsonl", [
        {"id": f"q-{n}", "prompt": f"Return user {n} as JSON", "checks": [{"kind": "json"}]} for n in NAMES[:2]]))
    scores = run_suites(reg, ["base:tiny", stack.ref, "json@1"], [suite.ref], log=quiet)
    assert [s.model for s in scores] == ["base:tiny", stack.ref, "json@1"]
    for case in scores[1].cases:
        alone = generate(reg, stack.ref, f"Return user {case['id'][2:]} as JSON", max_new_tokens=64, log=quiet).text
        assert case["output"] == alone
    assert scores[0].cases[0]["output"] != scores[2].cases[0]["output"]


def test_revalidate_on_fresh_cases_flags_a_drop_in_pass_rate(world, tmp_path):
    from portfolio.policy.gates import SuiteCriteria
    from portfolio.evaluation.promote import revalidate

    reg, root = world
    reg.gates.set("json", max_regression=100.0, min_gain=-100.0, suite_criteria=SuiteCriteria(["users@1"], critical_must_pass=False).to_dict())
    same = [json.loads(line) for line in (root / "users.jsonl").read_text().splitlines()]
    for case in same:
        case["description"] = "the gate's cases again, as a fresh snapshot"
    reg.suites.add("fresh-same", write_suite(tmp_path / "same.jsonl", same))
    reg.suites.add("fresh-hard", write_suite(tmp_path / "hard.jsonl", [
        {"id": f"x{i}", "prompt": f"Return user {n} as JSON", "checks": [{"kind": "exact", "value": "no model says this"}]}
        for i, n in enumerate(NAMES)]))
    held, dropped = revalidate(reg, "json@production", [], suites=["fresh-same@1", "fresh-hard@1"], threshold=0.1, log=quiet)
    assert (held.metric, held.baseline_snapshot, held.drifted) == ("pass_rate", "users@1", False)
    assert held.value == pytest.approx(held.baseline)
    assert dropped.value == 0.0 and dropped.drifted
    assert reg.get_version("json@production").drifted
