"""Continual learning on a public task sequence (issue 25): `bench/continual.py --tasks DIR`.

    python bench/continual.py --tasks ../shared/clbench --order sst2,qqp,mnli,boolq --seeds 0,1,2 \\
        [--methods naive,replay-10-kl,olora,...] [--base PATH|NAME] [--steps N] [--rows N] [--cases N] [--docs]

Each task of DIR (``TASK.train.jsonl``: prompt/completion rows; ``TASK.suite.jsonl``: choice
cases) is registered as a snapshot and a suite of that name. Per seed, the first task is trained
once (``first-s<seed>@1``) and every sequential method starts from a copy of it (an ``import``
edge, the same bytes), then trains the rest of the order through the normal `train` path, each
version warm-starting from the last (O-LoRA through ``--orthogonal``). ``multitask`` is one
adapter trained on every task at once (the upper bound); the zero-shot base is the lower one.
Every version is then scored on every task's suite in one batched pass (`run_suites`; stored,
so ``portfolio matrix --metric choice_accuracy`` shows the same numbers), and from the accuracy
matrix R (row i: after task i; column j: task j) each method gets ACC, BWT and FWT
(`evaluation.continual`), mean ± spread (min–max) over the seeds, next to its cost: training
seconds, peak memory and stored adapter size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Methods: `TrainConfig` settings of every step after the first ("multitask" is special).
METHODS: dict[str, dict[str, float]] = {
    "naive": {"replay_ratio": 0.0, "kl_weight": 0.0},
    **{f"replay-{p}": {"replay_ratio": p / 100, "kl_weight": 0.0} for p in (2, 5, 10, 20)},
    **{f"replay-{p}-kl": {"replay_ratio": p / 100, "kl_weight": 1.0} for p in (2, 5, 10, 20)},
    # the KL weight's axis at the default replay share, and KL 3 at half of it
    **{f"replay-10-kl{w}": {"replay_ratio": 0.10, "kl_weight": float(w)} for w in (3, 10)},
    "replay-5-kl3": {"replay_ratio": 0.05, "kl_weight": 3.0},
    "olora": {"replay_ratio": 0.0, "kl_weight": 0.0, "orthogonal": 0.5},
    "olora-replay-5": {"replay_ratio": 0.05, "kl_weight": 0.0, "orthogonal": 0.5},
    "multitask": {},
}


class BenchmarkError(SystemExit):
    """Bad input: one ``error:`` line and exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def check_tasks(folder: Path, order: list[str]) -> None:
    """Every task in ``order`` has its training rows and a suite of choice cases in ``folder``."""
    if not folder.is_dir():
        raise BenchmarkError(f"--tasks {folder}: no such folder")
    present = sorted(p.name.removesuffix(".train.jsonl") for p in folder.glob("*.train.jsonl"))
    missing = [t for t in order if t not in present]
    if missing:
        raise BenchmarkError(f"--order names {', '.join(missing)}, not a task of {folder} (it has {', '.join(present) or 'none'})")
    for task in order:
        suite = folder / f"{task}.suite.jsonl"
        if not suite.is_file():
            raise BenchmarkError(f"task {task} has no suite: {suite} is missing; each task needs {task}.train.jsonl and {task}.suite.jsonl")
        for n, line in enumerate(suite.read_text().splitlines(), start=1):
            case = json.loads(line) if line.strip() else {}
            kinds = sorted({c.get("kind") for c in case.get("checks", [])})
            if line.strip() and kinds != ["choice"]:
                raise BenchmarkError(f"{suite} line {n}: a {'/'.join(map(str, kinds)) or 'check-less'} case; the benchmark scores "
                                     "choice cases only (one choice check over the task's labels)")


def slice_tasks(folder: Path, order: list[str], out: Path, rows: int | None, cases: int | None, log) -> Path:
    """The tasks as the benchmark uses them, copied into ``out``: the first ``rows`` training
    rows and ``cases`` suite cases, without the cases whose answer is not one of their options
    (GLUE's unlabelled MNLI pairs carry the label "-"; they are said, not scored)."""
    out.mkdir(parents=True, exist_ok=True)
    for task in order:
        lines = (folder / f"{task}.train.jsonl").read_text().splitlines(keepends=True)
        (out / f"{task}.train.jsonl").write_text("".join(lines[:rows] if rows else lines))
        kept, dropped = [], []
        for line in (folder / f"{task}.suite.jsonl").read_text().splitlines(keepends=True):
            if line.strip():
                case = json.loads(line)
                check = case["checks"][0]
                (kept if check.get("answer") in check.get("options", []) or isinstance(check.get("answer"), int) else dropped).append(line)
        if dropped:
            log(f"{task}: left out {len(dropped)} suite case{'s' if len(dropped) > 1 else ''} whose answer is not one of their options "
                f"({', '.join(json.loads(d).get('id', '?') for d in dropped[:5])})")
        (out / f"{task}.suite.jsonl").write_text("".join(kept[:cases] if cases else kept))
    return out


def setup(out: Path, tasks: Path, order: list[str], base: str, resume: bool = False):
    """A fresh registry in OUT with the base, each task's snapshot and suite, and the union of
    the tasks for the multitask bound; with ``resume``, OUT's registry as an earlier run left it."""
    from portfolio import Registry

    if resume and (out / "registry.db").is_file():
        reg = Registry.open(f"sqlite:///{out / 'registry.db'}", out / "store")
        return reg, "base" if Path(base).is_dir() else base
    for sub in ("registry.db", "store", "seeds.json", "gates.json", "commands.json", "wall.json"):
        path = out / sub
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    reg = Registry.open(f"sqlite:///{out / 'registry.db'}", out / "store")
    if Path(base).is_dir():
        reg.bases.add("base", base)
        base_name = "base"
    else:
        reg.bases.add(base)
        base_name = base
    for task in order:
        reg.data.add(task, [tasks / f"{task}.train.jsonl"], task, source=f"{tasks}/{task}.train.jsonl")
        reg.suites.add(task, tasks / f"{task}.suite.jsonl")
    reg.data.add("multitask", [tasks / f"{t}.train.jsonl" for t in order], "multitask", source=f"{tasks}: {', '.join(order)}")
    return reg, base_name


def run_seed(reg, base: str, order: list[str], methods: list[str], seed: int, settings: dict, log, first_ref: str | None = None) -> dict:
    """Every method's versions for one seed: {method: {"versions": [refs], "cost": {...}}};
    with ``first_ref`` (methods added to a recorded seed) its first step is reused."""
    import tempfile
    from types import SimpleNamespace

    from portfolio.export import export_version
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    def train(adapter: str, data: str, from_ref: str | None = None, **extra):
        cfg = TrainConfig(adapter=adapter, data=data, base=base, from_ref=from_ref, seed=seed, **{**settings, **extra})
        return train_adapter(reg, cfg, log=lambda m: None, progress=False)

    if first_ref:
        version = reg.get_version(first_ref)
        first = SimpleNamespace(version=version, metrics=reg.runs.get(version.run_id).metrics)
    else:
        first = train(f"first-s{seed}", f"{order[0]}@1", replay_ratio=0.0)
        log(f"seed {seed}: {first.version.ref} on {order[0]} ({first.metrics['wall_s']:.0f} s)")
    out = {}
    for method in methods:
        if method == "multitask":
            # the same training budget as the whole sequence
            done = train(f"multitask-s{seed}", "multitask@1", replay_ratio=0.0, steps=settings["steps"] * len(order))
            out[method] = {"versions": [done.version.ref], "cost": _cost(reg, [done])}
            log(f"seed {seed}: multitask -> {done.version.ref} ({done.metrics['wall_s']:.0f} s)")
            continue
        adapter = f"{method}-s{seed}"
        folder = export_version(reg, first.version.ref, Path(tempfile.mkdtemp()) / "first", card=False)
        copy = reg.import_adapter(adapter, folder, base, data=[f"{order[0]}@1"], parents=[first.version.ref], relation="import",
                                  description=f"{first.version.ref}, the sequence's shared first step")
        versions, runs, prev = [copy.ref], [first], copy.ref
        for task in order[1:]:
            done = train(adapter, f"{task}@1", from_ref=prev, **METHODS[method])
            versions.append(done.version.ref)
            runs.append(done)
            prev = done.version.ref
        out[method] = {"versions": versions, "cost": _cost(reg, runs)}
        log(f"seed {seed}: {method} -> {', '.join(versions)} ({out[method]['cost']['train_s']:.0f} s)")
    return out


def run_seeds(reg, base: str, order: list[str], methods: list[str], seeds: list[int], settings: dict, record: Path,
              log, train: bool = True) -> dict:
    """`run_seed` for every seed, each recorded in ``record`` (and scored) as soon as it is
    done, so that a run stopped midway resumes (``--resume``) at the first unfinished seed.
    A recorded seed keeps its methods; only the asked-for methods it lacks are trained, from
    its recorded first step. With ``train=False`` (``--render``) nothing is trained: each seed
    gives the asked-for methods it has."""
    done = _read_record(record)
    per_seed = {}
    for seed in seeds:
        have = done.get(seed, {})
        missing = [m for m in methods if m not in have]
        if missing and train:
            first = _first_step(reg, have)
            have.update(run_seed(reg, base, order, missing, seed, settings, log, first_ref=first))
            done[seed] = have
            score(reg, [f"base:{base}"] + [v for m in missing for v in have[m]["versions"]], [f"{t}@1" for t in order], log)
            _write_record(record, done)
        elif have:
            log(f"seed {seed}: {', '.join(m for m in methods if m in have)} kept from {record}")
        if any(m in have for m in methods):
            per_seed[seed] = {m: have[m] for m in methods if m in have}
    if not per_seed:
        raise BenchmarkError(f"{record} holds none of --methods {','.join(methods)} for --seeds {','.join(map(str, seeds))}; "
                             "run without --render first")
    return per_seed


def _read_record(path: Path) -> dict[int, Any]:
    """A per-seed record (OUT/seeds.json, OUT/gates.json): {seed: what that seed produced}."""
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _write_record(path: Path, done: dict[int, Any]) -> None:
    path.write_text(json.dumps({str(k): v for k, v in done.items()}, indent=1) + "\n")


def _first_step(reg, have: dict) -> str | None:
    """The first step a recorded seed's sequences share: the parent of their imported copy."""
    for runs in have.values():
        if len(runs["versions"]) > 1:
            copy = runs["versions"][0]
            return next(p.parent for p in reg.lineage(copy).parents if p.child == copy)
    return None


def _cost(reg, runs) -> dict:
    final = reg.get_version(runs[-1].version.ref)
    return {"train_s": sum(r.metrics["wall_s"] for r in runs), "peak_mb": max(r.metrics["peak_memory_mb"] for r in runs),
            "stored_kb": 4 * final.n_params / 1024, "rank": final.rank}


def score(reg, models: list[str], suites: list[str], log) -> dict[tuple[str, str], float]:
    """choice_accuracy of every model on every suite: the distinct weights first (a copy of
    the first step is scored once), then every name, read back from the stored results."""
    from portfolio.suites.run import run_suites

    seen, distinct = set(), []
    for m in models:
        key = m if m.startswith("base:") else reg.get_version(m).artifact_digest
        if key not in seen:
            seen.add(key)
            distinct.append(m)
    start = time.perf_counter()
    run_suites(reg, distinct, suites, log=lambda *_: None)
    log(f"scored {len(distinct)} models on {len(suites)} suites in {time.perf_counter() - start:.0f} s")
    return {(s.model, s.suite.rpartition("@")[0]): s.metrics["overall"]["choice_accuracy"]
            for s in run_suites(reg, models, suites, log=lambda *_: None)}


def stats(versions: list[str], order: list[str], acc: dict, base_acc: dict) -> dict:
    """ACC, BWT, FWT and the matrix of one method in one seed."""
    from portfolio.evaluation.continual import average_accuracy, backward_transfer, forward_transfer

    R = {v: {t: acc[(v, t)] for t in order} for v in versions}
    tasks = dict(zip(versions, order))
    return {"matrix": [[R[v][t] for t in order] for v in versions], "acc": average_accuracy(R, versions, tasks),
            "bwt": backward_transfer(R, versions, tasks, "accuracy"),
            "fwt": forward_transfer(R, versions, tasks, base_acc, "accuracy")}


def summarise(per_seed: dict, order: list[str], acc: dict, base: str) -> dict:
    """Per method: ACC/BWT/FWT per seed, their mean and min–max, the mean matrix, the cost."""
    base_acc = {t: acc[(f"base:{base}", t)] for t in order}
    out = {"base": {"per_task": base_acc, "acc": statistics.mean(base_acc.values())}, "methods": {}}
    methods = list(dict.fromkeys(m for runs in per_seed.values() for m in runs))
    for method in methods:
        rows, seeds = [], [seed for seed, runs in per_seed.items() if method in runs]
        for seed in seeds:
            runs = per_seed[seed]
            versions = runs[method]["versions"]
            if method == "multitask":
                final = [acc[(versions[0], t)] for t in order]
                rows.append({"matrix": [final], "acc": statistics.mean(final), "bwt": None, "fwt": None})
            else:
                rows.append(stats(versions, order, acc, base_acc))
        entry = {"seeds": rows, "seed_ids": seeds, "cost": {k: statistics.mean(per_seed[x][method]["cost"][k] for x in seeds)
                                                            for k in ("train_s", "peak_mb", "stored_kb", "rank")}}
        for key in ("acc", "bwt", "fwt"):
            values = [r[key] for r in rows if r[key] is not None]
            entry[key] = (statistics.mean(values), min(values), max(values)) if values else None
        size = len(rows[0]["matrix"])
        entry["matrix"] = [[statistics.mean(r["matrix"][i][j] for r in rows) for j in range(len(order))] for i in range(size)]
        out["methods"][method] = entry
    return out


def split_suites(reg, tasks: Path, order: list[str], out: Path) -> None:
    """Each task's suite halved: ``TASK-gate`` (even cases: what the gates see) and
    ``TASK-heldout`` (odd cases: what forgetting is measured on, never shown to a gate)."""
    out.mkdir(parents=True, exist_ok=True)
    for task in order:
        lines = (tasks / f"{task}.suite.jsonl").read_text().splitlines(keepends=True)
        for half, part in (("gate", lines[0::2]), ("heldout", lines[1::2])):
            (out / f"{task}-{half}.suite.jsonl").write_text("".join(part))
            reg.suites.add(f"{task}-{half}", out / f"{task}-{half}.suite.jsonl")


def run_gated(reg, base: str, tasks: Path, order: list[str], method: str, seed: int, settings: dict, out: Path, log,
              max_pass_drop: float = 0.05, forgot_below: float = -0.01) -> list[dict]:
    """The scheduler over the tasks as weekly drops (one task a week, into a watched folder),
    with ``method``'s replay settings and a gate policy whose suite criteria cover every
    earlier task's gate half (a pass rate at most ``max_pass_drop`` below the incumbent's).
    Each week's candidate is then measured on the earlier tasks' held-out halves against the
    incumbent it was gated against: it forgot when that BWT is below ``forgot_below``."""
    import time as _time

    from portfolio.scheduler import jobs
    from portfolio.scheduler.schedules import add_schedule, list_schedules
    from portfolio.scheduler.worker import Worker
    from portfolio.suites.run import run_suites

    adapter = f"gated-{method}-s{seed}"
    for attempt in range(2, 100):  # a seed stopped midway leaves its schedule: a resumed one starts afresh
        if not any(s["adapter"] == adapter for s in list_schedules(reg)):
            break
        adapter = f"gated-{method}-s{seed}-{attempt}"
    watch = out / f"watch-{adapter}"
    shutil.rmtree(watch, ignore_errors=True)
    watch.mkdir(parents=True)
    train = {k: v for k, v in {**settings, **METHODS[method]}.items() if k in ("steps", "batch_size", "seq_len", "lr", "replay_ratio",
                                                                              "kl_weight")}
    add_schedule(reg, adapter, str(watch), every="1s", base=base, settings={**train, "seed": seed}, promote_alias="production")
    worker = Worker(reg, "bench", log=lambda *_: None)
    weeks = []
    for week, task in enumerate(order, start=1):
        earlier = order[: week - 1]
        if earlier:
            reg.gates.set(adapter, suite_criteria={"suites": [f"{t}-gate@1" for t in earlier], "max_pass_regression": max_pass_drop,
                                                   "critical_must_pass": False})
        try:
            incumbent = reg.get_version(f"{adapter}@production").ref
        except Exception:
            incumbent = f"base:{base}"
        shutil.copyfile(tasks / f"{task}.train.jsonl", watch / f"week{week}-{task}.jsonl")
        _time.sleep(1.1)
        jobs.enqueue_due(reg)
        worker.run(once=True)
        job = jobs.list_jobs(reg, schedule=adapter, limit=1)[0]  # this week's (newest first)
        if job["state"] != "succeeded":
            raise BenchmarkError(f"the scheduler's job {job['id']} for week {week} ended {job['state']}: {job.get('error')}")
        result = job["result"]
        candidate = result.get("version")
        entry = {"method": method, "week": week, "task": task, "incumbent": incumbent, "candidate": candidate, "promoted": bool(result.get("promoted", week == 1)),
                 "why": result.get("gate_failures", "")}
        if earlier and candidate:
            scores = {(x.model, x.suite.rpartition("@")[0]): x.metrics["overall"]["choice_accuracy"]
                      for x in run_suites(reg, [candidate, incumbent], [f"{t}-heldout@1" for t in earlier], log=lambda *_: None)}
            entry["bwt"] = statistics.mean(scores[(candidate, f"{t}-heldout")] - scores[(incumbent, f"{t}-heldout")] for t in earlier)
            entry["forgot"] = entry["bwt"] < forgot_below
        weeks.append(entry)
        log(f"gates, week {week} ({task}): {candidate} " + ("promoted" if entry["promoted"] else "refused")
            + (f", held-out BWT {100 * entry['bwt']:+.1f} points" if "bwt" in entry else ""))
    return weeks


def run_gated_seeds(reg, base: str, tasks: Path, order: list[str], method: str, seeds: list[int], settings: dict, out: Path,
                    log, train: bool = True) -> dict[int, list[dict]]:
    """`run_gated` for every seed, each recorded in OUT/gates.json as it ends (kept on
    ``--resume``; with ``train=False`` only what is recorded)."""
    record = out / "gates.json"
    done = _read_record(record)
    def recorded(seed: int) -> bool:
        return bool(done.get(seed)) and done[seed][0].get("method") == method

    for seed in seeds:
        if recorded(seed):
            log(f"gates, seed {seed}: kept from {record}")
        elif train:
            done[seed] = run_gated(reg, base, tasks, order, method, seed, settings, out, log)
            _write_record(record, done)
    return {seed: done[seed] for seed in seeds if recorded(seed)}


def confusion(weeks: list[dict]) -> str:
    """Gate decision × measured forgetting over every gated week (week 1 has no earlier task)."""
    judged = [w for w in weeks if "forgot" in w]
    count = {(p, f): sum(1 for w in judged if w["promoted"] == p and w["forgot"] == f) for p in (True, False) for f in (True, False)}
    lines = ["| gate decision | forgot (held-out BWT < −1 point) | kept |", "|---|---|---|",
             f"| refused | {count[(False, True)]} | {count[(False, False)]} |", f"| promoted | {count[(True, True)]} | {count[(True, False)]} |",
             "", "| week | task | candidate | vs | decision | held-out BWT | why refused |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {w['week']} | {w['task']} | {w['candidate']} | {w['incumbent']} | {'promoted' if w['promoted'] else 'refused'} | "
              f"{_points(w.get('bwt'))} | {(w['why'] or '')[:120]} |" for w in weeks]
    return "\n".join(lines)


def _points(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def _pm(value, scale: float = 100.0) -> str:
    if value is None:
        return "–"
    mean, lo, hi = value
    return f"{scale * mean:+.1f} [{scale * lo:+.1f}, {scale * hi:+.1f}]" if lo != hi else f"{scale * mean:+.1f}"


def _commands(out: Path, command: str, record: bool) -> list[str]:
    """The commands that trained what OUT holds (OUT/commands.json), this one added when it trains."""
    path = out / "commands.json"
    commands = json.loads(path.read_text()) if path.is_file() else []
    if record and command not in commands:
        commands.append(command)
        path.write_text(json.dumps(commands, indent=1) + "\n")
    return commands or [command]


def combine(summary: dict, other: Path, tolerance: float = 1e-9) -> float:
    """Add the methods of another run (``other``/results.json) to ``summary``. The two must
    agree on the base's accuracy and, seed by seed, on every method both ran (training is
    seeded and deterministic on one machine), else one table would not share one baseline.
    Returns the other run's recorded wall time."""
    path = other / "results.json"
    if not path.is_file():
        raise BenchmarkError(f"--combine {other}: no results.json there; run the benchmark with --out {other} first")
    theirs = json.loads(path.read_text())["summary"]
    if theirs["base"]["per_task"].keys() != summary["base"]["per_task"].keys() or any(
            abs(theirs["base"]["per_task"][t] - v) > tolerance for t, v in summary["base"]["per_task"].items()):
        raise BenchmarkError(f"--combine {other}: another task order or another base (zero-shot accuracy differs)")
    for method, m in theirs["methods"].items():
        mine = summary["methods"].get(method)
        if mine is None:
            summary["methods"][method] = m
            continue
        for seed, row in zip(m["seed_ids"], m["seeds"]):
            if seed in mine["seed_ids"] and abs(mine["seeds"][mine["seed_ids"].index(seed)]["acc"] - row["acc"]) > tolerance:
                raise BenchmarkError(f"--combine {other}: {method} seed {seed} differs between the runs; rerun both on one machine")
    summary["methods"] = {k: summary["methods"][k] for k in METHODS if k in summary["methods"]}
    return _wall(other, 0.0)


def _wall(out: Path, seconds: float) -> float:
    """The wall time of every command that trained what OUT holds (OUT/wall.json), ``seconds`` added."""
    path = out / "wall.json"
    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    if seconds:
        path.write_text(json.dumps({"seconds": total}) + "\n")
    return total


def tables(summary: dict, order: list[str], seeds: list[int], commands: list[str]) -> str:
    """The markdown tables: ACC/BWT/FWT and cost per method, then each method's matrix."""
    lines = ["Produced by " + "; then ".join(f"`{c}`" for c in commands) + f" — seeds {', '.join(map(str, seeds))}; "
             "accuracy in points (choice accuracy × 100), mean [min, max] over the method's seeds.", "",
             "| method | seeds | ACC | BWT | FWT | train s | peak MB¹ | stored KB | rank |", "|---|---|---|---|---|---|---|---|---|",
             f"| zero-shot base | – | {100 * summary['base']['acc']:.1f} | – | – | – | – | – | – |"]
    for method, m in summary["methods"].items():
        acc = m["acc"]
        acc_text = f"{100 * acc[0]:.1f}" + (f" [{100 * acc[1]:.1f}, {100 * acc[2]:.1f}]" if acc[1] != acc[2] else "")
        c = m["cost"]
        lines.append(f"| {method} | {len(m['seed_ids'])} | {acc_text} | {_pm(m['bwt'])} | {_pm(m['fwt'])} | {c['train_s']:.0f} | {c['peak_mb']:,.0f} | "
                     f"{c['stored_kb']:,.0f} | {c['rank']:.0f} |")
    lines += ["", "¹ the training process's peak: on a GPU the CUDA allocator's, per run; on a CPU the process's max RSS, "
              "which only grows, so in one benchmark process it cannot tell the methods apart.",
              "", "Accuracy matrices (mean over seeds; row: after training on that task, column: task):", ""]
    for method, m in summary["methods"].items():
        lines += [f"**{method}**", "", "| after | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
        labels = ["all tasks"] if method == "multitask" else order
        lines += [f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |" for label, row in zip(labels, m["matrix"])]
        lines.append("")
    lines += ["**zero-shot base**", "", "| | " + " | ".join(order) + " |", "|---|" + "---|" * len(order),
              "| base | " + " | ".join(f"{100 * summary['base']['per_task'][t]:.1f}" for t in order) + " |"]
    return "\n".join(lines)


def plot(summary: dict, order: list[str], path: Path) -> None:
    """One heat map per method (the mean accuracy matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary["methods"] if m != "multitask"]
    cols = min(4, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        m = summary["methods"][method]
        ax.imshow([[100 * v for v in row] for row in m["matrix"]], vmin=0, vmax=100, cmap="viridis")
        for i, row in enumerate(m["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(order)), order, fontsize=7)
        ax.set_yticks(range(len(order)), order, fontsize=7)
        bwt = m["bwt"][0] if m["bwt"] else 0.0
        ax.set_title(f"{method}\nACC {100 * m['acc'][0]:.1f}, BWT {100 * bwt:+.1f}", fontsize=9)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle("accuracy after each task (rows) on each task (columns)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """The benchmark mode's entry point: bad input and registry errors as one ``error:`` line."""
    from portfolio.errors import PortfolioError

    try:
        run(argv)
    except PortfolioError as exc:
        raise BenchmarkError(str(exc).splitlines()[0]) from None


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=Path, required=True)
    parser.add_argument("--order", default="sst2,qqp,mnli,boolq")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="naive,replay-5,replay-10-kl,replay-20,olora,multitask")
    parser.add_argument("--base", default="smollm2-135m", help="A model folder, or a base portfolio knows by name.")
    parser.add_argument("--steps", type=int, default=60, help="Training steps per task.")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rows", type=int, default=None, help="Only the first N training rows of each task.")
    parser.add_argument("--cases", type=int, default=None, help="Only the first N suite cases of each task.")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "clbench")
    parser.add_argument("--gates", default=None, metavar="METHOD",
                        help="Also run the scheduler over the tasks as weekly drops with METHOD's settings and suite gates on "
                             "every earlier task; report gate decisions against held-out forgetting.")
    parser.add_argument("--gate-seeds", default=None, help="The seeds the gates run on (default: every seed).")
    parser.add_argument("--render", action="store_true",
                        help="Train nothing: the tables and plot from what OUT records for --seeds and --methods.")
    parser.add_argument("--resume", action="store_true",
                        help="Keep OUT's registry and the seeds an earlier run finished; train only the rest.")
    parser.add_argument("--combine", type=Path, action="append", default=[], metavar="OUT2",
                        help="Also report the methods of another run's OUT2 (same tasks and seeds; checked on the base and "
                             "on every method both ran); repeatable.")
    parser.add_argument("--docs", nargs="?", const="continual-benchmark", default=None, metavar="NAME",
                        help="Also write docs/NAME.md and docs/img/NAME.png (NAME: continual-benchmark unless given).")
    args = parser.parse_args(argv)
    order = [t for t in args.order.split(",") if t]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods + ([args.gates] if args.gates else []) if m not in METHODS or (m == args.gates == "multitask")]
    if unknown:
        raise BenchmarkError(f"--methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
        gate_seeds = [int(s) for s in (args.gate_seeds or "").split(",") if s] or seeds
    except ValueError:
        raise BenchmarkError(f"--seeds {args.seeds!r} --gate-seeds {args.gate_seeds!r}: give whole numbers, e.g. 0,1,2") from None
    if len(order) < 2:
        raise BenchmarkError("--order needs at least two tasks: a sequence of one has nothing to forget")
    check_tasks(args.tasks, order)

    from portfolio.cli._base import quiet_libraries

    quiet_libraries()
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    tasks = slice_tasks(args.tasks, order, args.out / "tasks", args.rows, args.cases, log)
    start = time.perf_counter()
    reg, base = setup(args.out, tasks, order, args.base, args.resume or args.render)
    settings = {"steps": args.steps, "rank": args.rank, "lr": args.lr, "batch_size": args.batch_size, "seq_len": args.seq_len}
    command = "python bench/continual.py " + " ".join(map(str, argv if argv is not None else sys.argv[1:]))
    commands = _commands(args.out, command, record=not args.render)
    per_seed = run_seeds(reg, base, order, methods, seeds, settings, args.out / "seeds.json", log, train=not args.render)
    models = [f"base:{base}"] + [v for runs in per_seed.values() for m in runs.values() for v in m["versions"]]
    acc = score(reg, models, [f"{t}@1" for t in order], log)
    summary = summarise(per_seed, order, acc, base)
    wall = 0.0
    for other in args.combine:
        commands += [c for c in _commands(other, "", record=False) if c and c not in commands]
        wall += combine(summary, other)
    text = tables(summary, order, sorted(per_seed), commands)
    gated = {}
    if args.gates:
        split_suites(reg, tasks, order, args.out / "suites")
        gated = run_gated_seeds(reg, base, tasks, order, args.gates, gate_seeds, settings, args.out, log, train=not args.render)
        text += (f"\n\n**Gates on the benchmark** (the scheduler, one task a week, {args.gates}'s settings; suite gates on "
                 "the even cases of every earlier task, forgetting measured on the odd ones):\n\n"
                 + confusion([w for weeks in gated.values() for w in weeks]))
    wall += _wall(args.out, 0.0 if args.render else time.perf_counter() - start)
    text += f"\n\nWall time {wall / 60:.1f} min, over {len(commands)} command(s)."
    (args.out / "results.json").write_text(json.dumps({"summary": summary, "runs": {str(k): v for k, v in per_seed.items()},
                                                       "gated": {str(k): v for k, v in gated.items()}}, indent=1) + "\n")
    (args.out / "results.md").write_text(text + "\n")
    plot(summary, order, args.out / "matrices.png")
    print("\n" + text)
    print(f"\nregistry: portfolio --db sqlite:///{args.out / 'registry.db'} --store {args.out / 'store'} matrix --metric choice_accuracy")
    if args.docs:
        (ROOT / "docs" / f"{args.docs}.md").write_text(f"<!-- written by `{command}` -->\n\n" + text + "\n")
        shutil.copyfile(args.out / "matrices.png", ROOT / "docs" / "img" / f"{args.docs}.png")
    reg.close()
