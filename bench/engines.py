"""Deployment parity and serving throughput: portfolio's reference model against llama.cpp
(over the shipped Q4_1 SmolLM2) and vLLM (CPU), and the same chat load through each server.

    python bench/engines.py [--engines llamacpp,vllm] [--max-new-tokens 16] [--rank 8] [--scale 0.02]
    python bench/engines.py --throughput [--requests 64] [--adapters 4] [--clients 8] [--max-tokens 32]

Throughput: ``--requests`` chat requests spread evenly over ``--adapters`` random rank-8
adapters, sent by ``--clients`` concurrent clients (streaming, greedy), through `portfolio
serve` (one process, mixed-adapter batches), a real ``vllm serve`` (CPU, float32, the adapters
loaded at runtime) and llama.cpp's OpenAI server (``python -m llama_cpp.server``; it holds one
LoRA per model, so one process per adapter, each over the Q4_1 file). Prints requests/s,
generated tokens/s and time to first token p50/p99 for each, and portfolio's throughput as a
share of vLLM's. Needs `make engines` and the server extras of llama-cpp-python
(`make bench-engines` installs them).

A registry with the embedded base and one imported PEFT adapter (rank ``--rank`` on every
linear layer, B drawn with standard deviation ``--scale`` so it changes answers without
wrecking them). For the fixed prompt set of `engines.parity`, it prints the share of prompts
whose greedy continuations are token-identical between the two, the share of tokens before
the first difference, how many answers the adapter changed in each, and each side's time
(the reference: float32 PyTorch; llama.cpp: Q4_1 with Q8_1 activations; vLLM: float32 over
the dequantised folder, started for the run). Needs `make engines`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def random_adapter(base, folder: Path, rank: int, scale: float, seed: int = 3) -> Path:
    """A real PEFT LoRA folder over ``base`` with non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portfolio.modeling import load_base

    model, _ = load_base(base, log=lambda *_: None)
    torch.manual_seed(seed)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="llamacpp,vllm", help="Comma-separated: llamacpp, vllm.")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.02)
    parser.add_argument("--throughput", action="store_true", help="Measure serving throughput instead of parity.")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    from portfolio.cli._base import quiet_libraries

    quiet_libraries()  # portfolio's own output only, as on the command line
    if args.throughput:
        from engines_load import throughput

        throughput(args, random_adapter)
        return

    from portfolio import Registry
    from portfolio.engines.parity import engine_parity

    with tempfile.TemporaryDirectory() as tmp, Registry.open(f"sqlite:///{tmp}/r.db", f"{tmp}/store") as reg:
        base, _ = reg.bases.add("smollm2-135m")
        v = reg.import_adapter("noisy", random_adapter(base, Path(tmp) / "adapter", args.rank, args.scale), base=base.name)
        for engine in args.engines.split(","):
            reports = {}
            for ref in (f"base:{base.name}", v.ref):
                start = time.perf_counter()
                report = engine_parity(reg, ref, engine, max_new_tokens=args.max_new_tokens, log=lambda *_: None)
                reports[ref] = (report, time.perf_counter() - start)
            show(engine, reports, base.name, v.ref, args.max_new_tokens)


def show(engine: str, reports: dict, base_name: str, ref: str, max_new_tokens: int) -> None:
    """Print one engine's table."""
    plain, adapted = reports[f"base:{base_name}"][0], reports[ref][0]
    print(f"\n{engine} vs portfolio's reference model, {len(plain.prompts)} prompts, {max_new_tokens} new tokens, greedy")
    print(f"{'model':<24} {'identical prompts':>18} {'tokens before 1st diff':>24} {'seconds':>8}")
    for name, (report, seconds) in reports.items():
        print(f"{name:<24} {report.identical_share:>18.0%} {report.token_share:>24.0%} {seconds:>8.1f}")
    changed_ref = sum(a.reference != p.reference for a, p in zip(adapted.prompts, plain.prompts))
    changed_eng = sum(a.engine != p.engine for a, p in zip(adapted.prompts, plain.prompts))
    print(f"answers the adapter changed: reference {changed_ref}/{len(plain.prompts)}, {engine} {changed_eng}/{len(plain.prompts)}")
    for p in adapted.prompts:
        if p.first_difference is not None:
            print(f"  differs at token {p.first_difference}: {p.prompt[:30]!r}: {p.reference_text!r} | {p.engine_text!r}")


if __name__ == "__main__":
    main()
