"""Registry speed: portfolio against MLflow's model registry, both on their own SQLite file,
in one run.

    python bench/registry.py [--n 10000] [--lookups 1000] [--db URL]

Registers N adapter versions as one chain (each a real safetensors artifact with a
`finetune` edge to the one before and a `train` edge to a dataset snapshot), then times:
registration throughput, lookup by alias, search by tag, and the lineage of the last
version. MLflow does the same for create version / get by alias / search versions; it has
no version-to-version lineage, so the lineage line compares the recursive query with a
walk of one query per hop on the same portfolio database instead.
mlflow is a benchmark-only install (`make bench`), never a dependency of portfolio.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_lora_files(root: Path, n: int) -> list[Path]:
    """N distinct tiny PEFT LoRA folders (r=2 on q_proj of the 2-layer test model)."""
    import torch
    from safetensors.torch import save_file

    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    folders = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        folder = root / f"a{i}"
        folder.mkdir(parents=True)
        tensors = {}
        for layer in range(2):
            key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, 32, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(32, 2, generator=g)
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def bench_portfolio(work: Path, db_url: str | None, n: int, lookups: int, folders: list[Path]) -> dict:
    from conftest import save_tiny_model

    from portfolio import DataSpec, ParentSpec, Registry
    from portfolio.adapter_files import read_lora_folder
    from portfolio.registry.models import AdapterVersionRow, LineageEdgeRow

    reg = Registry.open(db_url or f"sqlite:///{work / 'portfolio.db'}", work / "store")
    reg.bases.add("tiny", save_tiny_model(work / "base"))
    data = work / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    reg.data.add("docs", [data], "bench")

    t = time.perf_counter()
    for i, folder in enumerate(folders):
        reg.register_version(
            "chain", base="tiny", lora=read_lora_folder(folder),
            parents=[ParentSpec(f"chain@{i}", "finetune", {})] if i else [],
            data=[DataSpec("docs@1", "train")],
        )
        if (i + 1) % 2000 == 0:
            print(f"  portfolio: {i + 1}/{n} versions", flush=True)
    register = time.perf_counter() - t

    reg.set_alias("chain", "production", n // 2)
    for v in range(1, n + 1, 100):
        reg.tag(f"chain@{v}", {"team": "search"})
    alias = timed(lambda: reg.get_version("chain@production"), lookups)
    tag = timed(lambda: reg.list_versions(tag=("team", "search")), 20)
    statements = []
    sa.event.listen(reg.engine, "before_cursor_execute", lambda *a: statements.append(1))
    lineage = timed(lambda: reg.lineage(f"chain@{n}"), 3) 
    n_statements = len(statements) // 3
    assert len(reg.lineage(f"chain@{n}").versions) == n

    def walk_per_hop():
        # the naive baseline: one query per hop up the chain
        with reg._read() as s:
            vid = s.scalar(sa.select(AdapterVersionRow.id).where(AdapterVersionRow.version == n))
            seen = 0
            while vid is not None:
                s.get(AdapterVersionRow, vid)
                vid = s.scalar(sa.select(LineageEdgeRow.parent_id).where(LineageEdgeRow.child_id == vid))
                seen += 1
            assert seen == n

    per_hop = timed(walk_per_hop, 3)
    reg.close()
    return {"register": register, "alias": alias, "tag": tag, "lineage": lineage, "lineage_statements": n_statements, "per_hop": per_hop}


def bench_mlflow(work: Path, n: int, lookups: int) -> dict | None:
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError:
        print("  mlflow is not installed: `pip install mlflow` (or `make bench`) to compare", flush=True)
        return None
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("chain")
    t = time.perf_counter()
    for i in range(n):
        client.create_model_version("chain", source=f"file:///artifacts/a{i}")
        if (i + 1) % 2000 == 0:
            print(f"  mlflow: {i + 1}/{n} versions", flush=True)
    register = time.perf_counter() - t
    client.set_registered_model_alias("chain", "production", str(n // 2))
    for v in range(1, n + 1, 100):
        client.set_model_version_tag("chain", str(v), "team", "search")
    alias = timed(lambda: client.get_model_version_by_alias("chain", "production"), lookups)
    tag = timed(lambda: client.search_model_versions("name = 'chain' and tags.team = 'search'", max_results=n), 20)
    found = client.search_model_versions("name = 'chain' and tags.team = 'search'", max_results=n)
    assert len(found) == len(range(1, n + 1, 100))
    return {"register": register, "alias": alias, "tag": tag, "mlflow_version": mlflow.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=1000)
    parser.add_argument("--db", default=None, help="portfolio registry URL (default: a fresh SQLite file)")
    parser.add_argument("--skip-mlflow", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = make_lora_files(work / "loras", args.n)
        print(f"registering {args.n} versions in a chain...", flush=True)
        ours = bench_portfolio(work, args.db, args.n, args.lookups, folders)
        theirs = None if args.skip_mlflow else bench_mlflow(work, args.n, args.lookups)

    def row(name, a, b, unit, fmt):
        ratio = f"{b / a:7.1f}x" if (a and b) else "      -"
        bs = fmt(b) if b is not None else "n/a"
        print(f"{name:<34}{fmt(a):>16}{bs:>16}   {ratio}  {unit}")

    n = args.n
    print(f"\n{'operation (N=' + str(n) + ')':<34}{'portfolio':>16}{'mlflow' if theirs else 'baseline':>16}   speed-up")
    rate = lambda s: f"{n / s:,.0f}/s"  # noqa: E731
    ms = lambda s: f"{s * 1e3:,.2f} ms"  # noqa: E731
    if theirs:
        print(f"{'register version (throughput)':<34}{rate(ours['register']):>16}{rate(theirs['register']):>16}   {theirs['register'] / ours['register']:7.1f}x")
        row("get version by alias (median)", ours["alias"], theirs["alias"], "", ms)
        row(f"search versions by tag ({len(range(1, n + 1, 100))} hits)", ours["tag"], theirs["tag"], "", ms)
    print(f"{'lineage of last version':<34}{ms(ours['lineage']):>16}{'no lineage':>16}")
    print(f"{'  vs. one query per hop (same DB)':<34}{ms(ours['lineage']):>16}{ms(ours['per_hop']):>16}   {ours['per_hop'] / ours['lineage']:7.1f}x")
    print(f"\nlineage of {n} hops used {ours['lineage_statements']} SQL statements (one recursive CTE for the walk)")
    print("portfolio registration includes reading, checking and storing a real safetensors artifact "
          "per version; mlflow's create_model_version records a source URI only.")
    if theirs:
        print(f"mlflow {theirs['mlflow_version']}, registry on SQLite")


if __name__ == "__main__":
    main()
