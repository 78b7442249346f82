"""Promotion through quality gates, revalidation on fresh data, and what they report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from portfolio.errors import AdapterNotFound, InvalidState
from portfolio.evaluation.evaluate import DEFAULT_SEQ_LEN, evaluate, retention_target
from portfolio.policy.gates import CRITERION, GateCheck, GatePolicy, check_gates, check_suite_gates, relative_improvement
from portfolio.registry.entities import AliasEvent, Lineage
from portfolio.registry.governance import DataRevoked
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
    suite_scores: list = field(default_factory=list)

    @property
    def failed(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


def _train_snapshots(lineage: Lineage) -> list[str]:
    return [d.snapshot for d in lineage.data if d.version == lineage.root and d.role == "train" and not d.revoked]


def promote(registry: Registry, ref: str, alias: str = "production", *, force: bool = False, reason: str | None = None,
            full: bool = False, seq_len: int = DEFAULT_SEQ_LEN, device: str = "auto",
            log: Callable[[str], None] = print) -> PromoteOutcome:
    """Evaluate a candidate and the version behind ``alias`` (the base if none), check the
    gates, and move the alias only if they pass, or with ``force`` and a reason. Passes,
    overrides and refusals all land in the alias history.

    Gain is checked on the snapshots the candidate was trained on. Retention is checked on
    the gate's retention snapshots when it names some; otherwise on the adapter's bounded
    retention set over every earlier snapshot upstream (`policy.retention`), or with
    ``full`` on the whole held-out split of each of them."""
    if force and not (reason and reason.strip()):
        raise InvalidState("--force needs --reason TEXT: overrides are recorded with why")
    candidate = registry.get_version(ref)
    if candidate.tainted:
        why = f"tainted: descends from revoked data {', '.join(candidate.tainted_by)}"
        if not force:
            registry.gates.record_refusal(candidate.adapter, alias, candidate.ref, why)
            raise DataRevoked(f"{candidate.ref} is {why}; retrain without it, or pass --force --reason TEXT (recorded as an override)")
        log(f"{candidate.ref} is {why}; forced by --force")
    try:
        incumbent = registry.get_version(f"{candidate.adapter}@{alias}").ref
    except AdapterNotFound:
        incumbent = f"base:{candidate.base_model}"
    if incumbent == candidate.ref:
        raise InvalidState(f"{candidate.ref} already is {candidate.adapter}@{alias}")
    stored = registry.gates.get(candidate.adapter)
    policy = GatePolicy(**stored) if stored else GatePolicy(candidate.adapter)
    lineage = registry.lineage(candidate.ref)
    fresh = _train_snapshots(lineage)
    retention, targets, rset = retention_plan(registry, candidate.adapter, lineage, policy, full)
    scores = evaluate(registry, [candidate.ref, incumbent], fresh + [r for r in retention if not targets], targets=targets,
                      seq_len=seq_len, device=device, log=log)
    by = {(s.model, s.snapshot): s.metrics[policy.metric] for s in scores}
    rows = {(s.model, s.snapshot): s.per_example for s in scores}
    checks = check_gates(policy, fresh, retention, {s: by[(candidate.ref, s)] for s in fresh + retention},
                         {s: by[(incumbent, s)] for s in fresh + retention},
                         {s: (rows[(candidate.ref, s)], rows[(incumbent, s)]) for s in fresh + retention})
    if rset is not None:
        checks = [replace(c, detail=c.detail or f"{targets[0].rows} rows over {len(targets[0].parts)} snapshots")
                  if c.snapshot == rset.ref else c for c in checks]
    criteria = policy.suites
    suite_scores = []
    if criteria is not None:
        from portfolio.suites.run import run_suites

        suite_scores = run_suites(registry, [candidate.ref, incumbent], criteria.suites, device=device, log=log)
        # deployment parity: the candidate as it will be served, on the engine that serves it
        served = (run_suites(registry, [candidate.ref], criteria.suites, log=log, engine=criteria.parity_engine)
                  if criteria.parity_engine else [None] * len(criteria.suites))
        for cand_score, inc_score, on_engine in zip(suite_scores[: len(criteria.suites)], suite_scores[len(criteria.suites):], served):
            checks += check_suite_gates(criteria, cand_score.suite, cand_score.metrics, inc_score.metrics, cand_score.cases,
                                        inc_score.cases, policy.confidence, on_engine)
        suite_scores += [s for s in served if s is not None]
    passed = all(c.passed for c in checks)
    if passed or force:
        # name the retention set version, so that the decision can be replayed on its exact rows
        why = reason or f"gates passed ({len(checks)} checks{f'; retention on {rset.ref}' if rset is not None else ''})"
        overridden = force and (not passed or candidate.tainted)
        event = registry.set_alias(candidate.adapter, alias, candidate.version, reason=why, force=overridden,
                                   action="override" if overridden else "promote")
        return PromoteOutcome(candidate.ref, incumbent, alias, policy, checks, True, overridden, event, suite_scores)
    failed = "; ".join(describe_failure(c) for c in checks if not c.passed)
    registry.gates.record_refusal(candidate.adapter, alias, candidate.ref, f"gates failed: {failed}")
    return PromoteOutcome(candidate.ref, incumbent, alias, policy, checks, False, False, None, suite_scores)


def retention_plan(registry: Registry, adapter: str, lineage: Lineage, policy: GatePolicy, full: bool = False):
    """(retention labels, extra evaluation targets, retention set or None) for a candidate
    with this lineage: the policy's own snapshots; else, with ``full``, every earlier snapshot
    upstream; else the adapter's retention set restricted to those snapshots."""
    fresh = _train_snapshots(lineage)
    # a revoked snapshot is not scored again (a purged one has no rows left to score)
    upstream = list(dict.fromkeys(d.snapshot for d in lineage.data
                                  if d.role in ("train", "replay") and d.snapshot not in fresh and not d.revoked))
    if policy.retention or full:
        revoked = {s.ref for s in registry.data.get_many(policy.retention) if s.revoked} if policy.retention else set()
        return [s for s in dict.fromkeys(policy.retention or upstream) if s not in fresh and s not in revoked], [], None
    if not upstream:
        return [], [], None
    rset = registry.retention.build(adapter, upstream)
    target = retention_target(rset, upstream)
    return ([target.label], [target], rset) if target else ([], [], None)


def format_value(c: GateCheck, value: float) -> str:
    """A gate check's score as people read it (`gates.CRITERIA`): a loss to 4 places, a rate in %, words, ECE."""
    return "-" if value != value else CRITERION[c.kind].value(value)


def format_limit(c: GateCheck) -> str:
    """The check's limit, with the direction it binds in (`gates.CRITERIA`)."""
    return CRITERION[c.kind].limit(c.limit)


def format_change(c: GateCheck) -> str:
    """"+1.8% ± 0.9%": the change and half the width of its paired interval (or the bare change)."""
    if c.kind == "critical":
        return f"{c.change:+.0f}"
    if c.ci is None:
        return f"{c.change:+.1%}"
    lo, hi = c.ci
    return f"{c.change:+.1%} ± {(hi - lo) / 2:.1%}"


def describe_failure(c: GateCheck) -> str:
    """One failed check in words, for the alias history and the refusal message."""
    if c.kind == "critical":
        return f"critical cases failing on {c.snapshot}: {c.detail}"
    if c.kind in ("retention", "gain", "pass_regression", "verbosity"):
        return f"{c.kind} on {c.snapshot}: {format_change(c)} (limit {format_limit(c)})"
    extra = f" [{c.detail}]" if c.detail else ""
    return f"{c.kind} on {c.snapshot}: {format_value(c, c.candidate)} (limit {format_limit(c)}){extra}"


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


def revalidate(registry: Registry, target: str, data: list[str], *, suites: list[str] | None = None,
               threshold: float = DEFAULT_DRIFT_THRESHOLD, metric: str = "loss", seq_len: int = DEFAULT_SEQ_LEN,
               device: str = "auto", log: Callable[[str], None] = print) -> list[Revalidation]:
    """Score the version behind ``target`` (e.g. ``NAME@production``) on fresh snapshots and
    compare with its score on the data it was trained on (its level at promotion): a relative
    worsening beyond ``threshold`` marks it drifted. With ``suites`` (fresh cases), its pass
    rate on each is compared with its pass rate on the suites that gated it (else the previous
    snapshot of the same suite): a drop beyond ``threshold`` (absolute) is drift. Every result
    is recorded."""
    if not threshold >= 0:
        raise InvalidState(f"--threshold must be ≥ 0 (got {threshold})")
    if not data and not suites:
        raise InvalidState("nothing to revalidate on; give --data NAME@V and/or --suite NAME@V")
    version = registry.get_version(target)
    alias = target.partition("@")[2] if not VERSION_RE.fullmatch(target.partition("@")[2]) else None
    results = _revalidate_loss(registry, version, data, threshold, metric, seq_len, device, log) if data else []
    if suites:
        results += _revalidate_suites(registry, version, suites, threshold, device, log)
    registry.gates.record_revalidations(version.ref, alias, [
        {"snapshot": r.snapshot if r.metric != "pass_rate" else None, "suite": r.snapshot if r.metric == "pass_rate" else None,
         "metric": r.metric, "baseline": r.baseline, "baseline_snapshot": r.baseline_snapshot,
         "value": r.value, "threshold": threshold, "drifted": r.drifted} for r in results
    ])
    return results


def _revalidate_suites(registry: Registry, version, suites: list[str], threshold: float, device: str, log) -> list[Revalidation]:
    from portfolio.suites.run import run_suites

    stored = registry.gates.get(version.adapter)
    criteria = GatePolicy(**stored).suites if stored else None
    fresh = [registry.suites.get(s).ref for s in suites]
    baseline_suites = [s for s in (criteria.suites if criteria else []) if s not in fresh]
    if not baseline_suites:
        for ref in fresh:
            name, _, v = ref.rpartition("@")
            if int(v) > 1 and f"{name}@{int(v) - 1}" not in fresh:
                baseline_suites.append(f"{name}@{int(v) - 1}")
    if not baseline_suites:
        raise InvalidState(f"no suite to compare {', '.join(fresh)} with: gate {version.adapter} on a suite "
                           "(`portfolio gate set --suite`) or revalidate on a later snapshot of a suite it passed")
    scores = run_suites(registry, [version.ref], baseline_suites + fresh, device=device, log=log)
    base_scores = scores[: len(baseline_suites)]
    baseline = sum(s.overall["pass_rate"] for s in base_scores) / len(base_scores)
    out = []
    for s in scores[len(baseline_suites):]:
        change = s.overall["pass_rate"] - baseline
        out.append(Revalidation(version.ref, s.suite, "pass_rate", baseline, ",".join(baseline_suites), s.overall["pass_rate"],
                                change, threshold, change < -threshold - 1e-9,
                                {"failed": [c["id"] for c in s.cases if not c["passed"]]}))
    return out


def _revalidate_loss(registry: Registry, version, data: list[str], threshold: float, metric: str, seq_len: int, device: str,
                     log) -> list[Revalidation]:
    own = _train_snapshots(registry.lineage(version.ref))
    if not own:
        raise InvalidState(f"{version.ref} records no training snapshot to compare with; evaluate it with `portfolio eval` instead")
    scores = evaluate(registry, [version.ref], own + [d for d in data if d not in own], seq_len=seq_len, device=device, log=log)
    by = {s.snapshot: s.metrics[metric] for s in scores}
    baseline = sum(by[s] for s in own) / len(own)
    results = []
    for ref in data:
        snap = registry.data.get(ref).ref
        change = relative_improvement(by[snap], baseline, metric)
        results.append(Revalidation(version.ref, snap, metric, baseline, ",".join(own), by[snap], change, threshold, change < -threshold))
    return results
