"""Reading and writing the factors of PEFT LoRA files for merging, one layer at a time.

A merge never loads a model: it opens each adapter's safetensors lazily (`safe_open`), reads
the A and B of one module across all adapters, and hands them to the pure functions of
`merge_math`. Only the (small) merged factors are kept until the output file is written.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from portfolio.adapter_files import CONFIG_FILE, PREFIX, WEIGHTS_FILE, split_key
from portfolio.compose.merge_math import lora_scale
from portfolio.errors import IncompatibleAdapter, InvalidAdapter


@dataclass(frozen=True)
class LoraSource:
    """One adapter taking part in a merge: its safetensors file, PEFT config and weight."""

    label: str
    weights_path: Path
    config: dict[str, Any]
    weight: float = 1.0


def module_alpha(config: dict[str, Any], module: str) -> float:
    """``lora_alpha``, or the value of the first ``alpha_pattern`` key that matches the
    module the way PEFT matches it (the key is a suffix of the module path)."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(alpha)
    return float(config["lora_alpha"])


def module_shapes(source: LoraSource) -> dict[str, tuple[int, int, int]]:
    """Per module, (rank, in, out) from the safetensors header alone."""
    from safetensors import safe_open

    halves: dict[str, dict[str, list[int]]] = {}
    try:
        with safe_open(source.weights_path, framework="pt") as fh:
            for key in fh.keys():
                module, half = split_key(key)
                halves.setdefault(module, {})[half] = fh.get_slice(key).get_shape()
    except InvalidAdapter:
        raise
    except Exception as exc:
        raise InvalidAdapter(f"{source.label}: cannot read {source.weights_path} ({exc}); run `portfolio verify`") from None
    return {m: (h["A"][0], h["A"][1], h["B"][0]) for m, h in halves.items()}


def check_same_modules(sources: list[LoraSource], shapes: list[dict[str, tuple[int, int, int]]]) -> dict[str, tuple[int, int]]:
    """Every source adapts the same modules with the same [in, out]; returns them.
    ``shapes`` holds `module_shapes` of each source."""
    first = {m: (i, o) for m, (_, i, o) in shapes[0].items()}
    for src, src_shapes in zip(sources[1:], shapes[1:]):
        theirs = {m: (i, o) for m, (_, i, o) in src_shapes.items()}
        missing, extra = sorted(set(first) - set(theirs)), sorted(set(theirs) - set(first))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"also adapts {extra[0]}"
            raise IncompatibleAdapter(
                f"{src.label} {what} ({len(missing) + len(extra)} module(s) differ from {sources[0].label}); "
                "a merge needs the same target modules: stack them instead (`portfolio stack`)"
            )
        for m, shape in theirs.items():
            if shape != first[m]:
                raise IncompatibleAdapter(
                    f"{src.label} module {m} is [in, out]={list(shape)} but {sources[0].label} has {list(first[m])}; "
                    "they were trained on different bases"
                )
    return first


def union_modules(sources: list[LoraSource], shapes: list[dict[str, tuple[int, int, int]]]) -> dict[str, tuple[int, int]]:
    """The modules any source adapts, with [in, out]; shapes must agree where they overlap.
    ``shapes`` holds `module_shapes` of each source."""
    out: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for src, src_shapes in zip(sources, shapes):
        for m, (_, i, o) in src_shapes.items():
            if m in out and out[m] != (i, o):
                raise IncompatibleAdapter(
                    f"{src.label} module {m} is [in, out]={[i, o]} but {owner[m]} has {list(out[m])}; "
                    "they were trained on different bases"
                )
            out[m], owner[m] = (i, o), src.label
    return out


class FactorReader:
    """Open every source once and hand out (A, B, w·s) per module, float32, checked finite."""

    def __init__(self, sources: list[LoraSource]):
        self.sources = sources
        self._stack = ExitStack()
        self._handles: list[Any] = []

    def __enter__(self) -> "FactorReader":
        from safetensors import safe_open

        for src in self.sources:
            self._handles.append(self._stack.enter_context(safe_open(src.weights_path, framework="pt")))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def factors(self, module: str) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
        """(A_i, B_i, s_i, w_i) of every source that adapts ``module``."""
        out = []
        for src, fh in zip(self.sources, self._handles):
            key_a, key_b = factor_keys(module)
            if key_a not in fh.keys():
                continue
            a, b = fh.get_tensor(key_a).float(), fh.get_tensor(key_b).float()
            for key, t in ((key_a, a), (key_b, b)):
                if not torch.isfinite(t).all():
                    raise InvalidAdapter(f"{src.label}: tensor {key} holds NaN or inf values; it cannot be merged")
            scale = lora_scale(module_alpha(src.config, module), a.shape[0], bool(src.config.get("use_rslora")))
            out.append((a, b, scale, src.weight))
        return out


def merged_config(template: dict[str, Any], rank: int, target_modules: list[str]) -> dict[str, Any]:
    """A PEFT LoRA config for merged factors with scale 1 (``lora_alpha = r``, no rsLoRA,
    no per-module patterns), keeping the template's other settings."""
    config = {k: v for k, v in template.items() if k not in ("rank_pattern", "alpha_pattern")}
    config.update(r=rank, lora_alpha=rank, use_rslora=False, use_dora=False, target_modules=target_modules,
                  rank_pattern={}, alpha_pattern={}, peft_type="LORA")
    return config


def write_lora(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write ``adapter_model.safetensors`` (float32, contiguous) and ``adapter_config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def factor_keys(module: str) -> tuple[str, str]:
    """The safetensors keys of a module's A and B."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
