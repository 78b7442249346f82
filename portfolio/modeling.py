"""Loading a registered base model (and its tokenizer) for inference or training.

A GGUF base is dequantised by transformers on first use (about 17 s on 2 CPU cores for
SmolLM2-135M), then cached as a plain safetensors folder keyed by the GGUF's sha256 in
``PORTFOLIO_CACHE`` (default ``~/.cache/portfolio``), shared by every registry of the user;
later loads read the cache in about a second. The cache is derived data: deleting it is
always safe.

Every load checks the bytes it is about to use: the base's own weight files against the
sha256s recorded when it was registered, and the cache against the manifest written when it
was built (a damaged cache is rebuilt from the checked GGUF). Each file is hashed once per
process while it stays unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from portfolio.basemodel import resolve_source
from portfolio.errors import BaseModelNotFound, IntegrityFailure, PortfolioError
from portfolio.registry.entities import BaseModel
from portfolio.store.cache import cache_root
from portfolio.store.digests import sha256_file, verify_file

CACHE_MANIFEST = "portfolio-cache.json"


def cache_dir(base: BaseModel) -> Path:
    """Where the dequantised copy of a GGUF base lives."""
    return cache_root() / "models" / base.weights_sha256


def is_base(base: BaseModel, model: str) -> bool:
    """Whether an engine's model (its name, or the folder it was started on: vLLM's
    ``--model``) is this base: the base's model id or name, its own folder, or its
    dequantised cache."""
    if model in (base.model_id, base.name):
        return True
    try:
        given = Path(model).resolve()
        return given == cache_dir(base).resolve() or given == resolve_source(base.source).resolve()
    except (OSError, ValueError, PortfolioError):  # a base whose files are not on this host is not this one
        return False


def serving_files(base: BaseModel, log=print) -> dict[str, str | None]:
    """What serving engines load for ``base``: ``folder``, a Hugging Face folder (vLLM's
    ``--model``; for a GGUF base its dequantised copy) and ``gguf``, the GGUF file as
    registered (llama.cpp, Ollama) or None."""
    folder, _ = model_folder(base, log)
    gguf = resolve_source(base.source) / base.gguf_file if base.gguf_file else None
    return {"folder": str(folder), "gguf": str(gguf) if gguf else None}


def model_folder(base: BaseModel, log=print) -> tuple[Path, str | None]:
    """A folder transformers can load quickly: the base's own folder, or for a GGUF base
    the dequantised cache (built here on first use). Returns (folder, gguf_file)."""
    folder = resolve_source(base.source)
    if not folder.is_dir():
        raise BaseModelNotFound(f"base {base.name!r}: its folder {folder} is gone; register it again with `portfolio base add`")
    check_base_files(base, folder)
    if base.gguf_file is None:
        return folder, None
    cached = cache_dir(base)
    if (cached / "config.json").is_file():
        if _cache_intact(cached):
            return cached, None
        log(f"the dequantised cache {cached} does not match its manifest; rebuilding it")
        shutil.rmtree(cached, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantising {base.gguf_file} once (cached in {cached})...")
    with _quiet_gguf():
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=base.gguf_file, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=base.gguf_file, local_files_only=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cached.parent))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"source_sha256": base.weights_sha256,
                    "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}}
        (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, cached)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "config.json").is_file():  # lost a race with another process: fine
            raise
    return cached, None


@contextlib.contextmanager
def _quiet_gguf():
    """transformers' GGUF reader draws its own tqdm bar, deaf to the usual switches: silence it
    while we dequantise (the line above says what is happening)."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def check_base_files(base: BaseModel, folder: Path) -> None:
    """Refuse a base whose weight files no longer hash to what was registered."""
    for f in base.files:
        path = folder / f["name"]
        if not path.is_file():
            raise BaseModelNotFound(f"base {base.name!r}: {path} is gone; reinstall it or register the base again under a new name")
        verify_file(path, f["sha256"], f"base model {base.name!r} ({path})")


def _cache_intact(cached: Path) -> bool:
    """Whether every file the cache's manifest lists is there with its recorded sha256."""
    try:
        manifest = json.loads((cached / CACHE_MANIFEST).read_text())
        for name, digest in manifest["files"].items():
            verify_file(cached / name, digest, f"cache file {name}")
        return bool(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IntegrityFailure):
        return False


def _save_plain(model: Any, folder: Path) -> None:
    # transformers refuses save_pretrained on a model loaded from GGUF (it counts as
    # quantised), although the weights are plain float32 by now: write them ourselves.
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
    save_file({k: v.detach().contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(folder)


_TOKENIZERS: dict[tuple[str, str | None], Any] = {}


def load_tokenizer(folder: Path | str, gguf_file: str | None = None) -> Any:
    """The tokenizer of a model folder, loaded once per process (a worker cycle needs it for
    revalidation, training and the gates; loading takes ~0.3 s each time)."""
    from transformers import AutoTokenizer

    key = (str(folder), gguf_file)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True)
    return _TOKENIZERS[key]


QUANTIZATIONS = ("nf4", "int8")  # a base's linear layers quantised by bitsandbytes while an adapter trains over it (QLoRA)


def bitsandbytes_problem(device_type: str) -> str | None:
    """Why bitsandbytes cannot quantise a base on this device (None: it can)."""
    import importlib.metadata
    import logging

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "bitsandbytes is not installed: pip install 'portfolio[qlora]' (or pip install bitsandbytes)"
    # its CPU kernels came with 0.45 (multi-backend); older releases have CUDA ones only
    if device_type == "cpu" and tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 45):
        return f"bitsandbytes {version} has no CPU kernels (they came with 0.45): upgrade it, or train with --device cuda"
    # it says at import that an optional faster CPU kernel (fetched from a hub) is missing: not ours to print
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return None


def quantization_config(kind: str, compute_dtype: Any) -> Any:
    """transformers' `BitsAndBytesConfig` for ``nf4`` (4-bit NormalFloat, double-quantised,
    computing in ``compute_dtype``: QLoRA's recipe) or ``int8`` (LLM.int8())."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(base: BaseModel, dtype: Any = None, log=print, quantize: str | None = None, device: Any = None):
    """(model, tokenizer) for a registered base, loaded offline; with ``quantize`` (nf4,
    int8), its linear layers quantised by bitsandbytes onto ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, gguf_file = model_folder(base, log)
    extra: dict[str, Any] = {}
    if quantize is not None:
        extra = {"quantization_config": quantization_config(quantize, dtype or torch.float32),
                 "device_map": {"": str(device or "cpu")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes on casting inputs to float16
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=dtype or torch.float32, local_files_only=True,
                                                     **extra)
    return model, load_tokenizer(folder, gguf_file)
