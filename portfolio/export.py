"""Exporting a version for the engines teams deploy to, one table of formats:

- ``peft``: a PEFT folder (``adapter_config.json`` with ``base_model_name_or_path`` set,
  ``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` and vLLM's
  ``--lora-modules`` load;
- ``gguf``: ``adapter.gguf`` for llama.cpp (``--lora``) with an Ollama ``Modelfile``
  (``FROM`` the base's GGUF, ``ADAPTER ./adapter.gguf``), see `gguf_lora`.

Each comes with its model card. It sits above the registry because a stack is written as its
exact `cat` merge (`compose.stack`), one adapter for servers that take one, and the card
reads lineage and evaluations; the registry itself only hands out a plain version's files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from portfolio.basemodel import resolve_source
from portfolio.compose.stack import export_stack
from portfolio.errors import InvalidState
from portfolio.gguf_lora import write_gguf_adapter
from portfolio.model_card import model_card

GGUF_FILE = "adapter.gguf"


def export_version(registry, ref: str, dest: str | os.PathLike, card: bool = True, format: str = "peft") -> Path:
    """Write version ``ref`` at ``dest`` in ``format`` (a key of `FORMATS`), with a model
    card (README.md, Hugging Face's YAML header: base model, relation, datasets with their
    sha256, evaluations, lineage) unless ``card`` is False; returns the folder."""
    if format not in FORMATS:
        raise InvalidState(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    folder = FORMATS[format](registry, ref, Path(dest))
    if card:
        (folder / "README.md").write_text(model_card(registry, ref), encoding="utf-8")
    return folder


def export_rank(registry, version) -> int:
    """The rank a version exports at (a stack: the sum of its parts')."""
    if version.kind == "stack":
        from portfolio.serving import components

        return sum(part.rank for part, _ in components(registry, version))
    return version.rank


def peft_folder(registry, ref: str, dest: Path) -> Path:
    """The version as a PEFT folder (a stack as its exact cat merge)."""
    version = registry.get_version(ref)
    if version.kind == "stack" and version.status != "archived":
        return export_stack(registry, version, dest)
    return registry.export_weights(ref, dest)


def gguf_folder(registry, ref: str, dest: Path) -> Path:
    """``adapter.gguf`` and an Ollama ``Modelfile`` over the version's base."""
    version = registry.get_version(ref)
    base = registry.bases.get(version.base_model)
    if dest.exists() and any(dest.iterdir()):
        raise InvalidState(f"{dest} is not empty; export into a new folder")
    work = Path(tempfile.mkdtemp(prefix="portfolio-gguf-"))
    try:
        peft = peft_folder(registry, ref, work / "peft")
        write_gguf_adapter(peft, work / GGUF_FILE, base.architecture, registry.bases.config(base.name), version.ref)
        (work / "Modelfile").write_text(modelfile(version, base), encoding="utf-8")
        # written in full before anything appears at dest: a refused or failed export leaves nothing
        dest.mkdir(parents=True, exist_ok=True)
        for name in (GGUF_FILE, "Modelfile"):
            shutil.move(str(work / name), dest / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def modelfile(version, base) -> str:
    """An Ollama Modelfile: ``FROM`` the base's GGUF file (or its folder), ``ADAPTER``."""
    folder = resolve_source(base.source)
    source = folder / base.gguf_file if base.gguf_file else folder
    return (f"# {version.ref} over base {base.name} (sha256 {base.weights_sha256[:16]}), exported by portfolio.\n"
            f"# ollama create {version.adapter} -f Modelfile\n"
            f"FROM {source}\n"
            f"ADAPTER ./{GGUF_FILE}\n")


FORMATS: dict[str, Callable[..., Path]] = {"peft": peft_folder, "gguf": gguf_folder}
