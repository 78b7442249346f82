"""Training throughput: a plain transformers + PEFT loop against `portfolio train`, on
SmolLM2-135M-Instruct and the same packed data, in one run.

    python bench/train_throughput.py [--steps 8] [--batch-size 4] [--seq-len 256] [--device auto]

Prints tokens/s of each (first step excluded as warm-up, for both), their ratio (goal:
portfolio ≥ 0.95 of plain with replay off), the cost of replay and of the KL term, and on
a GPU the model FLOPs utilisation.

    python bench/train_throughput.py --memory [--steps 4] [--seq-len 256]

Peak memory per setting (issue 24): the same effective batch of 8 sequences trained as one
batch, as 2 × 4 accumulated, with gradient checkpointing, with the base in bfloat16, all
three, and with the base quantised by bitsandbytes (nf4, int8); each a separate `portfolio train` process (peak RSS is per process; on a GPU, the CUDA
allocator's peak), its peak and tokens/s read back from the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def plain_loop(base, examples, args) -> tuple[float, int]:
    """The reference: get_peft_model, AdamW, model(labels=...), nothing else."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portfolio.data.tokenize import collate
    from portfolio.modeling import load_base
    from portfolio.runtime import resolve_device

    torch.manual_seed(0)
    device = resolve_device(args.device)
    model, tok = load_base(base, log=lambda *_: None)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")).to(device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    tokens, seconds = 0, 0.0
    for step in range(args.steps):
        batch = collate(examples[step * args.batch_size : (step + 1) * args.batch_size], tok.eos_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step is warm-up
            seconds += time.perf_counter() - t
            tokens += int(batch["attention_mask"].sum())
    return tokens / seconds, sum(p.numel() for p in model.parameters())


def portfolio_run(reg, adapter, args, **settings) -> tuple[float, float]:
    """`portfolio train` through the Python API; tokens/s over steps 2..N, and wall time of
    the whole command (data prep, load, train, eval, registration)."""
    from portfolio.training.config import TrainConfig
    from portfolio.training.train import train_adapter

    per_step = []
    cfg = TrainConfig(adapter=adapter, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-3,
                      device=args.device, checkpoint_every=10_000, **settings)
    t = time.perf_counter()
    train_adapter(reg, cfg, log=lambda *_: None, progress=False, on_step=lambda step, s: per_step.append((s["tokens"], s["seconds"])))
    wall = time.perf_counter() - t
    timed = per_step[1:]
    return sum(n for n, _ in timed) / sum(s for _, s in timed), wall


MEMORY_SETTINGS = [("batch 8", ["--batch-size", "8"]),
                   ("batch 2 × accumulate 4", ["--batch-size", "2", "--grad-accum", "4"]),
                   ("batch 8, gradient checkpointing", ["--batch-size", "8", "--gradient-checkpointing"]),
                   ("batch 8, base in bfloat16", ["--batch-size", "8", "--dtype", "bfloat16"]),
                   ("2 × 4, checkpointing, bfloat16", ["--batch-size", "2", "--grad-accum", "4", "--gradient-checkpointing",
                                                      "--dtype", "bfloat16"]),
                   ("batch 8, base in nf4 (QLoRA)", ["--batch-size", "8", "--quantize-base", "nf4"]),
                   ("batch 8, base in int8", ["--batch-size", "8", "--quantize-base", "int8"])]


def memory(args) -> None:
    """Peak memory and tokens/s of each of `MEMORY_SETTINGS`, one `portfolio train` process each."""
    import json
    import subprocess

    from python_docs import python_reference_rows, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "portfolio", "--db", f"sqlite:///{tmp}/r.db", "--store", f"{tmp}/store"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(cli + ["base", "add", "smollm2-135m"], check=True, env=env, capture_output=True)
        subprocess.run(cli + ["data", "add", "docs", str(write_jsonl(Path(tmp) / "a.jsonl", python_reference_rows(0, 40))),
                              "--domain", "python"], check=True, env=env, capture_output=True)
        print(f"SmolLM2-135M, LoRA r=16 on q,k,v,o, effective batch 8×{args.seq_len}, {args.steps} steps, device {args.device}")
        print(f"{'setting':<34}{'peak MB':>9}{'tokens/s':>10}")
        rows = []
        for i, (name, flags) in enumerate(MEMORY_SETTINGS):
            subprocess.run(cli + ["train", f"m{i}", "--base", "smollm2-135m", "--data", "docs@1", "--steps", str(args.steps),
                                  "--seq-len", str(args.seq_len), "--device", args.device, "--no-progress", *flags],
                           check=True, env=env, capture_output=True)
            [run] = [r for r in json.loads(subprocess.run(cli + ["runs", "--json"], check=True, env=env, capture_output=True,
                                                          text=True).stdout) if r["adapter"] == f"m{i}"]
            rows.append((name, run["metrics"]["peak_memory_mb"], run["metrics"]["tokens_per_s"]))
            print(f"{name:<34}{rows[-1][1]:>9,.0f}{rows[-1][2]:>10,.0f}", flush=True)
        first = rows[0][1]
        for name, peak, _ in rows[1:]:
            print(f"  {name}: {peak - first:+,.0f} MB against one batch of 8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory", action="store_true", help="Peak memory per training setting instead of throughput.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory:
        return memory(args)

    import torch
    from transformers import AutoTokenizer

    from portfolio import Registry
    from portfolio.data.tokenize import encode_rows
    from portfolio.modeling import model_folder
    from portfolio.runtime import resolve_device
    from python_docs import python_reference_rows, write_jsonl

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp, Registry.open(f"sqlite:///{tmp}/r.db", f"{tmp}/store") as reg:
        base, _ = reg.bases.add("smollm2-135m")
        folder, _ = model_folder(base)
        tok = AutoTokenizer.from_pretrained(folder)
        reg.data.add("docs", [write_jsonl(Path(tmp) / "a.jsonl", python_reference_rows(0, 40))], "python")
        reg.data.add("docs", [write_jsonl(Path(tmp) / "b.jsonl", python_reference_rows(40, 79))], "python")
        rows = [{"row": i, "sha": "", "data": r} for i, r in enumerate(python_reference_rows(0, 40))]
        examples = encode_rows(rows, "text", tok, args.seq_len)

        print(f"SmolLM2-135M, LoRA r=8 on q,k,v,o, batch {args.batch_size}×{args.seq_len}, {args.steps} steps, {device}", flush=True)
        plain, n_params = plain_loop(base, examples, args)
        print(f"  plain transformers+PEFT loop: {plain:,.0f} tokens/s", flush=True)
        ours, wall = portfolio_run(reg, "a", args, base="smollm2-135m", data="docs@1", replay_ratio=0.0)
        print(f"  portfolio train, replay off:   {ours:,.0f} tokens/s", flush=True)
        replay, wall_r = portfolio_run(reg, "a", args, data="docs@2", replay_ratio=0.25)
        print(f"  portfolio train, replay 25%:   {replay:,.0f} tokens/s", flush=True)
        kl, wall_k = portfolio_run(reg, "b", args, base="smollm2-135m", from_ref="a@1", data="docs@2", replay_ratio=0.25, kl_weight=0.5)
        print(f"  portfolio train, replay + KL:  {kl:,.0f} tokens/s", flush=True)

    print(f"\n{'loop':<34}{'tokens/s':>10}{'vs plain':>10}")
    for name, value in [("plain transformers + PEFT", plain), ("portfolio train (replay off)", ours),
                        ("portfolio train (replay 25%)", replay), ("portfolio train (replay 25% + KL)", kl)]:
        print(f"{name:<34}{value:>10,.0f}{value / plain:>10.3f}")
    print(f"\nratio portfolio/plain with replay off: {ours / plain:.3f} (goal ≥ 0.95)")
    print(f"replay at 25% costs {1 - replay / ours:+.1%} of throughput (replayed sequences are ordinary batch rows)")
    print(f"KL on replay rows costs {1 - kl / replay:+.1%} more (one no-grad forward of the parent on the replay rows)")
    print(f"whole command (load, tokenise, train, evaluate, register): {wall:.0f} s / {wall_r:.0f} s / {wall_k:.0f} s")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            # 6·N FLOPs per token for forward + backward through the frozen base (an upper
            # bound on useful work for LoRA, whose weight gradients are tiny)
            print(f"model FLOPs utilisation on {name}: {6 * n_params * ours / peak:.1%} (bf16 dense peak {peak / 1e12:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
