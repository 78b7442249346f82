"""A week of daily data drops for two domains, simulated in minutes (docs/scheduler.md).

    python examples/week.py [--days 7] [--steps 4] [--tiny]

Two schedules watch two folders: `python-docs` (Python's language reference) and
`python-code` (standard-library source). Each simulated day drops one new file into each
folder and runs `portfolio scheduler run --once`: the worker snapshots the drop, revalidates
the production version on it, trains a new version from it with replay of every earlier drop,
and promotes it only through the gates. At the end it prints the jobs, the alias histories and
the lineage, and writes it as Mermaid and DOT into build/week/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from python_docs import python_reference_rows, stdlib_source_rows, write_jsonl  # noqa: E402

WORK = Path(os.environ.get("PORTFOLIO_WEEK_DIR", "build/week")).resolve()
MODULES = ("json/decoder.py", "textwrap.py", "fractions.py", "statistics.py", "heapq.py", "bisect.py", "shlex.py",
           "colorsys.py", "difflib.py", "calendar.py", "string.py", "copy.py", "pprint.py", "glob.py")


def portfolio(*args: str, quiet: bool = False) -> str:
    """Run one CLI command against the week's registry; echo it unless quiet."""
    env = {**os.environ, "PORTFOLIO_DB": f"sqlite:///{WORK / 'registry.db'}", "PORTFOLIO_STORE": str(WORK / "store"),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "portfolio", *map(str, args)], env=env, text=True, capture_output=True)
    if not quiet:
        print(f"$ portfolio {' '.join(map(str, args))}")
        print(result.stdout, end="")
    for line in result.stderr.splitlines():
        if line.startswith("[") or line.startswith("error"):
            print("  " + line)
    if result.returncode != 0:
        raise SystemExit(f"failed: portfolio {' '.join(map(str, args))}\n{result.stderr}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "docs").mkdir(parents=True)
    (WORK / "code").mkdir(parents=True)
    docs = python_reference_rows(0, 79)
    code = stdlib_source_rows(MODULES)
    per_day_docs, per_day_code = len(docs) // args.days, len(code) // args.days

    portfolio("init", quiet=True)
    portfolio("base", "add", "smollm2-135m")
    train = ["--train-steps", args.steps, "--batch-size", "4", "--seq-len", "128", "--lr", "1e-3", "--replay-ratio", "0.25"]
    portfolio("schedule", "add", "python-docs", "--base", "smollm2-135m", "--watch", WORK / "docs", "--every", "1s",
              "--domain", "python", "--promote-alias", "production", *train)
    portfolio("schedule", "add", "python-code", "--base", "smollm2-135m", "--watch", WORK / "code", "--every", "1s",
              "--domain", "python-code", "--promote-alias", "production", *train)
    started = time.time()
    per_day = []
    for day in range(1, args.days + 1):
        print(f"\n## day {day}: one new file in each watched folder")
        write_jsonl(WORK / "docs" / f"2026-11-{day:02d}.jsonl", docs[(day - 1) * per_day_docs : day * per_day_docs])
        write_jsonl(WORK / "code" / f"2026-11-{day:02d}.jsonl", code[(day - 1) * per_day_code : day * per_day_code])
        time.sleep(1.1)  # both schedules are due again
        t = time.time()
        portfolio("scheduler", "run", "--once", "--worker", "laptop")
        per_day.append(time.time() - t)
        print(f"  (day {day}: both cycles in {per_day[-1]:.0f} s)")
    print(f"\n# {args.days} simulated days in {time.time() - started:.0f} s; per day (both cycles): "
          + ", ".join(f"{s:.0f} s" for s in per_day) + "\n")
    portfolio("jobs")
    portfolio("alias", "history", "python-docs")
    portfolio("list")
    portfolio("lineage", "python-docs@production")
    portfolio("lineage", "python-docs@production", "--format", "mermaid", "-o", WORK / "lineage-docs.mmd")
    portfolio("lineage", "python-code@production", "--format", "mermaid", "-o", WORK / "lineage-code.mmd")
    # The gates checked earlier drops on each adapter's bounded retention set, so the matrix
    # holds each version on its own drop; score the final versions on every drop (one model
    # load each) to complete the last row, and with it BWT.
    for name in ("python-docs", "python-code"):
        portfolio("eval", f"{name}@production", *[a for d in range(1, args.days + 1) for a in ("--data", f"{name}@{d}")],
                  "--seq-len", "128", quiet=True)
    portfolio("matrix", "--plot", WORK / "matrix.png")


if __name__ == "__main__":
    main()
