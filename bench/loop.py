"""Does a scheduler cycle stay flat as drops accumulate? Bounded retention against full evaluation.

    python bench/loop.py [--drops 100] [--at 1,10,50,100] [--rows 100] [--retention-size 64] [--steps 4] [--modes retention,full]

One schedule watches a folder; each drop is a new file of ``--rows`` rows (alternating two toy
domains), then one worker cycle runs on it (snapshot, revalidate, train from the production
version with replay of earlier drops, evaluate, gate, promote) on the tiny test model, SQLite
registry. The same sequence runs twice, in one process, in two registries:

- ``retention``: today's cycle — candidate and parent are scored on the fresh drop and on the
  adapter's bounded retention set (``--retention-size`` rows, set on the gate after the first
  cycle; small here so that it is full by the 10th drop, as 256 rows would be with drops of
  a few hundred rows), with cached per-example scores;
- ``full``: the earlier cycle (schedule setting ``full_eval``, `promote --full`): both are scored
  on the whole held-out split of every earlier drop. Its cost grows with every drop, so to keep
  the run short this registry runs the cheap cycle except in a window of three cycles ending at
  each reported size; the window's first cycle also scores the parent on every drop (nothing of
  it is stored yet), the next two are the steady state the old code was in: only the candidate.

At each size in ``--at`` it prints the cycle's overhead beyond the training loop (wall time of
the cycle minus the loop's own time; the mean of the size's cycle and the one before it) and
the ratio of the last size to the second: flat means the 100-drop cycle is within 1.5× the
10-drop one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run_mode(mode: str, work: Path, tiny: Path, drops: int, rows: int, steps: int, at: list[int], retention_size: int) -> dict[int, float]:
    """Overhead (s) of the cycles around each size in ``at``."""
    import sqlalchemy as sa
    from conftest import domain_rows

    from portfolio import Registry
    from portfolio.registry.models import ScheduleRow, utcnow
    from portfolio.scheduler.schedules import add_schedule
    from portfolio.scheduler.worker import Worker

    reg = Registry.open(f"sqlite:///{work / 'r.db'}", work / "store")
    reg.bases.add("tiny", tiny)
    watch = work / "drops"
    watch.mkdir()
    settings = {"steps": steps, "batch_size": 4, "seq_len": 32, "lr": 0.02}
    add_schedule(reg, "loop", str(watch), every="1h", base="tiny", promote_alias="production", settings=settings)
    worker = Worker(reg, "bench", log=lambda *_: None)
    overhead: dict[int, float] = {}
    windows = {n - k for n in at for k in range(3) if n - k >= 1}
    for d in range(1, drops + 1):
        kind = "words" if d % 2 else "numbers"
        (watch / f"drop-{d:04d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in domain_rows(kind, n=rows, seed=d)))
        with reg.transaction() as s:  # due now; in the full registry, the full evaluation inside the windows only
            s.execute(sa.update(ScheduleRow).values(next_run_at=utcnow(), settings={**settings, "full_eval": mode == "full" and d in windows}))
        t = time.perf_counter()
        worker.run(once=True)
        total = time.perf_counter() - t
        if d in windows:
            run = reg.runs.list(adapter="loop")[0]
            overhead[d] = total - run.metrics["wall_s"]
        if d == 1:
            # every candidate is promoted, so that the lineage — and with it what a full
            # evaluation must cover — grows by one drop per cycle, as in a healthy portfolio
            reg.gates.set("loop", max_regression=10.0, min_gain=-10.0, retention_size=retention_size)
        print(f"\r{mode}: drop {d}/{drops} ({total:.1f} s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    promoted = sum(1 for e in reg.alias_history("loop", "production") if e.action in ("set", "promote"))
    assert promoted == drops, f"{mode}: only {promoted} of {drops} cycles promoted"
    reg.close()
    return {n: sum(overhead[k] for k in (n - 1, n) if k >= 1) / len([k for k in (n - 1, n) if k >= 1]) for n in at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=100)
    parser.add_argument("--at", default="1,10,50,100", help="Sizes (drop counts) to report.")
    parser.add_argument("--rows", type=int, default=100, help="Rows per drop (a tenth are held out).")
    parser.add_argument("--retention-size", type=int, default=64, help="Rows in the retention set.")
    parser.add_argument("--steps", type=int, default=4, help="Training steps per cycle.")
    parser.add_argument("--modes", default="retention,full")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import save_tiny_model, smollm2_tokenizer

    from portfolio.cli._base import quiet_libraries

    quiet_libraries()
    at = [n for n in map(int, args.at.split(",")) if n <= args.drops]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_model(Path(tmp) / "tiny", tokenizer_dir=smollm2_tokenizer(Path(tmp) / "tok"))
        warm = Path(tmp) / "warm-up"  # imports and first loads, paid before anything is timed
        warm.mkdir()
        run_mode("warm-up", warm, tiny, 2, args.rows, args.steps, [1, 2], args.retention_size)
        for mode in args.modes.split(","):
            work = Path(tmp) / mode
            work.mkdir()
            results[mode] = run_mode(mode, work, tiny, args.drops, args.rows, args.steps, at, args.retention_size)
    print(f"per-cycle overhead beyond training, s (tiny model, {args.rows} rows per drop, {args.steps} steps, "
          f"retention set of {args.retention_size} rows; mean of the size's cycle and the one before)")
    print(f"{'drops':>8}" + "".join(f"{m:>12}" for m in results))
    for n in at:
        print(f"{n:>8}" + "".join(f"{results[m][n]:>12.2f}" for m in results))
    if len(at) >= 2:
        first, last = at[1], at[-1]
        print(f"{last}-drop / {first}-drop:" + "".join(f"{m} {results[m][last] / results[m][first]:.2f}×  " for m in results))
        if "full" in results and "retention" in results:
            print(f"at {last} drops the full mode costs {results['full'][last] / results['retention'][last]:.1f}× the retention mode")


if __name__ == "__main__":
    main()
