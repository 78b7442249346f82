"""Does the engine a version is deployed on answer like portfolio's reference model?

For each prompt, the greedy continuation from portfolio's float32 model (the base's GGUF
dequantised, the adapter attached by PEFT: what every gate judges) is compared token by
token with the engine's: llama.cpp over the base file as shipped (the embedded default is
Q4_1, multiplied in its quantised form with activations quantised to 8 bits), or a real
``vllm serve`` over the base's Hugging Face folder with the version loaded at runtime. Both
sides are fed the same prompt token ids, so only the models differ."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portfolio import engines
from portfolio.errors import InvalidState
from portfolio.export import export_rank
from portfolio.serving import activate, loaded

#: A fixed, varied prompt set (code, prose, lists, facts, numbers) for parity checks.
DEFAULT_PROMPTS = [
    "def fibonacci(n):\n    ",
    "The capital of France is",
    "To make a cup of tea, first",
    "1, 2, 3, 5, 8, 13,",
    "Python's list comprehension lets you",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\narr = np.",
    "Water boils at a temperature of",
    "Dear team,\nThank you for",
    "SELECT name FROM users WHERE",
    "The most important rule of machine learning is",
]


@dataclass(frozen=True)
class PromptParity:
    """One prompt: both continuations and where they first differ (None: identical)."""

    prompt: str
    reference: list[int]
    engine: list[int]
    first_difference: int | None
    reference_text: str
    engine_text: str


@dataclass(frozen=True)
class ParityReport:
    """A version's greedy parity with one engine over a prompt set."""

    model: str
    engine: str
    base_file: str
    max_new_tokens: int
    prompts: list[PromptParity] = field(default_factory=list)

    @property
    def identical_share(self) -> float:
        """The share of prompts whose continuations are token-identical."""
        return sum(p.first_difference is None for p in self.prompts) / max(1, len(self.prompts))

    @property
    def token_share(self) -> float:
        """The share of reference tokens the engine reproduced before its first difference."""
        total = sum(len(p.reference) for p in self.prompts)
        same = sum(len(p.reference) if p.first_difference is None else p.first_difference for p in self.prompts)
        return same / max(1, total)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return {"model": self.model, "engine": self.engine, "base_file": self.base_file, "max_new_tokens": self.max_new_tokens,
                "identical_share": self.identical_share, "token_share": self.token_share,
                "prompts": [p.__dict__ for p in self.prompts]}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def engine_parity(registry, ref: str, engine: str = "llamacpp", prompts: list[str] | None = None, max_new_tokens: int = 16,
                  log=print) -> ParityReport:
    """Greedy parity of version ``ref`` (or ``base:NAME``) between portfolio's reference model
    and ``engine`` (``llamacpp[:QUANT]`` or ``vllm``, see `engines.target`), on the same prompt
    token ids."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    if not prompts or max_new_tokens < 1:
        raise InvalidState("parity needs at least one prompt and --max-new-tokens >= 1")
    base_name = ref[5:] if ref.startswith("base:") else registry.get_version(ref).base_model
    base = registry.bases.get(base_name)
    refs = [] if ref.startswith("base:") else [ref]
    with loaded(registry, base, refs, "auto", log, prefix="p") as rt:
        if refs:
            activate(rt.model, rt.adapters[ref])
        encoded = [rt.tokenizer(p)["input_ids"] for p in prompts]
        reference = [_greedy(rt, ids, max_new_tokens) for ids in encoded]
        tokenizer = rt.tokenizer
    served = engines.target(base, engine, log)
    with tempfile.TemporaryDirectory(prefix="portfolio-parity-") as work, \
            served.session(registry, Path(work), log, export_rank(registry, registry.get_version(ref)) if refs else 8), \
            served.model(registry, ref if refs else None, Path(work), False) as model:
        answers = [model.greedy(ids, max_new_tokens) for ids in encoded]
    rows = [PromptParity(p, r, s, _first_difference(r, s), tokenizer.decode(r, skip_special_tokens=True),
                         tokenizer.decode(s, skip_special_tokens=True)) for p, r, s in zip(prompts, reference, answers)]
    return ParityReport(ref, served.label, served.source, max_new_tokens, rows)


def llamacpp_parity(registry, ref: str, prompts: list[str] | None = None, max_new_tokens: int = 16, log=print) -> ParityReport:
    """`engine_parity` on llama.cpp over the base's GGUF as shipped."""
    return engine_parity(registry, ref, "llamacpp", prompts, max_new_tokens, log)


def _greedy(rt, ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = rt.model.generate(input_ids=torch.tensor([ids], device=rt.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                device=rt.device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=rt.pad_id)
    new = out[0, len(ids):].tolist()
    eos = rt.tokenizer.eos_token_id
    return new[: new.index(eos)] if eos in new else new
