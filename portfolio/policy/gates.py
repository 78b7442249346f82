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
against the incumbent, a maximum expected calibration error, and deployment parity: the
candidate's pass rate on the engine it is served by (``parity_engine``, e.g. llama.cpp over a
Q4_1 base) may fall at most ``max_parity_drop`` below its pass rate on the reference model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import Any

from portfolio.errors import PortfolioError
from portfolio.policy.retention import DEFAULT_RETENTION_SEED, DEFAULT_RETENTION_SIZE, MAX_RETENTION_SIZE

LOWER_IS_BETTER = {"loss": True, "perplexity": True, "accuracy": False}
EPS = 1e-9  # a change exactly at the limit passes, whatever the float rounding
DEFAULT_CONFIDENCE = 0.95
MIN_PAIRED = 8  # fewer paired examples than this give no useful interval
BOOTSTRAP = 2000
PARITY_ENGINES = ("llamacpp", "vllm", "openai")  # engines a parity gate can run suites on (`engines/`)


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
    retention_size: int = DEFAULT_RETENTION_SIZE  # rows in the bounded retention set (policy/retention.py)
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
    parity_engine: str | None = None  # the engine the adapter is served by, e.g. "llamacpp"
    max_parity_drop: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.suites:
            problems.append("behavioural criteria need at least one --suite NAME@V")
        if (self.parity_engine is None) != (self.max_parity_drop is None):
            problems.append("deployment parity needs both --parity ENGINE and --max-parity-drop D")
        if self.parity_engine is not None and self.parity_engine.partition(":")[0] not in PARITY_ENGINES:
            problems.append(f"--parity {self.parity_engine!r}: use one of {', '.join(PARITY_ENGINES)} (optionally :QUANT)")
        for name in ("min_pass_rate", "max_refusal_increase", "max_pass_regression", "max_ece", "max_parity_drop"):
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


@dataclass(frozen=True)
class SuiteInputs:
    """What every behavioural criterion reads for one suite: both models' metrics
    (``{"overall", "slices"}``) and cases, and the confidence of paired intervals."""

    suite: str
    candidate: dict[str, Any]
    incumbent: dict[str, Any]
    candidate_cases: list[dict[str, Any]]
    incumbent_cases: list[dict[str, Any]]
    confidence: float
    served: dict[str, Any] | None = None  # the candidate's metrics on the parity engine
    served_cases: list[dict[str, Any]] | None = None
    engine: str = ""

    @property
    def cand(self) -> dict[str, Any]:
        return self.candidate["overall"]

    @property
    def inc(self) -> dict[str, Any]:
        return self.incumbent["overall"]


def _pass_rate(limit: float, x: SuiteInputs) -> list[GateCheck]:
    return [GateCheck("pass_rate", x.suite, x.cand["pass_rate"], x.inc["pass_rate"], x.cand["pass_rate"] - x.inc["pass_rate"],
                      limit, x.cand["pass_rate"] >= limit - EPS)]


def _slice_pass(limits: dict[str, float], x: SuiteInputs) -> list[GateCheck]:
    checks = []
    for label, limit in limits.items():
        c, i = x.candidate["slices"].get(label), x.incumbent["slices"].get(label)
        if c is None:
            continue  # the slice is in another of the gate's suites
        key, value = label.split("=", 1)
        failing = [r["id"] for r in x.candidate_cases if r["slice"].get(key) == value and not r["passed"]]
        checks.append(GateCheck("slice_pass", f"{x.suite} {label}", c["pass_rate"], i["pass_rate"] if i else float("nan"),
                                c["pass_rate"] - (i["pass_rate"] if i else 0.0), limit, c["pass_rate"] >= limit - EPS,
                                f"failing: {', '.join(failing)}" if failing else ""))
    return checks


def _critical(required: bool, x: SuiteInputs) -> list[GateCheck]:
    if not required:
        return []
    failed = x.cand["critical_failed"]
    outputs = {r["id"]: r["output"] for r in x.candidate_cases}
    detail = "; ".join(f"{cid}: {_short(outputs.get(cid))}" for cid in failed)
    return [GateCheck("critical", x.suite, float(len(failed)), float(x.inc["critical_failures"]),
                      float(x.inc["critical_failures"] - len(failed)), 0.0, not failed, detail)]


def _refusal_rate(limit: float, x: SuiteInputs) -> list[GateCheck]:
    if x.cand["refusal_rate"] is None or x.inc["refusal_rate"] is None:
        return []
    rise = x.cand["refusal_rate"] - x.inc["refusal_rate"]
    return [GateCheck("refusal_rate", x.suite, x.cand["refusal_rate"], x.inc["refusal_rate"], rise, limit, rise <= limit + EPS)]


def _verbosity(limit: float, x: SuiteInputs) -> list[GateCheck]:
    if x.cand["mean_words"] is None or x.inc["mean_words"] is None:
        return []
    rel = (x.cand["mean_words"] - x.inc["mean_words"]) / x.inc["mean_words"] if x.inc["mean_words"] else 0.0
    return [GateCheck("verbosity", x.suite, x.cand["mean_words"], x.inc["mean_words"], rel, limit, abs(rel) <= limit + EPS)]


def _pass_regression(limit: float, x: SuiteInputs) -> list[GateCheck]:
    """Decided on the paired interval over the cases both models answered, so only a
    significant drop refuses; on the point estimate when too few cases pair up."""
    drop = x.inc["pass_rate"] - x.cand["pass_rate"]
    by_id = {c["id"]: c["passed"] for c in x.incumbent_cases}
    pairs = [(float(c["passed"]), float(by_id[c["id"]])) for c in x.candidate_cases if c["id"] in by_id]
    if len(pairs) >= MIN_PAIRED:
        lo, hi = paired_difference_interval([p[0] for p in pairs], [p[1] for p in pairs], x.confidence)
        return [GateCheck("pass_regression", x.suite, x.cand["pass_rate"], x.inc["pass_rate"], -drop, limit,
                          hi >= -limit - EPS, ci=(lo, hi), n=len(pairs))]
    return [GateCheck("pass_regression", x.suite, x.cand["pass_rate"], x.inc["pass_rate"], -drop, limit, drop <= limit + EPS,
                      f"too few paired cases to decide ({len(pairs)} < {MIN_PAIRED}): decided on the point estimate", n=len(pairs))]


def _parity(limit: float, x: SuiteInputs) -> list[GateCheck]:
    """The candidate served (on the parity engine) against the candidate on the reference
    model, case by case: refused only when the served pass rate is significantly more than
    ``limit`` below (paired over the same cases)."""
    if x.served is None:
        return []
    served, reference = x.served["overall"]["pass_rate"], x.cand["pass_rate"]
    where = f"{x.suite} on {x.engine}"
    by_id = {c["id"]: c["passed"] for c in x.candidate_cases}
    pairs = [(float(c["passed"]), float(by_id[c["id"]])) for c in x.served_cases or [] if c["id"] in by_id]
    changed = [c["id"] for c in x.served_cases or [] if c["id"] in by_id and c["passed"] != by_id[c["id"]]]
    detail = f"verdict differs on: {', '.join(changed[:10])}" if changed else ""
    if len(pairs) >= MIN_PAIRED:
        lo, hi = paired_difference_interval([p[0] for p in pairs], [p[1] for p in pairs], x.confidence)
        return [GateCheck("parity", where, served, reference, served - reference, limit, hi >= -limit - EPS, detail, (lo, hi), len(pairs))]
    why = f"too few paired cases to decide ({len(pairs)} < {MIN_PAIRED}): decided on the point estimate"
    return [GateCheck("parity", where, served, reference, served - reference, limit, reference - served <= limit + EPS,
                      "; ".join(filter(None, [why, detail])), n=len(pairs))]


def _ece(limit: float, x: SuiteInputs) -> list[GateCheck]:
    if x.cand["ece"] is None:
        return []
    inc = x.inc["ece"]
    return [GateCheck("ece", x.suite, x.cand["ece"], inc if inc is not None else float("nan"), (inc or 0.0) - x.cand["ece"], limit,
                      x.cand["ece"] <= limit + EPS)]


def _percent(value: float) -> str:
    return f"{value:.0%}"


@dataclass(frozen=True)
class Criterion:
    """One kind of gate check: the `SuiteCriteria` field that switches it on (None: a loss
    gate, built by `check_gates`), how it is checked, how its scores and its limit read, and
    how it reads in the policy's one-line summary."""

    kind: str
    setting: str | None
    check: Callable[[Any, SuiteInputs], list[GateCheck]] | None
    value: Callable[[float], str]
    limit: Callable[[float], str]
    describe: Callable[[Any], list[str]]


# Every gate criterion, in the order checks are made and shown. A new behavioural criterion is
# one entry here plus its SuiteCriteria field (and its `gate set` option).
CRITERIA: tuple[Criterion, ...] = (
    Criterion("retention", None, None, lambda v: f"{v:.4f}", lambda v: f"{v:+.1%}", lambda _: []),
    Criterion("gain", None, None, lambda v: f"{v:.4f}", lambda v: f"{v:+.1%}", lambda _: []),
    Criterion("pass_rate", "min_pass_rate", _pass_rate, _percent, lambda v: f"≥ {v:.0%}", lambda v: [f"pass ≥ {v:.0%}"]),
    Criterion("slice_pass", "slice_min_pass", _slice_pass, _percent, lambda v: f"≥ {v:.0%}",
              lambda limits: [f"{label} pass ≥ {rate:.0%}" for label, rate in limits.items()]),
    Criterion("critical", "critical_must_pass", _critical, lambda v: f"{v:.0f} failing", lambda v: "0 failing",
              lambda on: ["every critical case passes"] if on else []),
    Criterion("refusal_rate", "max_refusal_increase", _refusal_rate, _percent, lambda v: f"rise ≤ {v:.0%}",
              lambda v: [f"refusal rate rises ≤{v:.0%}"]),
    Criterion("verbosity", "max_verbosity_change", _verbosity, lambda v: f"{v:.1f} words", lambda v: f"±{v:.0%}",
              lambda v: [f"mean words change ≤ ±{v:.0%}"]),
    Criterion("pass_regression", "max_pass_regression", _pass_regression, _percent, lambda v: f"drop ≤ {v:.0%}",
              lambda v: [f"pass rate drops ≤{v:.0%}"]),
    Criterion("ece", "max_ece", _ece, lambda v: f"{v:.3f}", lambda v: f"≤ {v:.3f}", lambda v: [f"ECE ≤{v:.3f}"]),
    Criterion("parity", "max_parity_drop", _parity, _percent, lambda v: f"drop ≤ {v:.0%}",
              lambda v: [f"served pass rate ≤{v:.0%} below the reference model's"]),
)
CRITERION = {c.kind: c for c in CRITERIA}


def check_suite_gates(criteria: SuiteCriteria, suite: str, candidate: dict[str, Any], incumbent: dict[str, Any],
                      candidate_cases: list[dict[str, Any]], incumbent_cases: list[dict[str, Any]] | None = None,
                      confidence: float = DEFAULT_CONFIDENCE, served: Any = None) -> list[GateCheck]:
    """Behavioural checks of one suite, one `CRITERIA` entry at a time, for each criterion
    the policy switches on. ``change`` is candidate − incumbent in absolute share (relative
    for verbosity; served − reference for parity). ``served`` is the candidate's run on the
    parity engine (a `SuiteScore`), when the policy names one."""
    inputs = SuiteInputs(suite, candidate, incumbent, candidate_cases, incumbent_cases or [], confidence,
                         served.metrics if served is not None else None, served.cases if served is not None else None,
                         served.engine if served is not None else "")
    checks: list[GateCheck] = []
    for c in CRITERIA:
        setting = getattr(criteria, c.setting) if c.setting else None
        if c.check is not None and setting is not None:
            checks += c.check(setting, inputs)
    return checks


def describe_criteria(criteria: dict[str, Any]) -> str:
    """Behavioural criteria (as stored) in one line."""
    parts = [f"suites {', '.join(criteria['suites'])}"]
    defaults = {"slice_min_pass": {}, "critical_must_pass": True}
    for c in CRITERIA:
        if c.setting is not None:
            setting = criteria.get(c.setting, defaults.get(c.setting))
            if setting is not None:
                parts += c.describe(setting)
                if c.kind == "parity":
                    parts[-1] += f" (on {criteria['parity_engine']})"
    return "; ".join(parts)


def _short(text: str | None, width: int = 80) -> str:
    if text is None:
        return "(no output)"
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= width else flat[: width - 1] + "…")
