"""What a person reads about suite runs: the cases of one model (failed ones, one slice) and
what changed between two models, case by case."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from portfolio.errors import InvalidState
from portfolio.suites.run import SuiteScore, run_suites


def parse_slice(text: str | None) -> tuple[str, str] | None:
    """``risk=high`` -> ("risk", "high")."""
    if text is None:
        return None
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise InvalidState(f"--slice {text!r}: write LABEL=VALUE, e.g. risk=high")
    return key, value


def answer_text(case: dict[str, Any]) -> str | None:
    """What a case's model said: the generated answer, or for a choice case the chosen option
    and its probability."""
    if case.get("output") is not None:
        return case["output"]
    choice = case.get("choice")
    if choice:
        return f"(choice) {choice['options'][choice['pred']]!r} at p={choice['probs'][choice['pred']]:.2f}"
    return None


def case_results(registry, ref: str, suite: str, *, failed: bool = False, slice_: str | None = None,
                 device: str = "auto", log: Callable[[str], None] = print, engine: str | None = None
                 ) -> tuple[SuiteScore, list[dict[str, Any]]]:
    """A model's run of a suite (stored, or computed now; on ``engine`` when given) and its
    cases, filtered."""
    [score] = run_suites(registry, [ref], [suite], device=device, log=log, engine=engine)
    want = parse_slice(slice_)
    cases = [c for c in score.cases if (not failed or not c["passed"]) and (want is None or c["slice"].get(want[0]) == want[1])]
    return score, cases


@dataclass(frozen=True)
class CaseChange:
    """One case whose verdict or output differs between two models."""

    id: str
    slice: dict[str, str]
    critical: bool
    a_passed: bool
    b_passed: bool
    a_output: str | None
    b_output: str | None
    failing_checks: dict[str, list[str]]

    @property
    def kind(self) -> str:
        """``fixed``, ``broke`` or ``changed`` (same verdict, other output)."""
        if self.a_passed != self.b_passed:
            return "fixed" if self.b_passed else "broke"
        return "changed"


def diff(registry, a: str, b: str, suite: str, *, device: str = "auto", log: Callable[[str], None] = print,
         engine: str | None = None) -> tuple[SuiteScore, SuiteScore, list[CaseChange]]:
    """Both models' runs of a suite, and every case where their verdicts or outputs differ.
    With ``engine``, B runs on that engine and A on the reference model (``diff X X
    --engine llamacpp``: what serving X on llama.cpp changes)."""
    if engine:
        [score_a] = run_suites(registry, [a], [suite], device=device, log=log)
        [score_b] = run_suites(registry, [b], [suite], device=device, log=log, engine=engine)
    else:
        score_a, score_b = run_suites(registry, [a, b], [suite], device=device, log=log)
    by_b = {c["id"]: c for c in score_b.cases}
    changes = []
    for ca in score_a.cases:
        cb = by_b[ca["id"]]
        if ca["passed"] == cb["passed"] and ca["output"] == cb["output"] and ca.get("choice") == cb.get("choice"):
            continue
        failing = {side: [v["kind"] for v in c["checks"] if not v["passed"]] for side, c in (("a", ca), ("b", cb))}
        changes.append(CaseChange(ca["id"], ca["slice"], ca["critical"], ca["passed"], cb["passed"], answer_text(ca), answer_text(cb), failing))
    order = {"broke": 0, "fixed": 1, "changed": 2}
    return score_a, score_b, sorted(changes, key=lambda c: (order[c.kind], not c.critical, c.id))
