"""From per-case verdicts to release metrics, overall and per slice. Pure functions.

Per group of cases (the whole suite, and each ``key=value`` slice label):

- ``pass_rate``: share of cases whose every check passed;
- ``critical_failures``: critical cases that failed (their ids in ``critical_failed``);
- ``refusal_rate``: share of generated answers detected as refusals;
- ``format_validity``: share of cases with a ``json``/``json_schema`` check whose output parses
  as JSON (None when the group has none);
- ``mean_words``: mean length of the generated answers;
- for ``choice`` cases: ``choice_accuracy``, ``ece`` (expected calibration error: the
  confidence-weighted gap between confidence and accuracy over 10 equal-width bins of the top
  option's probability) and ``brier`` (mean over cases of Σ_k (p_k − y_k)², 0 is perfect,
  2 the worst).
"""

from __future__ import annotations

import math
from typing import Any

ECE_BINS = 10
SUITE_METRICS = ("pass_rate", "critical_failures", "refusal_rate", "format_validity", "mean_words",
                 "choice_accuracy", "ece", "brier")
HIGHER_IS_BETTER = {"pass_rate": True, "critical_failures": False, "refusal_rate": None, "format_validity": True,
                    "mean_words": None, "choice_accuracy": True, "ece": False, "brier": False}


def softmax(logps: list[float]) -> list[float]:
    """Probabilities from log-likelihoods, computed stably."""
    top = max(logps)
    exps = [math.exp(v - top) for v in logps]
    total = sum(exps)
    return [e / total for e in exps]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N)·|accuracy_b − mean confidence_b| over equal-width confidence bins."""
    if not confidences:
        return 0.0
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidences[i] for i in idx) / len(idx)
            total += len(idx) / len(confidences) * abs(acc - conf)
    return total


def brier_score(probs: list[list[float]], answers: list[int]) -> float:
    """Mean over cases of Σ_k (p_k − 1[k = answer])²."""
    if not probs:
        return 0.0
    return sum(sum((p - (k == a)) ** 2 for k, p in enumerate(ps)) for ps, a in zip(probs, answers)) / len(probs)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of one group of case results (see the module docstring)."""
    n = len(results)
    generated = [r for r in results if r.get("output") is not None]
    formats = [r["format_ok"] for r in results if r.get("format_ok") is not None]
    choices = [r["choice"] for r in results if r.get("choice")]
    failed_critical = [r["id"] for r in results if r["critical"] and not r["passed"]]
    out: dict[str, Any] = {
        "n": n,
        "passed": sum(r["passed"] for r in results),
        "pass_rate": sum(r["passed"] for r in results) / n if n else 0.0,
        "critical_failures": len(failed_critical),
        "critical_failed": failed_critical,
        "refusal_rate": sum(r["refused"] for r in generated) / len(generated) if generated else None,
        "format_validity": sum(formats) / len(formats) if formats else None,
        "mean_words": sum(r["words"] for r in generated) / len(generated) if generated else None,
        "choice_n": len(choices),
        "choice_accuracy": None, "ece": None, "brier": None,
    }
    if choices:
        correct = [c["pred"] == c["answer"] for c in choices]
        out["choice_accuracy"] = sum(correct) / len(choices)
        out["ece"] = expected_calibration_error([max(c["probs"]) for c in choices], correct)
        out["brier"] = brier_score([c["probs"] for c in choices], [c["answer"] for c in choices])
    return out


def summarize_by_slice(results: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"overall": metrics, "slices": {"key=value": metrics}}``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        for k, v in r["slice"].items():
            groups.setdefault(f"{k}={v}", []).append(r)
    return {"overall": summarize(results), "slices": {label: summarize(rs) for label, rs in sorted(groups.items())}}
