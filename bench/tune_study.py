"""The rank study on SmolLM2-135M-Instruct (issue 24): `tune` over ranks × LoRA variants on a
domain of the continual-learning study, against a deployed adapter of the domain before it.

    python bench/tune_study.py [--ranks 4,8,16,32] [--variants lora,rslora,dora] [--steps 30] [--out build/tune]

1. a fresh registry with the study's corpora (`bench/continual.py`'s setup, cpu scale);
2. ``study@1`` trained on licenses@1 (rank 8, the study's budget) and promoted to production;
3. `tune_adapter` on python-code@1: one candidate per setting, trained fresh over the base with
   the study's replay default (10% of licenses, KL 1 to the base), scored with the incumbent on
   python-code's held-out rows and the adapter's retention set (licenses);
4. the table (as `portfolio tune --show RUN` prints it) and the front, written to
   docs/img/tune-front.png with ``--docs``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "bench")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="4,8,16,32")
    parser.add_argument("--variants", default="lora,rslora,dora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "tune")
    parser.add_argument("--docs", action="store_true", help="Write the front to docs/img/tune-front.png.")
    args = parser.parse_args()

    from continual import BASE, SCALES, setup

    from portfolio.cli._base import quiet_libraries

    quiet_libraries()
    from portfolio.evaluation.promote import promote
    from portfolio.evaluation.report import plot_tune_front
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter
    from portfolio.training.tune import tune_adapter

    scale = SCALES["cpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    reg = setup(args.out, scale)
    settings = {"batch_size": scale.batch_size, "seq_len": scale.seq_len, "lr": scale.lr}
    start = time.time()
    first = train_adapter(reg, TrainConfig(adapter="study", data="licenses@1", base=BASE, rank=scale.rank, steps=scale.steps,
                                           **settings), log=lambda m: None, progress=False)
    promoted = promote(reg, first.version.ref, log=lambda m: None)
    print(f"{first.version.ref} on licenses@1 (rank {scale.rank}, {scale.steps} steps): promoted={promoted.promoted}", flush=True)
    outcome = tune_adapter(reg, "study", "python-code@1", ranks=args.ranks, variants=args.variants, budget_steps=args.steps,
                           train_settings=settings, log=lambda m: print(m, flush=True))
    wall = time.time() - start
    db = f"sqlite:///{args.out / 'registry.db'}"
    table = subprocess.run([sys.executable, "-m", "portfolio", "--db", db, "--store", str(args.out / "store"), "tune", "study",
                            "--show", str(outcome.run_id)], capture_output=True, text=True)
    print(table.stdout, end="")
    path = ROOT / "docs" / "img" / "tune-front.png" if args.docs else args.out / "tune-front.png"
    plot_tune_front(outcome.to_dict(), path)
    print(f"front: {path}; {len(outcome.candidates)} candidates in {wall / 60:.1f} min; registry {db}")


if __name__ == "__main__":
    main()
