"""The serving half of `bench/engines.py --throughput`: the same streamed chat load through
`portfolio serve`, vLLM and llama.cpp's OpenAI server, each started here on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = ["Write a haiku about the sea.", "Explain what a list comprehension is.", "Give three tips for a job interview.",
           "What is the capital of Japan?", "Describe a sunset in two sentences.", "How do I boil an egg?",
           "Name four planets.", "Why is the sky blue?", "Write a short thank-you note.", "What is 12 times 12?",
           "Suggest a name for a cat.", "Summarise the plot of Cinderella.", "What does HTTP stand for?",
           "List three uses of a paperclip.", "How many legs does a spider have?", "Translate 'good morning' to French."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, path: str = "/v1/models", timeout_s: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout_s} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def load(requests: list[tuple[str, str]], url_of, clients: int, max_tokens: int) -> dict:
    """Send every (model, prompt) as a streamed chat completion from ``clients`` threads;
    time to first content chunk and whole time per request, generated tokens."""
    import httpx

    work, lock = list(requests), threading.Lock()
    ttft: list[float] = []
    tokens = [0]
    failures: list[str] = []

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if not work:
                        return
                    model, prompt = work.pop(0)
                start, first = time.perf_counter(), None
                body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                        "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
                n = 0
                try:
                    with client.stream("POST", url_of(model) + "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            failures.append(f"{model}: {r.status_code} {r.read()[:200]!r}")
                            continue
                        for line in r.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                                first = first or time.perf_counter() - start
                                n += 1
                            if chunk.get("usage"):
                                n = chunk["usage"].get("completion_tokens", n)
                except httpx.HTTPError as exc:
                    failures.append(f"{model}: {exc!r}")
                    continue
                with lock:
                    ttft.append(first if first is not None else time.perf_counter() - start)
                    tokens[0] += n

    for model in dict.fromkeys(m for m, _ in requests):  # every adapter loaded before timing
        with httpx.Client(timeout=600) as c:
            c.post(url_of(model) + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 2})
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - start
    if failures:
        raise SystemExit("requests failed:\n" + "\n".join(failures[:5]))
    return {"seconds": total, "rps": len(requests) / total, "tokens_s": tokens[0] / total,
            "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99)}


def run_portfolio(reg, refs, requests, args) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "portfolio", "--db", str(reg.engine.url), "--store", str(reg.store.root), "serve",
                             "--port", str(port), "--batch-size", str(args.clients), "--max-adapters", str(len(refs))],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, "/health")
        return load(requests, lambda _: url, args.clients, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run_vllm(reg, base, refs, requests, args, work: Path) -> dict:
    from portfolio.engines.vllm import VllmServer
    from portfolio.export import export_version
    from portfolio.modeling import model_folder

    folder, _ = model_folder(base, lambda *_: None)
    server = VllmServer(folder, free_port(), base.name, max_lora_rank=8, max_loras=len(refs), log_path=work / "vllm.log",
                        extra_args=["--max-num-seqs", str(args.clients)])
    client = server.start()
    try:
        for ref in refs:
            client.load(ref, export_version(reg, ref, work / f"vllm-{ref.replace('@', '-')}", card=False))
        return load(requests, lambda _: server.url, args.clients, args.max_tokens)
    finally:
        server.stop()


def run_llamacpp(reg, base, refs, requests, args, work: Path) -> dict:
    from portfolio.basemodel import resolve_source
    from portfolio.export import GGUF_FILE, export_version

    base_file = resolve_source(base.source) / base.gguf_file
    threads = max(1, (os.cpu_count() or 2) // len(refs))
    procs, urls = [], {}
    try:
        for ref in refs:
            adapter = export_version(reg, ref, work / f"gguf-{ref.replace('@', '-')}", card=False, format="gguf") / GGUF_FILE
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(base_file), "--lora_path", str(adapter),
                                           "--model_alias", ref, "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
                                           "--n_ctx", "2048", "--verbose", "False",
                                           # by default a new request interrupts the one streaming: queue them instead
                                           "--interrupt_requests", "False"],
                                          stdout=subprocess.DEVNULL, stderr=open(work / f"llama-{port}.log", "w")))
            urls[ref] = f"http://127.0.0.1:{port}"
        for proc, url in zip(procs, urls.values()):
            wait_healthy(url, proc)
        return load(requests, urls.__getitem__, args.clients, args.max_tokens)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)


def throughput(args, random_adapter) -> None:
    """Print the comparison table (see `bench/engines.py`)."""
    import llama_cpp

    from portfolio import Registry

    with tempfile.TemporaryDirectory() as tmp, Registry.open(f"sqlite:///{tmp}/r.db", f"{tmp}/store") as reg:
        work = Path(tmp)
        base, _ = reg.bases.add("smollm2-135m")
        refs = [reg.import_adapter(f"a{i}", random_adapter(base, work / f"a{i}", 8, 0.02, seed=i), base=base.name).ref
                for i in range(1, args.adapters + 1)]
        requests = [(refs[i % len(refs)], PROMPTS[(i // len(refs)) % len(PROMPTS)]) for i in range(args.requests)]
        print(f"{args.requests} streamed chat requests over {len(refs)} adapters, {args.clients} clients, "
              f"max_tokens {args.max_tokens}, greedy, {os.cpu_count()} CPUs")
        results = {}
        print(f"\n{'engine':<48} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'seconds':>8}", flush=True)
        for name, run in (("portfolio serve", lambda: run_portfolio(reg, refs, requests, args)),
                          ("vLLM (CPU, float32)", lambda: run_vllm(reg, base, refs, requests, args, work)),
                          (f"llama.cpp server {llama_cpp.__version__} (Q4_1, 1 process/adapter)",
                           lambda: run_llamacpp(reg, base, refs, requests, args, work))):
            r = results[name] = run()
            print(f"{name:<48} {r['rps']:>7.2f} {r['tokens_s']:>7.1f} {r['ttft_p50']:>8.2f}s {r['ttft_p99']:>8.2f}s {r['seconds']:>8.1f}",
                  flush=True)
        ours, vllm = results["portfolio serve"], results["vLLM (CPU, float32)"]
        print(f"\nportfolio serve / vLLM throughput: {ours['rps'] / vllm['rps']:.2f}x (goal >= 0.5x)")
