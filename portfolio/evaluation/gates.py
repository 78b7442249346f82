"""Quality gates: pure functions over scores, no I/O.

A candidate may take an alias only if, against the version the alias points at now (the
incumbent; the base when there is none):

- on every **retention** snapshot (earlier domains, a general set) it is not worse by more
  than ``max_regression``, relative:  (cand − inc) / inc ≤ max_regression  for a loss;
- on every **fresh** snapshot (what it was trained on) it gains at least ``min_gain``,
  relative:  (inc − cand) / inc ≥ min_gain.

For a metric where higher is better (accuracy) both differences flip sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portfolio.errors import PortfolioError

LOWER_IS_BETTER = {"loss": True, "perplexity": True, "accuracy": False}
EPS = 1e-9  # a change exactly at the limit passes, whatever the float rounding


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

    def __post_init__(self) -> None:
        problems = []
        if self.metric not in LOWER_IS_BETTER:
            problems.append(f"--metric must be one of {', '.join(LOWER_IS_BETTER)} (got {self.metric!r})")
        if self.max_regression < 0:
            problems.append(f"--max-regression must be ≥ 0 (got {self.max_regression})")
        if problems:
            raise InvalidGate("; ".join(problems))


@dataclass(frozen=True)
class GateCheck:
    """One comparison: passed or not, with the numbers."""

    kind: str  # "retention" or "gain"
    snapshot: str
    candidate: float
    incumbent: float
    change: float  # relative improvement (positive = candidate better)
    limit: float
    passed: bool


def relative_improvement(candidate: float, incumbent: float, metric: str) -> float:
    """(inc − cand)/|inc| for a loss, (cand − inc)/|inc| for a score: positive = better."""
    diff = incumbent - candidate if LOWER_IS_BETTER[metric] else candidate - incumbent
    return diff / abs(incumbent) if incumbent else diff


def check_gates(policy: GatePolicy, fresh: list[str], retention: list[str],
                candidate: dict[str, float], incumbent: dict[str, float]) -> list[GateCheck]:
    """Every gate check of a candidate against the incumbent, scores keyed by snapshot."""
    checks = []
    for snap in retention:
        change = relative_improvement(candidate[snap], incumbent[snap], policy.metric)
        checks.append(GateCheck("retention", snap, candidate[snap], incumbent[snap], change, -policy.max_regression, change >= -policy.max_regression - EPS))
    for snap in fresh:
        change = relative_improvement(candidate[snap], incumbent[snap], policy.metric)
        checks.append(GateCheck("gain", snap, candidate[snap], incumbent[snap], change, policy.min_gain, change >= policy.min_gain - EPS))
    return checks
