"""Promotion through quality gates, revalidation on fresh data, and what they report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from portfolio.errors import AdapterNotFound, InvalidState
from portfolio.evaluation.evaluate import DEFAULT_SEQ_LEN, evaluate
from portfolio.evaluation.gates import GateCheck, GatePolicy, check_gates, relative_improvement
from portfolio.registry.entities import AliasEvent, Lineage
from portfolio.registry.refs import VERSION_RE
from portfolio.registry.registry import Registry

DEFAULT_DRIFT_THRESHOLD = 0.05


@dataclass(frozen=True)
class PromoteOutcome:
    """What `promote` decided, and why."""

    candidate: str
    incumbent: str
    alias: str
    policy: GatePolicy
    checks: list[GateCheck]
    promoted: bool
    forced: bool
    event: AliasEvent | None = None

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def _train_snapshots(lineage: Lineage) -> list[str]:
    return [d.snapshot for d in lineage.data if d.version == lineage.root and d.role == "train"]


def promote(registry: Registry, ref: str, alias: str = "production", *, force: bool = False, reason: str | None = None,
            seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto", log: Callable[[str], None] = print) -> PromoteOutcome:
    """Evaluate a candidate and the version behind ``alias`` (the base if none) on the gate's
    snapshots, check the gates, and move the alias only if they pass, or with ``force`` and a
    reason. Passes, overrides and refusals all land in the alias history."""
    if force and not (reason and reason.strip()):
        raise InvalidState("--force needs --reason TEXT: overrides are recorded with why")
    candidate = registry.get_version(ref)
    try:
        incumbent = registry.get_version(f"{candidate.adapter}@{alias}").ref
    except AdapterNotFound:
        incumbent = f"base:{candidate.base_model}"
    if incumbent == candidate.ref:
        raise InvalidState(f"{candidate.ref} already is {candidate.adapter}@{alias}")
    stored = registry.get_gate(candidate.adapter)
    policy = GatePolicy(**stored) if stored else GatePolicy(candidate.adapter)
    lineage = registry.lineage(candidate.ref)
    fresh = _train_snapshots(lineage)
    # without an explicit retention list, guard every earlier training snapshot upstream
    retention = policy.retention or [d.snapshot for d in lineage.data if d.role in ("train", "replay") and d.snapshot not in fresh]
    retention = [s for s in dict.fromkeys(retention) if s not in fresh]
    scores = evaluate(registry, [candidate.ref, incumbent], fresh + retention, seq_len=seq_len, device=device, log=log)
    by = {(s.model, s.snapshot): s.metrics[policy.metric] for s in scores}
    checks = check_gates(policy, fresh, retention, {s: by[(candidate.ref, s)] for s in fresh + retention},
                         {s: by[(incumbent, s)] for s in fresh + retention})
    passed = all(c.passed for c in checks)
    if passed or force:
        why = reason or f"gates passed ({len(checks)} checks)"
        event = registry.set_alias(candidate.adapter, alias, candidate.version, reason=why, force=force and not passed,
                                   action="promote" if passed else "override")
        return PromoteOutcome(candidate.ref, incumbent, alias, policy, checks, True, force and not passed, event)
    failed = "; ".join(f"{c.kind} on {c.snapshot}: {c.change:+.1%} (limit {c.limit:+.1%})" for c in checks if not c.passed)
    registry.record_refusal(candidate.adapter, alias, candidate.ref, f"gates failed: {failed}")
    return PromoteOutcome(candidate.ref, incumbent, alias, policy, checks, False, False)


@dataclass(frozen=True)
class Revalidation:
    """A deployed version on fresh data against its score at promotion."""

    version: str
    snapshot: str
    metric: str
    baseline: float
    baseline_snapshot: str
    value: float
    change: float  # relative; negative = worse
    threshold: float
    drifted: bool
    details: dict = field(default_factory=dict)


def revalidate(registry: Registry, target: str, data: list[str], *, threshold: float = DEFAULT_DRIFT_THRESHOLD,
               metric: str = "loss", seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto",
               log: Callable[[str], None] = print) -> list[Revalidation]:
    """Score the version behind ``target`` (e.g. ``NAME@production``) on fresh snapshots and
    compare with its score on the data it was trained on (its level at promotion): a relative
    worsening beyond ``threshold`` marks it drifted. Every result is recorded."""
    if threshold < 0:
        raise InvalidState(f"--threshold must be ≥ 0 (got {threshold})")
    version = registry.get_version(target)
    alias = target.partition("@")[2] if not VERSION_RE.fullmatch(target.partition("@")[2]) else None
    own = _train_snapshots(registry.lineage(version.ref))
    if not own:
        raise InvalidState(f"{version.ref} records no training snapshot to compare with; evaluate it with `portfolio eval` instead")
    scores = evaluate(registry, [version.ref], own + [d for d in data if d not in own], seq_len=seq_len, device=device, log=log)
    by = {s.snapshot: s.metrics[metric] for s in scores}
    baseline = sum(by[s] for s in own) / len(own)
    results = []
    for ref in data:
        snap = registry.get_snapshot(ref).ref
        change = relative_improvement(by[snap], baseline, metric)
        results.append(Revalidation(version.ref, snap, metric, baseline, ",".join(own), by[snap], change, threshold, change < -threshold))
    registry.record_revalidations(version.ref, alias, [
        {"snapshot": r.snapshot, "metric": metric, "baseline": r.baseline, "baseline_snapshot": r.baseline_snapshot,
         "value": r.value, "threshold": threshold, "drifted": r.drifted} for r in results
    ])
    return results
