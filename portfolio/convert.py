"""Adapters PEFT saved relative to a base it changed: PiSSA and OLoRA folders saved without
PEFT's conversion. Their factors are only right over the base with its principal part moved
out, which nothing but PEFT's own re-initialisation rebuilds (and which would overwrite the
base shared by every other adapter in a server). `import_peft_folder` turns such a folder into
the plain LoRA of rank 2r over the real base that PEFT's conversion gives, then imports it;
every other folder is imported as it is."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

from portfolio import adapter_files
from portfolio.errors import InvalidAdapter


def moved_base_init(folder: str | Path) -> str | None:
    """``pissa`` or ``olora`` when the folder's factors are relative to PEFT's modified base."""
    try:
        init = json.loads((Path(folder) / adapter_files.CONFIG_FILE).read_text()).get("init_lora_weights")
    except (OSError, ValueError, AttributeError):
        return None  # read_lora_folder says what is wrong with it
    return init if init in adapter_files.MOVED_BASE_INITS else None


def to_plain_lora(folder: str | Path, base, dest: Path, log: Callable[[str], None] = print) -> Path:
    """PEFT's conversion of a PiSSA/OLoRA folder: rebuild its starting factors over ``base``
    (both inits are deterministic: an SVD, a QR), load the trained factors, and save the
    difference as a plain LoRA of rank 2r over the unmodified base."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from portfolio.modeling import load_base

    folder = Path(folder)
    init = moved_base_init(folder)
    config = LoraConfig.from_pretrained(str(folder))
    log(f"{folder}: {init} factors, relative to a changed base; converting to a plain LoRA of rank {2 * config.r} (PEFT's conversion)")
    model, _ = load_base(base, log=log)
    work = Path(tempfile.mkdtemp(prefix="portfolio-convert-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)  # the start, with the base's principal part moved out
            peft_model.peft_config["default"].init_lora_weights = True
            peft_model.save_pretrained(work / "start")
            peft_model.peft_config["default"].init_lora_weights = init
            result = set_peft_model_state_dict(peft_model, load_file(folder / adapter_files.WEIGHTS_FILE))
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:
                raise InvalidAdapter(f"{folder}: its weights do not match its config (no {missing[0]})")
            peft_model.save_pretrained(work / "converted", path_initial_model_for_weight_conversion=str(work / "start"))
        config_path = work / "converted" / adapter_files.CONFIG_FILE
        converted = json.loads(config_path.read_text())
        converted["init_lora_weights"] = True
        config_path.write_text(json.dumps(converted, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(work / "converted", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def import_peft_folder(registry, name: str, folder: str | Path, base: str, *, log: Callable[[str], None] = print,
                       **kw: Any):
    """`Registry.import_adapter`, converting a PiSSA/OLoRA folder first (`to_plain_lora`)."""
    if moved_base_init(folder) is None:
        return registry.import_adapter(name, folder, base, **kw)
    work = Path(tempfile.mkdtemp(prefix="portfolio-import-"))
    try:
        plain = to_plain_lora(folder, registry.bases.get(base), work / "plain", log)
        if not kw.get("description"):
            kw["description"] = f"imported from {Path(folder).resolve()} ({moved_base_init(folder)}, converted to plain LoRA)"
        return registry.import_adapter(name, plain, base, **kw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
