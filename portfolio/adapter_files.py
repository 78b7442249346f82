"""PEFT LoRA adapter folders: reading, checking against a base, writing.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]).
Everything here reads tensor shapes from the safetensors header; only the finiteness check
reads values, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.errors import IncompatibleAdapter, InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFolder:
    """A validated PEFT LoRA folder: its config and, per module, (rank, in, out)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, tuple[int, int, int]]

    @property
    def weights(self) -> Path:
        """The safetensors file."""
        return self.path / WEIGHTS_FILE

    @property
    def rank(self) -> int:
        """The configured rank ``r``."""
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        """``lora_alpha``."""
        return float(self.config["lora_alpha"])

    @property
    def target_modules(self) -> list[str]:
        """The distinct last names of the adapted modules (q_proj, v_proj, ...)."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})

    @property
    def n_params(self) -> int:
        """Trainable parameters: r·(in + out) summed over modules."""
        return sum(r * (i + o) for r, i, o in self.modules.values())


def split_key(key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``A``)."""
    body = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], part[-1]
    raise InvalidAdapter(
        f"unsupported tensor {key!r}: only lora_A/lora_B weights are supported "
        "(no DoRA magnitudes, biases, embeddings or modules_to_save; vLLM refuses those too)"
    )


def read_lora_folder(path: str | os.PathLike) -> LoraFolder:
    """Read and validate a PEFT LoRA folder without loading a model."""
    import torch
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise InvalidAdapter(f"{path}: no such folder; give the folder PEFT's save_pretrained wrote")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise InvalidAdapter(f"{path} has no {CONFIG_FILE}; is it a PEFT adapter folder?")
    if not (path / WEIGHTS_FILE).is_file():
        hint = (
            "; re-save with save_pretrained(..., safe_serialization=True)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise InvalidAdapter(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidAdapter(f"{cfg_path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    if config.get("use_dora"):
        raise InvalidAdapter(f"{cfg_path}: DoRA adapters are not supported (vLLM refuses them too)")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InvalidAdapter(f"{cfg_path}: 'r' must be a positive integer, got {config.get('r')!r}")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise InvalidAdapter(f"{cfg_path}: 'lora_alpha' must be a number")

    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as fh:
            for key in fh.keys():
                module, half = split_key(key)
                halves.setdefault(module, {})[half] = tuple(fh.get_slice(key).get_shape())
            for key in fh.keys():
                if not torch.isfinite(fh.get_tensor(key)).all():
                    raise InvalidAdapter(f"{path}: tensor {key} holds NaN or inf values")
    except InvalidAdapter:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidAdapter(f"{path / WEIGHTS_FILE}: cannot read ({exc})") from None
    if not halves:
        raise InvalidAdapter(f"{path / WEIGHTS_FILE} holds no LoRA tensors")
    modules: dict[str, tuple[int, int, int]] = {}
    for module, parts in sorted(halves.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise InvalidAdapter(f"{path}: module {module} has no {missing}.weight")
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidAdapter(
                f"{path}: module {module} has lora_A {list(a)} and lora_B {list(b)}; "
                "expected [r, in] and [out, r] with the same r"
            )
        modules[module] = (a[0], a[1], b[0])
    return LoraFolder(path=path, config=config, modules=modules)


def check_fits_base(lora: LoraFolder, base_modules: dict[str, list[int]], base_name: str) -> None:
    """Every adapted module exists in the base and has the base's [out, in] shape."""
    for module, (_, in_features, out_features) in lora.modules.items():
        if module not in base_modules:
            raise IncompatibleAdapter(
                f"{lora.path}: module {module} is not a linear layer of base {base_name!r}; "
                "was the adapter trained on another base? pass the right one with --base"
            )
        want_out, want_in = base_modules[module]
        if (out_features, in_features) != (want_out, want_in):
            raise IncompatibleAdapter(
                f"{lora.path}: module {module} is [out={out_features}, in={in_features}] but base "
                f"{base_name!r} has [out={want_out}, in={want_in}]; the adapter belongs to another base"
            )


def write_peft_folder(
    dest: str | os.PathLike, weights: str | os.PathLike, config: dict[str, Any], base_model_name_or_path: str
) -> Path:
    """Write a loadable PEFT folder at ``dest`` atomically (a temporary folder, then a
    rename), with ``base_model_name_or_path`` set so servers know the base."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidAdapter(f"{dest} exists and is not empty; choose a new folder or empty it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copyfile(weights, tmp / WEIGHTS_FILE)
        config = {**config, "base_model_name_or_path": base_model_name_or_path}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
