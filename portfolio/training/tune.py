"""`tune_adapter`: choose an adapter's LoRA rank (and variant) by evidence.

"Begin with a modest rank, monitor performance gains, and increase gradually if improvements
plateau": one short candidate per setting (rank × variant), each a real candidate version of
the adapter tagged ``tune=<run id>``, trained fresh over the base on the new data with replay
of what the adapter's deployed version learnt. Every candidate and the incumbent (the version
behind the alias; the base when there is none) are then scored in one pass on the new data's
held-out rows and on the adapter's bounded retention set, and `choose` picks:

- the **best** gain is the candidate with the largest relative gain over the incumbent on the
  new data;
- a candidate is **within noise of the best** when the paired bootstrap interval of its change
  against the best (same examples, same resampling as the gates) reaches 0;
- it **passes** when the adapter's gate policy (retention and gain checks, `policy.gates`)
  passes it against the incumbent;
- the **pick** is the smallest (fewest parameters) candidate that is within noise of the best
  and passes; none when no candidate passes.

The table, the choice and its reasons are stored on the ``tune`` run; `plot_front` draws the
gain-vs-forgetting front. ``promote=True`` sends the pick through `promote` (the full gates,
suites included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from portfolio.errors import AdapterNotFound, NotFound, PortfolioError
from portfolio.policy.gates import GatePolicy, check_gates, paired_interval, relative_improvement

#: The variants `tune --variants` takes, as `TrainConfig` settings; cost order breaks ties.
VARIANTS: dict[str, dict[str, bool]] = {
    "lora": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
}


SET_PER_CANDIDATE = ("adapter", "data", "base", "from_ref", "rank", "alpha", "steps", "epochs", "replay_from", "device", "use_dora",
                     "use_rslora", "init")


class InvalidTune(PortfolioError, ValueError):
    """A tuning request that cannot run."""


@dataclass
class Candidate:
    """One setting's version and its scores against the incumbent."""

    setting: str  # "r8 dora"
    rank: int
    variant: str
    ref: str
    n_params: int
    gain: float = 0.0  # relative improvement on the new data (positive: better than the incumbent)
    gain_ci: tuple[float, float] | None = None
    retention: float | None = None  # relative change on the retention set (negative: forgot)
    retention_ci: tuple[float, float] | None = None
    vs_best_ci: tuple[float, float] | None = None
    within_noise: bool = False
    gates_passed: bool = False
    failed: list[str] = field(default_factory=list)
    picked: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass
class TuneOutcome:
    """What `tune_adapter` did."""

    run_id: int
    adapter: str
    data: str
    incumbent: str
    candidates: list[Candidate]
    pick: str | None
    reason: str
    promoted: Any = None  # a PromoteOutcome with ``promote=True``

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"run": self.run_id, "adapter": self.adapter, "data": self.data, "incumbent": self.incumbent,
                "candidates": [c.to_dict() for c in self.candidates], "pick": self.pick, "reason": self.reason,
                "promoted": None if self.promoted is None else {"alias_moved": self.promoted.promoted, "ref": self.promoted.candidate}}


def parse_settings(ranks: list[int] | str, variants: list[str] | str = ("lora",)) -> list[tuple[int, str]]:
    """(rank, variant) for every setting, smallest first; bad input raises `InvalidTune`."""
    if isinstance(ranks, str):
        try:
            ranks = [int(r) for r in ranks.split(",") if r.strip()]
        except ValueError:
            raise InvalidTune(f"--ranks {ranks!r}: give whole numbers separated by commas, e.g. 4,8,16,32") from None
    if isinstance(variants, str):
        variants = [v.strip() for v in variants.split(",") if v.strip()]
    problems = []
    if not ranks:
        problems.append("--ranks names no rank; e.g. 4,8,16,32")
    if any(r < 1 for r in ranks):
        problems.append(f"--ranks must be positive (got {','.join(map(str, ranks))})")
    if len(set(ranks)) != len(ranks):
        problems.append("--ranks lists a rank twice")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        problems.append(f"--variants {','.join(unknown) or '(none)'}: choose from {', '.join(VARIANTS)}")
    if problems:
        raise InvalidTune("; ".join(problems))
    order = list(VARIANTS)
    return sorted(((r, v) for r in ranks for v in dict.fromkeys(variants)), key=lambda s: (s[0], order.index(s[1])))


def choose(candidates: list[Candidate], scores: dict[str, list[list[float]]], incumbent: str, data: str,
           retention: list[str], policy: GatePolicy) -> tuple[str | None, str]:
    """Fill in each candidate's gain, retention change, gate verdict and closeness to the
    best from ``scores[(ref, target)]`` (per-example ``[loss sum, correct, tokens]`` rows);
    mark and return the pick and why (see the module docstring)."""
    from portfolio.evaluation.metrics import metrics_from_rows

    metric = policy.metric

    def value(ref: str, target: str) -> float:
        return metrics_from_rows(scores[(ref, target)])[metric]

    for c in candidates:
        c.gain = relative_improvement(value(c.ref, data), value(incumbent, data), metric)
        c.gain_ci = _interval(scores[(c.ref, data)], scores[(incumbent, data)], policy)
        if retention:
            changes = {r: relative_improvement(value(c.ref, r), value(incumbent, r), metric) for r in retention}
            worst = min(changes, key=changes.get)
            c.retention = changes[worst]
            c.retention_ci = _interval(scores[(c.ref, worst)], scores[(incumbent, worst)], policy)
        targets = [data] + retention
        checks = check_gates(policy, [data], retention, {t: value(c.ref, t) for t in targets},
                             {t: value(incumbent, t) for t in targets},
                             {t: (scores[(c.ref, t)], scores[(incumbent, t)]) for t in targets})
        c.gates_passed = all(k.passed for k in checks)
        c.failed = [f"{k.kind} on {k.snapshot}: {k.change:+.2%} (limit {k.limit:+.2%})" for k in checks if not k.passed]
    best = max(candidates, key=lambda c: c.gain)
    for c in candidates:
        c.vs_best_ci = _interval(scores[(c.ref, data)], scores[(best.ref, data)], policy)
        # not significantly worse than the best: the interval of its change against it reaches 0
        c.within_noise = c is best or (c.vs_best_ci[1] >= 0 if c.vs_best_ci else c.gain >= best.gain)
    eligible = [c for c in candidates if c.within_noise and c.gates_passed]
    if not eligible:
        passing = [c for c in candidates if c.gates_passed]
        why = ("no candidate passes the gate policy against " + incumbent if not passing else
               "every candidate that passes the gates is significantly worse than the best, which does not pass")
        return None, why
    pick = min(eligible, key=lambda c: (c.n_params, candidates.index(c)))
    pick.picked = True
    bigger = [c.setting for c in candidates if c.n_params > pick.n_params and c.within_noise]
    why = (f"{pick.setting} is the smallest setting within noise of the best ({best.setting}, {best.gain:+.2%}) that passes "
           f"the gates" + (f"; larger settings within noise: {', '.join(bigger)}" if bigger else ""))
    return pick.ref, why


def _interval(candidate: list[list[float]], incumbent: list[list[float]], policy: GatePolicy) -> tuple[float, float] | None:
    from portfolio.policy.gates import MIN_PAIRED

    if len(candidate) != len(incumbent) or len(candidate) < MIN_PAIRED:
        return None
    return paired_interval(candidate, incumbent, policy.metric, policy.confidence)


def tune_adapter(registry, adapter: str, data: str, *, ranks: list[int] | str, variants: list[str] | str = ("lora",),
                 budget_steps: int | None = None, base: str | None = None, alias: str = "production", promote: bool = False,
                 train_settings: dict[str, Any] | None = None, device: str = "auto", log: Callable[[str], None] = print,
                 progress: bool = False) -> TuneOutcome:
    """Train one candidate per setting, score them against the incumbent, choose (`choose`)
    and record the choice on a ``tune`` run; with ``promote``, send the pick through `promote`.
    ``train_settings`` go to every candidate's `TrainConfig` (lr, batch size, sequence length...)."""
    from portfolio.evaluation.evaluate import evaluate
    from portfolio.evaluation.promote import promote as promote_version, retention_plan
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    settings = parse_settings(ranks, variants)
    if budget_steps is not None and budget_steps < 1:
        raise InvalidTune(f"--budget-steps must be at least 1 (got {budget_steps})")
    snapshot = registry.data.get(data)
    incumbent, base_name, replay = _incumbent(registry, adapter, alias, base)
    # what each candidate sets itself is not taken from the settings (a schedule's carry its own steps and rank)
    extra = {k: v for k, v in (train_settings or {}).items() if k not in SET_PER_CANDIDATE}
    probe = TrainConfig(adapter=adapter, data=snapshot.ref, **extra)  # bad settings refused before any work
    seq_len = probe.seq_len
    run = registry.runs.start("tune", adapter, {"data": snapshot.ref, "settings": [list(s) for s in settings],
                                                 "budget_steps": budget_steps, "incumbent": incumbent, "train": extra})
    try:
        candidates = []
        for i, (rank, variant) in enumerate(settings, start=1):
            label = f"r{rank} {variant}"
            log(f"tune: {i}/{len(settings)} {label}")
            # with nothing to replay (a new adapter) an explicit KL weight has nothing to act on
            settings_here = {**extra, "kl_weight": None} if not replay else extra
            cfg = TrainConfig(adapter=adapter, data=snapshot.ref, base=base_name, from_ref=f"base:{base_name}", rank=rank,
                              steps=budget_steps, replay_from=replay, device=device, **VARIANTS[variant], **settings_here)
            out = train_adapter(registry, cfg, log=lambda m: None, progress=progress)
            version = registry.tag(out.version.ref, {"tune": str(run.id), "tune_setting": label.replace(" ", "-")})
            candidates.append(Candidate(label, rank, variant, version.ref, version.n_params))
            log(f"tune: {label} -> {version.ref} ({version.n_params:,} parameters)")
        stored = registry.gates.get(adapter)  # read once the adapter exists (a new one does now)
        policy = GatePolicy(**stored) if stored else GatePolicy(adapter)
        lineage = registry.lineage(candidates[0].ref)
        retention, targets, _ = retention_plan(registry, adapter, lineage, policy)
        scores = evaluate(registry, [c.ref for c in candidates] + [incumbent], [snapshot.ref] + [r for r in retention if not targets],
                          targets=targets, seq_len=seq_len, device=device, log=lambda m: None)
        rows = {(s.model, s.snapshot): s.per_example for s in scores}
        pick, reason = choose(candidates, rows, incumbent, snapshot.ref, retention, policy)
        registry.runs.update(run.id, status="succeeded", metrics={"candidates": [c.to_dict() for c in candidates], "pick": pick,
                                                                  "reason": reason, "retention": retention})
    except BaseException as exc:
        registry.runs.update(run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    outcome = TuneOutcome(run.id, adapter, snapshot.ref, incumbent, candidates, pick, reason)
    if promote and pick is not None:
        outcome.promoted = promote_version(registry, pick, alias, device=device, log=log)
    return outcome


def _incumbent(registry, adapter: str, alias: str, base: str | None) -> tuple[str, str, list[str]]:
    """(the version behind ``alias`` or ``base:NAME``, the base's name, the snapshots its
    lineage trained on: what the candidates replay)."""
    try:
        versions = registry.list_versions(adapter=adapter)
    except AdapterNotFound:
        versions = []
    base_name = base or (versions[0].base_model if versions else None)
    if base_name is None:
        raise InvalidTune(f"adapter {adapter!r} is new: name its base model with --base")
    if versions and versions[0].base_model != base_name:
        raise InvalidTune(f"adapter {adapter!r} is built on {versions[0].base_model!r}, not {base_name!r}")
    registry.bases.get(base_name)
    try:
        current = registry.get_version(f"{adapter}@{alias}")
    except NotFound:  # no such adapter, or the alias is not set: the base is the incumbent
        current = None
    if current is None:
        return f"base:{base_name}", base_name, []
    lineage = registry.lineage(current.ref)
    trained = [d.snapshot for d in lineage.data if d.role == "train" and not d.revoked]
    return current.ref, base_name, list(dict.fromkeys(trained))


def stored_tune(registry, run_id: int) -> dict[str, Any]:
    """A finished ``tune`` run as `TuneOutcome.to_dict` gives it (for its picture and the
    dashboard)."""
    run = registry.runs.get(run_id)
    if run.kind != "tune":
        raise InvalidTune(f"run {run_id} is a {run.kind} run, not a tune run; `portfolio runs` lists them")
    if run.status != "succeeded":
        raise InvalidTune(f"tune run {run_id} is {run.status}: it has no choice to show")
    m = run.metrics
    return {"run": run.id, "adapter": run.adapter, "data": run.config["data"], "incumbent": run.config["incumbent"],
            "candidates": m["candidates"], "pick": m["pick"], "reason": m["reason"], "promoted": None}
