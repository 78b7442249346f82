"""`portfolio matrix` from stored results: 20 versions × 10 snapshots.

    python bench/matrix.py [--versions 20] [--snapshots 10] [--db URL]

Fills a fresh registry with N versions (a chain with data edges) and an evaluation of every
version on every snapshot, then times the matrix with its continual-learning numbers
(`build_matrix`, what the command calls) and the whole `portfolio matrix` process, beside a
baseline that asks the registry cell by cell. Goal: under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=10)
    parser.add_argument("--db", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from conftest import save_tiny_model
    from registry import make_lora_files

    from portfolio import DataSpec, ParentSpec, Registry
    from portfolio.adapter_files import read_lora_folder
    from portfolio.evaluation.report import build_matrix

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        url = args.db or f"sqlite:///{work / 'r.db'}"
        reg = Registry.open(url, work / "store")
        reg.bases.add("tiny", save_tiny_model(work / "base"))
        for s in range(args.snapshots):
            path = work / f"d{s}.jsonl"
            path.write_text(json.dumps({"text": f"snapshot {s}"}) + "\n")
            reg.data.add(f"d{s}", [path], f"domain{s}")
        lora = read_lora_folder(make_lora_files(work / "l", 1)[0])
        for v in range(1, args.versions + 1):
            reg.register_version("a", base="tiny", lora=lora, parents=[ParentSpec(f"a@{v - 1}", "finetune", {})] if v > 1 else [],
                                 data=[DataSpec(f"d{(v - 1) % args.snapshots}@1", "train")])
            for s in range(args.snapshots):
                reg.evaluations.record(f"a@{v}", f"d{s}@1", {"loss": 2.0 + 0.01 * v + 0.1 * s, "accuracy": 0.5}, n_tokens=100)

        t = time.perf_counter()
        m = build_matrix(reg, metric="loss")
        library = time.perf_counter() - t
        assert len(m.rows) == args.versions and len(m.cols) == args.snapshots

        t = time.perf_counter()
        for v in range(1, args.versions + 1):  # baseline: one registry call per version
            reg.evaluations.list(f"a@{v}")
        per_cell = time.perf_counter() - t

        env = {**os.environ, "PORTFOLIO_DB": url, "PORTFOLIO_STORE": str(work / "store")}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "portfolio", "matrix"], env=env, check=True, capture_output=True)
        process = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import portfolio.cli"], env=env, check=True)
        startup = time.perf_counter() - t
        reg.close()

    print(f"matrix of {args.versions} versions × {args.snapshots} snapshots from stored results")
    print(f"  build_matrix (one query + lineage for the CL numbers): {library * 1e3:8.1f} ms")
    print(f"  baseline, one registry call per version:               {per_cell * 1e3:8.1f} ms")
    print(f"  whole `portfolio matrix` process:                      {process * 1e3:8.1f} ms (of which Python + import: {startup * 1e3:.0f} ms)")
    print(f"  goal < 1 s: {'met' if process < 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
