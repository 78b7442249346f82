"""The artifact store on local disk against an S3 API server on loopback, in one run.

    python bench/store.py [--versions 200]

Starts moto's S3 server as a separate process, then for each store (a local folder; a bucket
on that server) times:

- registration throughput: VERSIONS versions of a tiny model, each a distinct real safetensors
  artifact with a parent and a data edge, through `Registry.register_version`;
- merge read time: a linear merge of two rank-16 LoRAs on SmolLM2-135M's shapes (30 layers,
  all seven projections, ~20 MB each); for S3 once from a cold cache (each blob downloaded,
  checked) and once warm (read from the cache; what every later merge, export or training run
  on that host pays).

The local store is the baseline measured in the same run. moto keeps objects in memory and runs
on the same two cores, so the S3 column shows the protocol's own cost (HTTP, checksums, the
cache), not a real network's latency.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(store: str, work: Path, n: int, tiny_base: Path, medium_base: Path, loras: list[Path], folders: list[Path]) -> dict:
    """Time registration and merge reads on one store."""
    from portfolio import DataSpec, ParentSpec, Registry
    from portfolio.adapter_files import read_lora_folder
    from portfolio.compose.merge import MergeRecipe, merge_adapters

    reg = Registry.open(f"sqlite:///{work / 'registry.db'}", store)
    reg.bases.add("tiny", tiny_base)
    data = work / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    reg.data.add("docs", [data], "bench")
    t = time.perf_counter()
    for i, folder in enumerate(folders):
        reg.register_version("chain", base="tiny", lora=read_lora_folder(folder),
                             parents=[ParentSpec(f"chain@{i}", "finetune", {})] if i else [], data=[DataSpec("docs@1", "train")])
    register = n / (time.perf_counter() - t)

    reg.bases.add("medium", medium_base)
    for i, folder in enumerate(loras):
        reg.import_adapter(f"m{i}", folder, "medium")
    cache = os.environ.get("PORTFOLIO_CACHE")
    if cache:  # a cold cache: as on a host that never read these blobs
        shutil.rmtree(Path(cache) / "s3", ignore_errors=True)
        reg.close()
        reg = Registry.open(f"sqlite:///{work / 'registry.db'}", store)
    recipe = MergeRecipe("linear", (0.5, 0.5))
    t = time.perf_counter()
    merge_adapters(reg, "merged", ["m0@1", "m1@1"], recipe, log=lambda *_: None)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    merge_adapters(reg, "merged", ["m0@1", "m1@1"], recipe, log=lambda *_: None)
    warm = time.perf_counter() - t
    size = sum(reg.store.size(reg.get_version(f"m{i}@1").artifact_digest) for i in range(2))
    problems = reg.verify().problems
    reg.close()
    return {"register": register, "cold": cold, "warm": warm, "bytes": size, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=200)
    args = parser.parse_args()

    from bench.registry import make_lora_files
    from conftest import S3_ENV, make_lora, new_bucket, save_tiny_model, start_moto

    from portfolio.cli._base import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("building a tiny base, a SmolLM2-shaped base and two rank-16 LoRAs for it ...", flush=True)
        tiny = save_tiny_model(work / "tiny")
        medium = save_tiny_model(work / "medium", **SMOLLM2_SHAPE)
        loras = [make_lora(medium, work / f"lora{i}", r=16, alpha=32, targets=TARGETS, seed=i) for i in range(2)]
        folders = make_lora_files(work / "small", args.versions)
        proc, endpoint = start_moto()
        try:
            print("local store ...", flush=True)
            (work / "local").mkdir()
            local = run(str(work / "local" / "store"), work / "local", args.versions, tiny, medium, loras, folders)
            os.environ.update(S3_ENV)
            os.environ["PORTFOLIO_S3_ENDPOINT_URL"] = endpoint
            os.environ["PORTFOLIO_CACHE"] = str(work / "cache")
            print(f"S3 store (moto on {endpoint}) ...", flush=True)
            (work / "s3").mkdir()
            s3 = run(f"s3://{new_bucket(endpoint)}/bench", work / "s3", args.versions, tiny, medium, loras, folders)
        finally:
            proc.terminate()
            proc.wait(10)

    print(f"\nartifact store: local folder vs S3 API on loopback (moto), same run; merge of 2 × {local['bytes'] / 2 / 1e6:.1f} MB LoRAs")
    print(f"{'operation':<44}{'local':>12}{'s3':>12}{'s3 / local':>12}")
    print(f"{'register version (throughput, versions/s)':<44}{local['register']:>12.1f}{s3['register']:>12.1f}{s3['register'] / local['register']:>11.2f}×")
    print(f"{'merge, first read on the host (s)':<44}{local['cold']:>12.2f}{s3['cold']:>12.2f}{s3['cold'] / local['cold']:>11.2f}×")
    print(f"{'merge, blobs already read (s)':<44}{local['warm']:>12.2f}{s3['warm']:>12.2f}{s3['warm'] / local['warm']:>11.2f}×")
    print(f"verify: local {len(local['problems'])} problems, s3 {len(s3['problems'])} problems")


if __name__ == "__main__":
    main()
