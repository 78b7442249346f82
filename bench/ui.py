"""Dashboard speed on a large portfolio: the server time of every page against a 200 ms budget.

    python bench/ui.py [--adapters 100] [--versions 100] [--repeat 5] [--db URL]

Builds a registry of ADAPTERS × VERSIONS versions through the registry's own API (each version
a finetune of the one before, trained on a drop of its dataset and replaying rows of the drop
before, with its loss on both stored; aliases moved; one snapshot revoked so a chain is
tainted), then requests each page and API route through the ASGI app REPEAT times and reports
the median server time (the app's own X-Response-Ms: routing, queries, rendering).

The baseline, measured in the same run, is the overview built the unpaged way: every adapter
and every version read (`list_adapters` + `list_versions`), what a page would cost without
paging in SQL.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

BUDGET_MS = 200.0


def build(work: Path, db_url: str | None, n_adapters: int, n_versions: int):
    """The registry described in the module docstring."""
    from bench.registry import make_lora_files
    from conftest import save_tiny_model

    from portfolio import DataSpec, ParentSpec, Registry
    from portfolio.adapter_files import read_lora_folder
    from portfolio.registry.registry import EvalSpec

    reg = Registry.open(db_url or f"sqlite:///{work / 'ui.db'}", work / "store")
    reg.bases.add("tiny", save_tiny_model(work / "base"))
    n_data = 10
    for d in range(n_data):
        for v in range(1, 11):
            path = work / f"d{d}-{v}.jsonl"
            path.write_text("".join(f'{{"text": "dataset {d} drop {v} row {i}"}}\n' for i in range(40)))
            reg.data.add(f"data{d}", [path], f"domain{d % 5}", source=f"https://example.org/data{d}", license="CC-BY-4.0")
    lora = read_lora_folder(make_lora_files(work / "lora", 1)[0])
    started = time.perf_counter()
    total = n_adapters * n_versions
    for a in range(n_adapters):
        name, data = f"adapter{a:03d}", f"data{a % n_data}"
        for v in range(1, n_versions + 1):
            drop = (v - 1) % 10 + 1
            snaps = [DataSpec(f"{data}@{drop}", "train")] + ([DataSpec(f"{data}@{drop - 1}", "replay", [0, 1, 2, 3])] if drop > 1 else [])
            evals = [EvalSpec(None, f"{data}@{drop}", {"loss": 2.0 - 0.001 * v}), EvalSpec(None, f"{data}@1", {"loss": 1.5 + 0.002 * v})]
            reg.register_version(name, base="tiny", lora=lora, parents=[ParentSpec(f"{name}@{v - 1}", "finetune", {"lr": 1e-4})] if v > 1 else [],
                                 data=snaps, evaluations=evals, description=f"{name} version {v}")
            done = a * n_versions + v
            if done % 1000 == 0:
                print(f"  registered {done}/{total} versions ({done / (time.perf_counter() - started):.0f}/s)", flush=True)
        for v in range(max(1, n_versions - 4), n_versions + 1):
            reg.set_alias(name, "production", v, reason=f"release {v}")
    reg.governance.revoke("data0@1", "benchmark: a withdrawn drop")
    return reg


def median_ms(client, url: str, repeat: int) -> tuple[float, int]:
    """Median server time of ``repeat`` requests (after one warm-up), and the status."""
    status = client.get(url).status_code
    samples = []
    for _ in range(repeat):
        r = client.get(url)
        samples.append(float(r.headers["x-response-ms"]))
    return statistics.median(samples), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", default=None, help="registry URL (default: a fresh SQLite file)")
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from portfolio.cli._base import quiet_libraries
    from portfolio.ui.app import create_app

    quiet_libraries()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"building {args.adapters} adapters × {args.versions} versions ...", flush=True)
        reg = build(work, args.db, args.adapters, args.versions)
        client = TestClient(create_app(reg, None))
        last, mid = f"adapter{args.adapters - 1:03d}", f"adapter{args.adapters // 2:03d}"
        pages = [
            ("overview", "/"), ("overview, search", "/?q=adapter04"), ("overview, tainted", "/?flag=tainted"),
            ("overview, page 2", "/?page_no=2"), ("adapter", f"/adapters/{mid}"), ("alias timeline", f"/adapters/{mid}/aliases"),
            ("matrix + history", f"/adapters/{mid}/matrix"), ("version (deepest)", f"/versions/{last}/{args.versions}"),
            ("version (first)", f"/versions/{mid}/1"), ("datasets", "/datasets"), ("dataset + reverse lineage", "/datasets/data0/1"),
            ("schedules", "/schedules"), ("events", "/events"),
            ("api adapters", "/api/adapters"), ("api version", f"/api/versions/{last}/{args.versions}"),
            ("api uses", "/api/datasets/data0/1/uses"), ("api matrix", f"/api/adapters/{mid}/matrix"),
        ]
        rows = []
        for label, url in pages:
            ms, status = median_ms(client, url, args.repeat)
            rows.append((label, url, ms, status))
        t = time.perf_counter()
        for _ in range(args.repeat):
            reg.list_adapters()
            reg.list_versions()
        baseline = (time.perf_counter() - t) / args.repeat * 1000

    n = args.adapters * args.versions
    print(f"\nportfolio dashboard on {n:,} versions ({args.adapters} adapters × {args.versions}), median of {args.repeat}, server time")
    print(f"{'page':<28}{'ms':>9}  {'status':>6}  url")
    for label, url, ms, status in rows:
        flag = "" if ms <= BUDGET_MS else "  OVER BUDGET"
        print(f"{label:<28}{ms:>9.1f}  {status:>6}  {url}{flag}")
    slowest = max(rows, key=lambda r: r[2])
    print(f"\nslowest page: {slowest[0]} {slowest[2]:.1f} ms against the {BUDGET_MS:.0f} ms budget: "
          f"{'within' if slowest[2] <= BUDGET_MS else 'OVER'} budget")
    print(f"baseline (unpaged overview: list_adapters + list_versions of all {n:,}): {baseline:.1f} ms, "
          f"{baseline / rows[0][2]:.1f}× the paged overview")
    if any(status != 200 for *_, status in rows):
        sys.exit("a page did not answer 200")


if __name__ == "__main__":
    main()
