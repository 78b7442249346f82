"""Quality gates: pure functions over scores, no I/O.

A candidate may take an alias only if, against the version the alias points at now (the
incumbent; the base when there is none):

- on every **retention** snapshot (earlier domains, a general set) it is not worse by more
  than ``max_regression``, relative:  (cand − inc) / inc ≤ max_regression  for a loss;
- on every **fresh** snapshot (what it was trained on) it gains at least ``min_gain``,
  relative:  (inc − cand) / inc ≥ min_gain.

For a metric where higher is better (accuracy) both differences flip sign.

**Signal, not noise.** Candidate and incumbent are scored on the same held-out examples, and
each evaluation keeps every example's scores. A gate then bootstraps the examples (the same
resampled indices for both models, `BOOTSTRAP` times, seeded) and takes the two-sided
percentile interval of the change at the policy's ``confidence``. It refuses only what is
*significantly* worse than its limit: the whole interval below it. With fewer than
`MIN_PAIRED` examples there is no interval; the check says so and decides on the point
estimate, as an unpaired gate would.

Behavioural criteria (`SuiteCriteria`) gate on suite runs of candidate and incumbent: a
minimum pass rate overall and per slice, every critical case passing, a maximum rise in the
refusal rate, a maximum relative change in mean answer length, a maximum drop in pass rate
against the incumbent, and a maximum expected calibration error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from portfolio.errors import PortfolioError
from portfolio.evaluation.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE, MAX_RETENTION_SIZE

LOWER_IS_BETTER = {"loss": True, "perplexity": True, "accuracy": False}
EPS = 1e-9  # a change exactly at the limit passes, whatever the float rounding
DEFAULT_CONFIDENCE = 0.95
MIN_PAIRED = 8  # fewer paired examples than this give no useful interval
BOOTSTRAP = 2000


class InvalidGate(PortfolioError, ValueError):
    """A gate policy setting is out of range."""


@dataclass(frozen=True)
class GatePolicy:
    """What a candidate of one adapter must satisfy."""

    adapter: str
    metric: str = "loss"
    max_regression: float = 0.02
    min_gain: float = 0.0
    retention: list[str] = field(default_factory=list)
    confidence: float = DEFAULT_CONFIDENCE
    suite_criteria: dict[str, Any] | None = None
    retention_size: int = DEFAULT_RETENTION_SIZE  # rows in the bounded retention set (evaluation/retention.py)
    retention_seed: int = DEFAULT_RETENTION_SEED

    @property
    def suites(self) -> "SuiteCriteria | None":
        """The behavioural criteria, if any suite gates this adapter."""
        return SuiteCriteria(**self.suite_criteria) if self.suite_criteria else None

    def __post_init__(self) -> None:
        problems = []
        if self.metric not in LOWER_IS_BETTER:
            problems.append(f"--metric must be one of {', '.join(LOWER_IS_BETTER)} (got {self.metric!r})")
        if not self.max_regression >= 0 or not math.isfinite(self.max_regression):
            problems.append(f"--max-regression must be ≥ 0 and finite (got {self.max_regression})")
        if not math.isfinite(self.min_gain):
            problems.append(f"--min-gain must be a finite number (got {self.min_gain})")
        if not 0.5 <= self.confidence < 1:
            problems.append(f"--confidence must be at least 0.5 and below 1, e.g. 0.95 (got {self.confidence})")
        if not (isinstance(self.retention_size, int) and MIN_PAIRED <= self.retention_size <= MAX_RETENTION_SIZE):
            problems.append(f"--retention-size must be a whole number from {MIN_PAIRED} to {MAX_RETENTION_SIZE:,} (got {self.retention_size})")
        if not (isinstance(self.retention_seed, int) and 0 <= self.retention_seed < 2**31):
            problems.append(f"--retention-seed must be a whole number from 0 to 2^31-1 (got {self.retention_seed})")
        if problems:
            raise InvalidGate("; ".join(problems))


@dataclass(frozen=True)
class SuiteCriteria:
    """Release criteria on behaviour, checked on every suite in ``suites``. Rates are shares
    (0..1); None switches a criterion off."""

    suites: list[str]
    min_pass_rate: float | None = None
    slice_min_pass: dict[str, float] = field(default_factory=dict)
    critical_must_pass: bool = True
    max_refusal_increase: float | None = None
    max_verbosity_change: float | None = None
    max_pass_regression: float | None = None
    max_ece: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.suites:
            problems.append("behavioural criteria need at least one --suite NAME@V")
        for name in ("min_pass_rate", "max_refusal_increase", "max_pass_regression", "max_ece"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                problems.append(f"--{name.replace('_', '-')} must be a share from 0 to 1 (got {value})")
        if self.max_verbosity_change is not None and not 0 <= self.max_verbosity_change <= 100:
            problems.append(f"--max-verbosity-change must be a relative change ≥ 0, e.g. 0.5 for ±50% (got {self.max_verbosity_change})")
        for label, rate in self.slice_min_pass.items():
            if not 0 <= rate <= 1:
                problems.append(f"--slice-min-pass {label}:{rate}: the rate must be a share from 0 to 1")
        if problems:
            raise InvalidGate("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain values for storage and --json."""
        return asdict(self)


def parse_slice_min_pass(items: list[str]) -> dict[str, float]:
    """``["risk=high:1.0", ...]`` -> ``{"risk=high": 1.0}``."""
    out = {}
    for item in items:
        label, sep, rate = item.rpartition(":")
        key, eq, value = label.partition("=")
        try:
            out[label] = float(rate)
        except ValueError:
            out[label] = float("nan")
        if not sep or not eq or not key or not value or not math.isfinite(out[label]):
            raise InvalidGate(f"--slice-min-pass {item!r}: write LABEL=VALUE:RATE, e.g. risk=high:1.0")
    return out


@dataclass(frozen=True)
class GateCheck:
    """One comparison: passed or not, with the numbers."""

    kind: str  # "retention", "gain", or a behavioural criterion ("pass_rate", "slice_pass", "critical", ...)
    snapshot: str  # a snapshot, or a suite (with the slice for per-slice checks)
    candidate: float
    incumbent: float
    change: float  # relative improvement (positive = candidate better); for suites, see check_suite_gates
    limit: float
    passed: bool
    detail: str = ""
    ci: tuple[float, float] | None = None  # the change's interval at the policy's confidence (paired bootstrap)
    n: int | None = None  # paired examples behind the interval


def relative_improvement(candidate: float, incumbent: float, metric: str) -> float:
    """(inc − cand)/|inc| for a loss, (cand − inc)/|inc| for a score: positive = better."""
    diff = incumbent - candidate if LOWER_IS_BETTER[metric] else candidate - incumbent
    return diff / abs(incumbent) if incumbent else diff


def _metric_values(sums, metric: str):
    """The metric from summed ``[loss sum, correct, tokens]`` (any leading shape)."""
    import numpy as np

    loss = sums[..., 0] / sums[..., 2]
    if metric == "loss":
        return loss
    if metric == "perplexity":
        return np.exp(np.minimum(loss, 50.0))
    return sums[..., 1] / sums[..., 2]


def paired_interval(candidate: list[list[float]], incumbent: list[list[float]], metric: str, confidence: float,
                    seed: int = 0, n_boot: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile interval of `relative_improvement` over a paired bootstrap: resample the
    examples with replacement (the same draw for both models), recompute both token-weighted
    metrics, take the change; repeat ``n_boot`` times."""
    import numpy as np

    cand, inc = np.asarray(candidate, dtype=np.float64), np.asarray(incumbent, dtype=np.float64)
    n = len(cand)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    c, i = _metric_values(weights @ cand, metric), _metric_values(weights @ inc, metric)
    diff = i - c if LOWER_IS_BETTER[metric] else c - i
    change = np.where(i != 0, diff / np.abs(np.where(i != 0, i, 1.0)), diff)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(change, [tail, 1 - tail])
    return float(lo), float(hi)


def paired_difference_interval(candidate: list[float], incumbent: list[float], confidence: float, seed: int = 0,
                               n_boot: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile interval of mean(candidate) − mean(incumbent) over a paired bootstrap of the
    cases (e.g. pass/fail verdicts of the same suite cases)."""
    import numpy as np

    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(incumbent, dtype=np.float64)
    n = len(diff)
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    means = weights @ diff / n
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def check_gates(policy: GatePolicy, fresh: list[str], retention: list[str],
                candidate: dict[str, float], incumbent: dict[str, float],
                paired: dict[str, tuple[list, list]] | None = None) -> list[GateCheck]:
    """Every gate check of a candidate against the incumbent, scores keyed by snapshot;
    ``paired`` holds both models' per-example scores per snapshot, for intervals."""
    checks = []
    for kind, snaps, limit in (("retention", retention, -policy.max_regression), ("gain", fresh, policy.min_gain)):
        for snap in snaps:
            change = relative_improvement(candidate[snap], incumbent[snap], policy.metric)
            cand_rows, inc_rows = (paired or {}).get(snap, (None, None))
            if cand_rows and inc_rows and len(cand_rows) == len(inc_rows) and len(cand_rows) >= MIN_PAIRED:
                lo, hi = paired_interval(cand_rows, inc_rows, policy.metric, policy.confidence)
                # refused only when the whole interval lies below the limit
                checks.append(GateCheck(kind, snap, candidate[snap], incumbent[snap], change, limit, hi >= limit - EPS,
                                        ci=(lo, hi), n=len(cand_rows)))
            else:
                n = len(cand_rows) if cand_rows and inc_rows and len(cand_rows) == len(inc_rows) else None
                why = (f"too few examples to decide ({n} < {MIN_PAIRED}): decided on the point estimate" if n is not None
                       else "no per-example scores stored: decided on the point estimate")
                checks.append(GateCheck(kind, snap, candidate[snap], incumbent[snap], change, limit, change >= limit - EPS, why, n=n))
    return checks


def check_suite_gates(criteria: SuiteCriteria, suite: str, candidate: dict[str, Any], incumbent: dict[str, Any],
                      candidate_cases: list[dict[str, Any]], incumbent_cases: list[dict[str, Any]] | None = None,
                      confidence: float = DEFAULT_CONFIDENCE) -> list[GateCheck]:
    """Behavioural checks of one suite, from both models' metrics (``{"overall", "slices"}``).
    ``change`` is candidate − incumbent in absolute share (relative for verbosity). The pass-rate
    regression is decided on the paired interval over the cases (with both models' cases), so
    it refuses only a significant drop."""
    cand, inc = candidate["overall"], incumbent["overall"]
    checks: list[GateCheck] = []
    if criteria.min_pass_rate is not None:
        checks.append(GateCheck("pass_rate", suite, cand["pass_rate"], inc["pass_rate"], cand["pass_rate"] - inc["pass_rate"],
                                criteria.min_pass_rate, cand["pass_rate"] >= criteria.min_pass_rate - EPS))
    for label, limit in criteria.slice_min_pass.items():
        c, i = candidate["slices"].get(label), incumbent["slices"].get(label)
        if c is None:
            continue  # the slice is in another of the gate's suites
        failing = [r["id"] for r in candidate_cases if r["slice"].get(label.split("=", 1)[0]) == label.split("=", 1)[1] and not r["passed"]]
        checks.append(GateCheck("slice_pass", f"{suite} {label}", c["pass_rate"], i["pass_rate"] if i else float("nan"),
                                c["pass_rate"] - (i["pass_rate"] if i else 0.0), limit, c["pass_rate"] >= limit - EPS,
                                f"failing: {', '.join(failing)}" if failing else ""))
    if criteria.critical_must_pass:
        failed = cand["critical_failed"]
        outputs = {r["id"]: r["output"] for r in candidate_cases}
        detail = "; ".join(f"{cid}: {_short(outputs.get(cid))}" for cid in failed)
        checks.append(GateCheck("critical", suite, float(len(failed)), float(inc["critical_failures"]),
                                float(inc["critical_failures"] - len(failed)), 0.0, not failed, detail))
    if criteria.max_refusal_increase is not None and cand["refusal_rate"] is not None and inc["refusal_rate"] is not None:
        rise = cand["refusal_rate"] - inc["refusal_rate"]
        checks.append(GateCheck("refusal_rate", suite, cand["refusal_rate"], inc["refusal_rate"], rise, criteria.max_refusal_increase,
                                rise <= criteria.max_refusal_increase + EPS))
    if criteria.max_verbosity_change is not None and cand["mean_words"] is not None and inc["mean_words"] is not None:
        rel = (cand["mean_words"] - inc["mean_words"]) / inc["mean_words"] if inc["mean_words"] else 0.0
        checks.append(GateCheck("verbosity", suite, cand["mean_words"], inc["mean_words"], rel, criteria.max_verbosity_change,
                                abs(rel) <= criteria.max_verbosity_change + EPS))
    if criteria.max_pass_regression is not None:
        drop = inc["pass_rate"] - cand["pass_rate"]
        by_id = {c["id"]: c["passed"] for c in incumbent_cases or []}
        pairs = [(float(c["passed"]), float(by_id[c["id"]])) for c in candidate_cases if c["id"] in by_id]
        if len(pairs) >= MIN_PAIRED:
            lo, hi = paired_difference_interval([p[0] for p in pairs], [p[1] for p in pairs], confidence)
            checks.append(GateCheck("pass_regression", suite, cand["pass_rate"], inc["pass_rate"], -drop, criteria.max_pass_regression,
                                    hi >= -criteria.max_pass_regression - EPS, ci=(lo, hi), n=len(pairs)))
        else:
            checks.append(GateCheck("pass_regression", suite, cand["pass_rate"], inc["pass_rate"], -drop, criteria.max_pass_regression,
                                    drop <= criteria.max_pass_regression + EPS,
                                    f"too few paired cases to decide ({len(pairs)} < {MIN_PAIRED}): decided on the point estimate",
                                    n=len(pairs)))
    if criteria.max_ece is not None and cand["ece"] is not None:
        checks.append(GateCheck("ece", suite, cand["ece"], inc["ece"] if inc["ece"] is not None else float("nan"),
                                (inc["ece"] or 0.0) - cand["ece"], criteria.max_ece, cand["ece"] <= criteria.max_ece + EPS))
    return checks


def _short(text: str | None, width: int = 80) -> str:
    if text is None:
        return "(no output)"
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 1] + "…")
