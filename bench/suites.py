"""Running a behavioural suite on several versions of SmolLM2-135M-Instruct: `portfolio`'s
batched, mixed-adapter runner against the obvious loop (one `generate` per case, `set_adapter`
per version), in one run on the same loaded model files.

    python bench/suites.py [--versions 4] [--cases 100] [--max-new-tokens 24] [--batch-size 16]

Both sides start from the same registry: the real base and --versions random rank-8 LoRA
adapters on q/k/v/o (non-zero B, so every version answers differently), and a suite of
--cases Python questions with text checks. Both times include loading the base and attaching
the adapters. The baseline loads the base once, attaches every version as a named adapter, and
for each version calls `set_adapter` then `generate` once per case (greedy, KV cache, batch
of one). `portfolio` calls `run_suites`: left-padded batches of cases from all versions at
once (PEFT's `adapter_names`). It prints both wall times, the ratio, and how many greedy
answers agree word for word (batching changes float rounding, which can flip a near-tie).

Goal (issue 11): ≥ 3× on the CPU for 4 versions × 100 cases.

    python bench/suites.py --choice [--versions 4] [--cases 100] [--options 14]

Choice scoring (issue 26): a suite of --cases 14-way topic questions over ~180-token prompts,
every option scored on every version, once by portfolio's runner (each case's options from one
pass over its prompt, `suites.choice`) and once option by option (each ``prompt + option`` its
own sequence: the scorer it replaced), both in mixed-adapter batches on the same loaded model.
Prints both times, the ratio, and whether every predicted option is the same. Goal: ≥ 5×.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["a list", "a dict", "a set", "a tuple", "a generator", "a decorator", "a context manager", "a class", "an exception",
          "a lambda", "a module", "a string", "an f-string", "a slice", "a comprehension", "an iterator", "a coroutine",
          "a dataclass", "a property", "a closure"]
ASKS = ["What is {} in Python?", "Give one short example of {} in Python.", "When should I use {} in Python?",
        "Name a common mistake with {} in Python.", "Explain {} to a beginner in one sentence."]


def make_suite(path: Path, n: int, max_new_tokens: int) -> Path:
    """``n`` Python questions with text checks (their verdicts are not the point here)."""
    lines = [json.dumps({"suite": {"max_new_tokens": max_new_tokens}})]
    for i in range(n):
        topic, ask = TOPICS[i % len(TOPICS)], ASKS[(i // len(TOPICS)) % len(ASKS)]
        lines.append(json.dumps({"id": f"q{i}", "prompt": ask.format(topic), "slice": {"topic": topic.split()[-1].replace("-", "")},
                                 "checks": [{"kind": "max_words", "value": 200}, {"kind": "not_contains", "value": "I cannot"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_adapters(registry, n: int, work: Path) -> list[str]:
    """``n`` random rank-8 LoRA versions of SmolLM2-135M, imported into the registry."""
    import torch
    from peft import LoraConfig, get_peft_model

    from portfolio.modeling import load_base

    refs = []
    for i in range(n):
        model, _ = load_base(registry.bases.get("smollm2-135m"), log=lambda *_: None)
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = work / f"adapter{i}"
        peft_model.save_pretrained(folder, safe_serialization=True)
        refs.append(registry.import_adapter(f"v{i}", folder, base="smollm2-135m").ref)
    return refs


def baseline(registry, refs: list[str], suite: str, max_new_tokens: int) -> tuple[float, dict]:
    """Per case `generate`, `set_adapter` per version."""
    import torch

    from portfolio.modeling import load_base
    from portfolio.serving import attach
    from portfolio.suites.run import SuiteGenerator

    start = time.perf_counter()
    model, tokenizer = load_base(registry.bases.get("smollm2-135m"), log=lambda *_: None)
    names = {}
    work = Path(tempfile.mkdtemp(prefix="bench-suites-"))
    for i, ref in enumerate(refs):
        model, [names[ref]] = attach(model, registry, ref, work, prefix=f"b{i}_")
    model.eval()
    engine = SuiteGenerator(model, tokenizer, torch.device("cpu"), batch_size=1)
    cases = registry.suites.cases(suite).cases
    outputs = {}
    with torch.no_grad():
        for ref in refs:
            model.set_adapter(names[ref])
            for case in cases:
                ids = torch.tensor([engine.encode(case.chat())])
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=engine.pad_id)
                outputs[(ref, case.id)] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    return time.perf_counter() - start, outputs


CATEGORIES = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean Of Transportation", "Building",
              "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
SENTENCES = ["It was founded a long time ago and has changed a great deal since then.",
             "Many people know it from the stories that are told about it in the region.",
             "Its history is recorded in several books, articles and local archives.",
             "Visitors often remark on how different it is from what they expected.",
             "Over the years it has received attention from critics, scholars and the press.",
             "The name comes from an older word whose meaning is still debated today."]


def make_choice_suite(path: Path, n: int, options: int) -> Path:
    """``n`` DBpedia-style topic cases: one ~180-token text each, ``options`` categories."""
    cats = CATEGORIES[:options]
    lines = []
    for i in range(n):
        text = " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(7))
        prompt = (f"Classify the text into one of these categories: {', '.join(cats)}.\n\nText: Item {i}. {text}\n\n"
                  "Answer with the category only.")
        lines.append(json.dumps({"id": f"c{i}", "prompt": prompt, "checks": [{"kind": "choice", "options": cats, "answer": i % len(cats)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def choice_bench(reg, refs: list[str], args) -> None:
    """Packed scoring (portfolio's runner) against option-by-option scoring, same model load."""
    import torch

    from portfolio.serving import loaded
    from portfolio.suites.choice import score_separately
    from portfolio.suites.run import SuiteGenerator

    suite, _ = reg.suites.add("topics", make_choice_suite(Path(tempfile.mkdtemp()) / "choice.jsonl", args.cases, args.options))
    cases = reg.suites.cases(suite.ref).cases
    base = reg.bases.get("smollm2-135m")
    with loaded(reg, base, refs, "cpu", lambda *_: None, prefix="c") as rt, torch.no_grad():
        engine = SuiteGenerator(rt.model, rt.tokenizer, rt.device, args.batch_size)
        items = [(c.chat(), c.checks[0]["options"]) for _ in refs for c in cases]
        names = [rt.adapters[ref][0] for ref in refs for _ in cases]
        lengths = [len(engine.encode(chat)) for chat, _ in items[:len(cases)]]
        print(f"{len(refs)} versions × {len(cases)} cases × {args.options} options, prompts {min(lengths)}–{max(lengths)} tokens, "
              f"SmolLM2-135M-Instruct, {torch.get_num_threads()} CPU threads", flush=True)
        start = time.perf_counter()
        packed = engine.option_logprobs(items, names)
        fast = time.perf_counter() - start
        print(f"portfolio (each prompt read once):     {fast:7.1f} s  {len(items) / fast:6.2f} cases/s", flush=True)
        ids = [(engine.encode(chat), [rt.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]) for chat, options in items]
        start = time.perf_counter()
        each = score_separately(rt.model, ids, engine.pad_id, rt.device, names, batch_size=args.batch_size)
        slow = time.perf_counter() - start
        print(f"option by option (prompt per option):  {slow:7.1f} s  {len(items) / slow:6.2f} cases/s", flush=True)
    same = sum(max(range(len(a)), key=a.__getitem__) == max(range(len(b)), key=b.__getitem__) for a, b in zip(packed, each))
    worst = max(abs(x - y) for a, b in zip(packed, each) for x, y in zip(a, b))
    print(f"speed-up {slow / fast:.1f}×  (goal ≥ 5×); identical predictions {same}/{len(items)}; "
          f"largest log-likelihood difference {worst:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--choice", action="store_true", help="Benchmark choice scoring instead of generation.")
    parser.add_argument("--options", type=int, default=14)
    args = parser.parse_args()

    import torch

    from portfolio import Registry
    from portfolio.suites.run import run_suites

    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="bench-suites-"))
    with Registry.open(f"sqlite:///{work / 'r.db'}", work / "store") as reg:
        reg.bases.add("smollm2-135m")
        refs = make_adapters(reg, args.versions, work)
        if args.choice:
            return choice_bench(reg, refs, args)
        suite, _ = reg.suites.add("bench", make_suite(work / "suite.jsonl", args.cases, args.max_new_tokens))
        n = args.versions * args.cases
        print(f"{args.versions} versions × {args.cases} cases = {n} answers of ≤ {args.max_new_tokens} tokens, "
              f"SmolLM2-135M-Instruct, {torch.get_num_threads()} CPU threads", flush=True)

        start = time.perf_counter()
        scores = run_suites(reg, refs, [suite.ref], batch_size=args.batch_size, device="cpu", log=lambda *_: None)
        fast = time.perf_counter() - start
        print(f"portfolio run_suites (batch {args.batch_size}, mixed adapters): {fast:7.1f} s  {n / fast:6.2f} answers/s", flush=True)

        slow, outputs = baseline(reg, refs, suite.ref, args.max_new_tokens)
        print(f"baseline (generate per case, set_adapter per version):  {slow:7.1f} s  {n / slow:6.2f} answers/s", flush=True)

        same = sum(c["output"] == outputs[(s.model, c["id"])] for s in scores for c in s.cases)
        print(f"speed-up {slow / fast:.1f}×  (goal ≥ 3×); identical greedy answers {same}/{n}")


if __name__ == "__main__":
    main()
