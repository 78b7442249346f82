"""PEFT LoRA adapter folders: reading, checking against a base, writing.

A PEFT folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight`` ([out, r]),
and for a DoRA adapter (``use_dora``) ``...lora_magnitude_vector`` ([out]) too.
Everything here reads tensor shapes from the safetensors header; only the finiteness check
reads values, one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.errors import IncompatibleAdapter, InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# inits whose saved factors only make sense over a base PEFT modified at init time; their
# deterministic forms can be rebuilt and converted to a plain LoRA (`portfolio.convert`)
MOVED_BASE_INITS = ("pissa", "olora")


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
    def dora(self) -> bool:
        """Whether it is a DoRA adapter (a magnitude vector per module beside A and B)."""
        return bool(self.config.get("use_dora"))

    @property
    def n_params(self) -> int:
        """Trainable parameters: r·(in + out) summed over modules (+ out for DoRA's magnitudes)."""
        return sum(r * (i + o) + (o if self.dora else 0) for r, i, o in self.modules.values())


def variant(config: dict[str, Any]) -> str:
    """The LoRA variant a PEFT config describes: ``lora`` or ``dora``, ``+rslora`` where the
    scale is alpha/√r."""
    return ("dora" if config.get("use_dora") else "lora") + ("+rslora" if config.get("use_rslora") else "")


MAGNITUDE = ".lora_magnitude_vector"  # DoRA's per-output-row magnitudes, as PEFT saves them


def split_key(key: str, keep_prefix: bool = False) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``A``) (or the prefixed name);
    ``...X.lora_magnitude_vector`` -> (``X``, ``M``)."""
    body = key[len(PREFIX) :] if key.startswith(PREFIX) and not keep_prefix else key
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if body.endswith(suffix):
            return body[: -len(suffix)], part[-1]
    if body.endswith(MAGNITUDE):
        return body[: -len(MAGNITUDE)], "M"
    raise InvalidAdapter(
        f"unsupported tensor {key!r}: only lora_A/lora_B weights (and DoRA's lora_magnitude_vector) are supported "
        "(no biases, embeddings or modules_to_save; vLLM refuses those too)"
    )


def read_lora_folder(path: str | os.PathLike) -> LoraFolder:
    """Read and validate a PEFT LoRA folder without loading a model."""
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
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidAdapter(f"{cfg_path}: not valid JSON ({str(exc).splitlines()[0] if str(exc) else 'nested too deeply'})") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{cfg_path}: holds a JSON {type(config).__name__}, not an object; is it PEFT's adapter_config.json?")
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and (init in MOVED_BASE_INITS or init.startswith("pissa_niter") or init in ("corda", "loftq")):
        raise InvalidAdapter(f"{cfg_path}: init_lora_weights is {init!r}: its factors are relative to a base whose weights PEFT "
                             "changed when it initialised them, so over the real base they give wrong outputs; "
                             + ("`portfolio adapter import` converts it to a plain LoRA (PEFT's conversion)" if init in MOVED_BASE_INITS
                                else "save it with PEFT's path_initial_model_for_weight_conversion first"))
    if not _is_int(config.get("r")) or config["r"] < 1:
        raise InvalidAdapter(f"{cfg_path}: 'r' must be a positive integer, got {config.get('r')!r}")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise InvalidAdapter(f"{cfg_path}: 'lora_alpha' must be a finite positive number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and (_is_int(v) if key == "rank_pattern" else _is_number(v) and math.isfinite(v)) and v > 0
            for k, v in pattern.items()
        ):
            raise InvalidAdapter(f"{cfg_path}: '{key}' must map module names to positive numbers")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        raise InvalidAdapter(f"{cfg_path}: 'target_modules' must be a list of module names (or a regex), got {targets!r}")

    halves: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(path / WEIGHTS_FILE, framework="pt") as fh:
            for key in fh.keys():
                module, half = split_key(key, keep_prefix=True)
                halves.setdefault(module, {})[half] = tuple(fh.get_slice(key).get_shape())
            for key in fh.keys():
                _check_tensor(path, key, fh.get_tensor(key))
    except InvalidAdapter:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InvalidAdapter(f"{path / WEIGHTS_FILE}: cannot read ({exc})") from None
    if not halves:
        raise InvalidAdapter(f"{path / WEIGHTS_FILE} holds no LoRA tensors")
    unprefixed = [m for m in halves if not m.startswith(PREFIX)]
    if unprefixed:
        raise InvalidAdapter(
            f"{path}: tensor names must start with PEFT's {PREFIX!r} (e.g. {unprefixed[0]!r} does not); "
            "PEFT would load the folder silently without them; re-save with save_pretrained"
        )
    modules = _module_shapes(path, {m[len(PREFIX):]: parts for m, parts in halves.items()}, bool(config.get("use_dora")))
    _check_config_matches(cfg_path, config, modules)
    return LoraFolder(path=path, config=config, modules=modules)


def _module_shapes(path: Path, halves: dict[str, dict[str, tuple[int, ...]]], dora: bool) -> dict[str, tuple[int, int, int]]:
    """(rank, in, out) per module from its tensors' shapes: A [r, in] and B [out, r] with the
    same r, and for DoRA (only then) a magnitude vector [out]."""
    modules: dict[str, tuple[int, int, int]] = {}
    for module, parts in sorted(halves.items()):
        if not {"A", "B"} <= set(parts):
            missing = "lora_B" if "A" in parts else "lora_A"
            raise InvalidAdapter(f"{path}: module {module} has no {missing}.weight")
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise InvalidAdapter(
                f"{path}: module {module} has lora_A {list(a)} and lora_B {list(b)}; "
                "expected [r, in] and [out, r] with the same r"
            )
        if ("M" in parts) != dora:
            raise InvalidAdapter(f"{path}: module {module} has no lora_magnitude_vector but use_dora is set" if dora else
                                 f"{path}: module {module} has a DoRA lora_magnitude_vector but use_dora is not set; "
                                 "the config and the weights do not belong together")
        if dora and tuple(parts["M"]) != (b[0],):
            raise InvalidAdapter(f"{path}: module {module}'s lora_magnitude_vector is {list(parts['M'])}; expected [{b[0]}] (one per output)")
        modules[module] = (a[0], a[1], b[0])
    return modules

def _check_tensor(path: Path, key: str, tensor: Any) -> None:
    import torch

    if not tensor.is_floating_point():  # int8 factors would be read as weights of that value
        raise InvalidAdapter(f"{path}: tensor {key} is {str(tensor.dtype).removeprefix('torch.')}; LoRA factors "
                             "must be floating point (float32, float16 or bfloat16): dequantise them first")
    if not torch.isfinite(tensor).all():
        raise InvalidAdapter(f"{path}: tensor {key} holds NaN or inf values")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _targets(module: str, targets: str | list[str]) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module`` (its own matching rule: a regex
    matches the whole name; a list entry matches the name or its last dotted parts)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_rank(module: str, config: dict[str, Any]) -> int:
    for key, value in (config.get("rank_pattern") or {}).items():
        if module == key or module.endswith("." + key) or re.search(rf"(^|\.){re.escape(key)}$", module):
            return value
    return config["r"]


def _check_config_matches(cfg_path: Path, config: dict[str, Any], modules: dict[str, tuple[int, int, int]]) -> None:
    """The config must describe the tensors: PEFT builds the layers from the config and
    loads the tensors into them, so a mismatch loads wrong (or silently drops weights)."""
    targets = config["target_modules"]
    try:
        untargeted = [m for m in modules if not _targets(m, targets)]
    except re.error as exc:
        raise InvalidAdapter(f"{cfg_path}: 'target_modules' is not a valid regex ({exc})") from None
    if untargeted:
        raise InvalidAdapter(
            f"{cfg_path}: 'target_modules' {targets!r} does not cover module {untargeted[0]} that the "
            "weights adapt; the config and the weights do not belong together"
        )
    if isinstance(targets, list):
        unused = [t for t in targets if not any(_targets(m, [t]) for m in modules)]
        if unused:
            raise InvalidAdapter(
                f"{cfg_path}: 'target_modules' lists {unused[0]!r} but the weights hold no such module; "
                "PEFT would add it untrained; the config and the weights do not belong together"
            )
    for module, (rank, _, _) in modules.items():
        want = _pattern_rank(module, config)
        if rank != want:
            raise InvalidAdapter(
                f"{cfg_path}: 'r' is {want} but module {module} has rank {rank} in the weights; "
                "the config and the weights do not belong together"
            )


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
    dest: str | os.PathLike, weights: str | os.PathLike, config: dict[str, Any], base_model_name_or_path: str,
    digest: str | None = None,
) -> Path:
    """Write a loadable PEFT folder at ``dest`` atomically (a temporary folder, then a
    rename), with ``base_model_name_or_path`` set so servers know the base. With ``digest``,
    the written weights are read back and compared with it before the folder appears."""
    from portfolio.errors import IntegrityFailure, StoreError
    from portfolio.store.digests import sha256_file

    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise InvalidAdapter(f"{dest} exists (or is a link) and is not an empty folder; choose a new folder or empty it")
    tmp = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an export is for servers to read
        shutil.copyfile(weights, tmp / WEIGHTS_FILE)
        if digest is not None and sha256_file(tmp / WEIGHTS_FILE) != digest:
            raise IntegrityFailure(f"the weights written to {dest} do not match {digest[:12]}; the disk or the store is failing")
        config = {**config, "base_model_name_or_path": base_model_name_or_path}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise StoreError(f"cannot write {dest}: {exc.strerror or exc}; choose a writable folder") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
