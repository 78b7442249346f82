"""Scheduler overheads on SQLite and PostgreSQL, in one run.

    python bench/scheduler.py [--schedules 50] [--rounds 20] [--pg URL]

1. Empty cycles: N due schedules whose folders hold nothing new; a worker's check of all of
   them (scan, "nothing new", reschedule) plus an empty queue poll, repeated: schedules
   checked per second.
2. Cycle overhead: one real cycle on the tiny test model (snapshot, revalidate, train,
   evaluate, gate, promote) minus the training loop's own time: what the scheduler and the
   registry add around training.
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


def run(url: str, work: Path, n: int, rounds: int, tiny: Path) -> dict:
    from conftest import domain_rows

    from portfolio import Registry
    from portfolio.registry.models import ScheduleRow, utcnow
    from portfolio.scheduler import jobs
    from portfolio.scheduler.schedules import add_schedule
    from portfolio.scheduler.worker import Worker

    reg = Registry.open(url, work / "store")
    reg.bases.add("tiny", tiny)
    for i in range(n):
        (work / f"w{i}").mkdir()
        add_schedule(reg, f"a{i}", str(work / f"w{i}"), every="1s", base="tiny")
    import sqlalchemy as sa

    t = time.perf_counter()
    for _ in range(rounds):
        with reg.transaction() as s:  # make every schedule due again
            s.execute(sa.update(ScheduleRow).values(next_run_at=utcnow()))
        jobs.enqueue_due(reg)
        assert jobs.claim_job(reg, "bench", 60) is None
    empty = n * rounds / (time.perf_counter() - t)

    watch = work / "cycle"
    watch.mkdir()
    (watch / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in domain_rows("words")))
    add_schedule(reg, "cycle", str(watch), every="1h", base="tiny", promote_alias="production",
                 settings={"steps": 20, "batch_size": 4, "seq_len": 32, "lr": 0.02})
    with reg.transaction() as s:
        s.execute(sa.update(ScheduleRow).values(paused=True).where(ScheduleRow.adapter != "cycle"))
    t = time.perf_counter()
    Worker(reg, "bench", log=lambda *_: None).run(once=True)
    total = time.perf_counter() - t
    [r] = reg.runs.list(adapter="cycle")
    training = r.metrics["wall_s"]
    reg.close()
    return {"empty": empty, "cycle": total, "training": training}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--pg", default=os.environ.get("PORTFOLIO_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from conftest import pg_schema_url, save_tiny_model, smollm2_tokenizer

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = save_tiny_model(Path(tmp) / "tiny", tokenizer_dir=smollm2_tokenizer(Path(tmp) / "tok"))
        for backend in ("sqlite", "postgresql"):
            work = Path(tmp) / backend
            work.mkdir()
            if backend == "sqlite":
                results[backend] = run(f"sqlite:///{work / 'r.db'}", work, args.schedules, args.rounds, tiny)
            else:
                with pg_schema_url() as url:
                    results[backend] = run(url, work, args.schedules, args.rounds, tiny)
    print(f"{'':<44}{'sqlite':>12}{'postgresql':>12}")
    print(f"{'empty schedule checks per second':<44}" + "".join(f"{results[b]['empty']:>12,.0f}" for b in results))
    print(f"{'one full cycle (tiny model), s':<44}" + "".join(f"{results[b]['cycle']:>12.2f}" for b in results))
    print(f"{'  of which the training loop, s':<44}" + "".join(f"{results[b]['training']:>12.2f}" for b in results))
    print(f"{'  overhead beyond training, s':<44}" + "".join(f"{results[b]['cycle'] - results[b]['training']:>12.2f}" for b in results))
    print(f"({args.schedules} schedules × {args.rounds} rounds; the overhead includes loading the base, tokenising, "
          "revalidating, evaluating new and parent, registering and gating)")


if __name__ == "__main__":
    main()
