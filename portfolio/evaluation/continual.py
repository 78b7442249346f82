"""Continual-learning numbers over an adapter's versions (pure functions).

R[i][j]: the metric of version i on the held-out rows of the snapshot version j was trained
on (its "task"), versions in creation order, T the last. For a score where higher is better:

    ACC          = mean_j R[T][j]                       (average accuracy over every task)
    BWT          = mean_{j<T} (R[T][j] − R[j][j])
    FWT          = mean_{1<i≤T} (R[i−1][i] − b_i)       (b_i: the base alone on task i)
    forgetting_j = max_{l<T} R[l][j] − R[T][j]

as Avalanche and Mammoth report them (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).
ACC is in the metric's own units (a mean loss for a loss).

For a loss both flip sign, so in every case BWT < 0 and forgetting > 0 mean the latest
version got worse on an earlier task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from portfolio.policy.gates import LOWER_IS_BETTER


@dataclass(frozen=True)
class ContinualStats:
    """Per adapter lineage: forgetting of each earlier task and backward transfer."""

    adapter: str
    latest: str
    forgetting: dict[str, float] = field(default_factory=dict)
    bwt: float | None = None
    acc: float | None = None
    fwt: float | None = None


def _goodness(value: float, metric: str) -> float:
    return -value if LOWER_IS_BETTER[metric] else value


def forgetting(R: dict[str, dict[str, float]], order: list[str], tasks: dict[str, str], metric: str) -> dict[str, float]:
    """forgetting_j = best earlier score on task j − latest score on task j (≥ 0 = forgot)."""
    latest = order[-1]
    out = {}
    for version in order[:-1]:
        task = tasks.get(version)
        if task is None or task in out or task not in R.get(latest, {}):
            continue
        earlier = [_goodness(R[v][task], metric) for v in order[:-1] if task in R.get(v, {})]
        if earlier:
            out[task] = max(earlier) - _goodness(R[latest][task], metric)
    return out


def backward_transfer(R: dict[str, dict[str, float]], order: list[str], tasks: dict[str, str], metric: str) -> float | None:
    """BWT = mean over earlier versions j of (latest score on task j − j's own score on it)."""
    latest = order[-1]
    diffs = []
    for version in order[:-1]:
        task = tasks.get(version)
        if task and task in R.get(version, {}) and task in R.get(latest, {}):
            diffs.append(_goodness(R[latest][task], metric) - _goodness(R[version][task], metric))
    return sum(diffs) / len(diffs) if diffs else None


def average_accuracy(R: dict[str, dict[str, float]], order: list[str], tasks: dict[str, str]) -> float | None:
    """ACC = mean over every task of the latest version's score on it."""
    latest = order[-1]
    values = [R[latest][t] for t in dict.fromkeys(tasks[v] for v in order if v in tasks) if t in R.get(latest, {})]
    return sum(values) / len(values) if values else None


def forward_transfer(R: dict[str, dict[str, float]], order: list[str], tasks: dict[str, str], baseline: dict[str, float],
                     metric: str) -> float | None:
    """FWT = mean over versions i after the first of (previous version's score on task i − the
    base's score on it): how much earlier learning helped before task i was trained on."""
    diffs = []
    for prev, version in zip(order, order[1:]):
        task = tasks.get(version)
        if task and task in R.get(prev, {}) and task in baseline:
            diffs.append(_goodness(R[prev][task], metric) - _goodness(baseline[task], metric))
    return sum(diffs) / len(diffs) if diffs else None
