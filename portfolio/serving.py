"""Putting versions on a model: single, merged and stacked versions as PEFT adapters; a base
loaded with a set of versions (`loaded`, the one way generate, evaluation and suites get a
model); and `generate`.

A stack is served the way PEFT serves several adapters at once: each component is loaded
as its own named adapter and all of them are made active (`LoraModel.set_adapter([...])`),
so the forward pass adds every component's update. A component's stack weight w is folded
into its B factor when it is written out (w·B·A is exact), since PEFT has no per-adapter
weight at inference.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portfolio import runtime
from portfolio.errors import InvalidState


def components(registry, version) -> list[tuple[Any, float]]:
    """(single-artifact version, weight) pairs that make up a version: itself with weight 1,
    or a stack's components."""
    if version.kind != "stack":
        return [(version, 1.0)]
    return [(registry.get_version(c["ref"]), float(c["weight"])) for c in version.lora_config["components"]]


def serving_key(registry, version) -> str:
    """What identifies a version's served weights: its artifact digest, or for a stack the
    sha256 of its (digest, weight) components. Equal key, equal outputs."""
    if version.kind != "stack":
        return version.artifact_digest
    parts = [[v.artifact_digest, w] for v, w in components(registry, version)]
    return "stack:" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def write_component(registry, version, weight: float, dest: Path) -> Path:
    """A PEFT folder of one component with its weight folded into lora_B."""
    if weight == 1.0:
        return registry.export_weights(version.ref, dest)
    from safetensors.torch import load_file

    from portfolio.compose.lora_files import write_lora
    from portfolio.compose.merge import source_of

    src = source_of(registry, version, weight)
    tensors = {k: (t.float() * weight if ".lora_B." in k else t) for k, t in load_file(src.weights_path).items()}
    base = registry.bases.get(version.base_model)
    return write_lora(dest, tensors, {**src.config, "base_model_name_or_path": base.model_id})


def attach(model, registry, ref: str, workdir: Path | None = None, prefix: str = "a"):
    """Load the version ``ref`` onto ``model`` (a base model or a PeftModel already holding
    other adapters). Returns (model, adapter names to activate together). The PEFT folders
    the parts are read from are written under ``workdir``, or, without one, into a temporary
    folder that is gone when this returns (PEFT holds the weights in memory by then, so a
    version evicted and attached again is written afresh)."""
    from peft import PeftModel

    version = registry.get_version(ref)
    if version.status == "archived":
        raise InvalidState(f"{version.ref} is archived and its bytes are gone; serve its successor instead")
    folder_root = workdir if workdir is not None else Path(tempfile.mkdtemp(prefix="portfolio-attach-"))
    names = []
    try:
        for i, (part, weight) in enumerate(components(registry, version)):
            name = f"{prefix}{i}"
            folder = write_component(registry, part, weight, folder_root / name)
            if isinstance(model, PeftModel):
                model.load_adapter(str(folder), adapter_name=name)
            else:
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            names.append(name)
    finally:
        if workdir is None:
            shutil.rmtree(folder_root, ignore_errors=True)
    return model, names


@dataclass
class Loaded:
    """A base model on its device with versions attached: ``adapters`` maps each attached
    ref to its PEFT adapter names (several for a stack, active together)."""

    model: Any
    tokenizer: Any
    device: Any
    adapters: dict[str, list[str]] = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        """The batch padding id (`runtime.pad_id`)."""
        return runtime.pad_id(self.tokenizer)


@contextmanager
def loaded(registry, base, refs: list[str], device: str = "auto", log=print, prefix: str = "v") -> Iterator[Loaded]:
    """Load ``base`` once, attach each version of ``refs`` (a version, merge or stack; each
    once) as PEFT adapters named ``{prefix}{i}_{part}``, and put the model on ``device`` in
    eval mode. The folders the adapters are read from are gone before the body runs."""
    from portfolio.modeling import load_base

    model, tokenizer = load_base(base, log=log)
    adapters: dict[str, list[str]] = {}
    for ref in dict.fromkeys(refs):
        model, adapters[ref] = attach(model, registry, ref, prefix=f"{prefix}{len(adapters)}_")
    target = runtime.resolve_device(device)
    model.to(target).eval()
    yield Loaded(model, tokenizer, target, adapters)


def activate(model, names: list[str]) -> None:
    """Make exactly these adapters active (several at once: their updates add up)."""
    model.base_model.set_adapter(names if len(names) > 1 else names[0], inference_mode=True)


@dataclass(frozen=True)
class Generation:
    """A completion and how it was made."""

    model: str
    prompt: str
    text: str
    new_tokens: int
    seconds: float
    token_ids: list[int] = field(default_factory=list)  # the new tokens, to compare engines token by token

    def to_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return self.__dict__.copy()


def generate(
    registry,
    ref: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    chat: bool = True,
    device: str = "auto",
    log=print,
) -> Generation:
    """Complete ``prompt`` with a version (single, merged or stacked) or ``base:NAME`` on its
    base model. Greedy by default; ``temperature > 0`` samples (seeded). With ``chat`` and a
    tokenizer that has a chat template, the prompt is sent as one user message."""
    import torch

    if max_new_tokens < 1:
        raise InvalidState("--max-new-tokens must be at least 1")
    if temperature < 0:
        raise InvalidState("--temperature must be >= 0 (0 is greedy)")
    base_name = ref[5:] if ref.startswith("base:") else registry.get_version(ref).base_model
    refs = [] if ref.startswith("base:") else [ref]
    with loaded(registry, registry.bases.get(base_name), refs, device, log, prefix="a") as rt:
        model, tokenizer = rt.model, rt.tokenizer
        if refs:
            activate(model, rt.adapters[ref])
        if chat and tokenizer.chat_template:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                   return_tensors="pt", return_dict=True)
        else:
            inputs = tokenizer(prompt, return_tensors="pt")
        inputs = {k: v.to(rt.device) for k, v in inputs.items()}
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=rt.pad_id, **sampling)
        new = out[0, inputs["input_ids"].shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(ref, prompt, text, int(new.numel()), time.perf_counter() - start, new.tolist())
