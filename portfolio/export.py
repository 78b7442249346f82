"""Exporting a version for other tools: a PEFT folder (``adapter_config.json`` with
``base_model_name_or_path`` set, ``adapter_model.safetensors``) that
``PeftModel.from_pretrained`` and vLLM's ``--lora-modules`` load, with its model card.

It sits above the registry because a stack is written as its exact `cat` merge
(`compose.stack`), one adapter for servers that take one, and the card reads lineage and
evaluations; the registry itself only hands out a plain version's stored files."""

from __future__ import annotations

import os
from pathlib import Path

from portfolio.compose.stack import export_stack
from portfolio.model_card import model_card


def export_version(registry, ref: str, dest: str | os.PathLike, card: bool = True) -> Path:
    """Write version ``ref`` as a PEFT folder at ``dest`` with a model card (README.md,
    Hugging Face's YAML header: base model, relation, datasets with their sha256,
    evaluations, lineage) unless ``card`` is False; returns the folder."""
    version = registry.get_version(ref)
    if version.kind == "stack" and version.status != "archived":
        folder = export_stack(registry, version, dest)
    else:
        folder = registry.export_weights(ref, dest)
    if card:
        (folder / "README.md").write_text(model_card(registry, ref), encoding="utf-8")
    return folder
