"""The model a training run trains: the base (in its dtype, or quantised), the adapter being
trained (``default``: fresh with its variant and init, a copy of the parent, or O-LoRA's new
factors beside the kept ones) and the parent for the KL term (``parent``); and the trained
adapter saved as the plain PEFT folder the registry stores (PiSSA/OLoRA converted, O-LoRA
concatenated)."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from portfolio import adapter_files, runtime
from portfolio.export import export_version
from portfolio.registry.registry import Registry
from portfolio.training.config import MOVES_BASE, TrainConfig
from portfolio.training.plan import Plan, Prepared

INIT_DIR = "init-adapter"  # a pissa/olora run's starting factors, for the conversion at save time


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them;
    non-reentrant, so the frozen base's inputs need no requires_grad."""
    # transformers ≥ 5 names it activation checkpointing and warns on the old name
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

def build_model(registry: Registry, plan: Plan, base, workdir: Path, device, log, data: Prepared | None = None, pad_id: int = 0):
    """The base with the adapter being trained (``default``): a fresh LoRA (with its
    variant and init), or a copy of the parent, with the parent itself beside it (``parent``,
    frozen) for the KL term."""
    from peft import PeftModel

    from portfolio.modeling import load_base

    from portfolio.training.config import resolve_dtype

    cfg = plan.cfg
    model, _ = load_base(base, dtype=resolve_dtype(cfg.dtype, device), log=log, quantize=cfg.quantize_base, device=device)
    if cfg.quantize_base:
        from peft import prepare_model_for_kbit_training

        # norms (and anything else not quantised) in float32, inputs that carry gradients
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if plan.parent is not None and cfg.orthogonal:
        model = _orthogonal_adapters(model, registry, plan, workdir)
    elif plan.parent is not None:
        parent_dir = export_version(registry, plan.parent.ref, Path(tempfile.mkdtemp(dir=workdir)) / "parent", card=False)
        model = PeftModel.from_pretrained(model, parent_dir, adapter_name="default", is_trainable=True)
        model.load_adapter(parent_dir, adapter_name="parent", is_trainable=False)
        model.set_adapter("default")
    else:
        model = fresh_adapter(model, cfg, workdir, device, data, pad_id)
    return runtime.place(model, device)


PARENT_DIR = "parent-adapter"


def _orthogonal_adapters(model, registry: Registry, plan: Plan, workdir: Path):
    """O-LoRA: the parent's factors (``parent``, frozen) and new ones (``default``, fresh,
    ``cfg.rank``), both active so their updates add up; the parent alone is the KL teacher."""
    from peft import LoraConfig, PeftModel

    cfg = plan.cfg
    parent_dir = workdir / PARENT_DIR
    shutil.rmtree(parent_dir, ignore_errors=True)
    export_version(registry, plan.parent.ref, parent_dir, card=False)
    model = PeftModel.from_pretrained(model, parent_dir, adapter_name="parent", is_trainable=False)
    model.add_adapter("default", LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=cfg.dropout,
                                            task_type="CAUSAL_LM"))
    train_both(model)
    return model


def train_both(model) -> None:
    """``parent`` and ``default`` active together, only ``default``'s factors trainable."""
    model.base_model.set_adapter(["parent", "default"])
    for name, p in model.named_parameters():
        if ".parent." in name:
            p.requires_grad_(False)


def orthogonality_pairs(model) -> list[tuple[Any, Any]]:
    """(the parent's A, the new A) of every module both adapt: O-LoRA's penalty's inputs."""
    params = dict(model.named_parameters())
    suffix_new, suffix_old = ".lora_A.default.weight", ".lora_A.parent.weight"
    return [(params[n[: -len(suffix_new)] + suffix_old], p) for n, p in params.items()
            if n.endswith(suffix_new) and n[: -len(suffix_new)] + suffix_old in params]


def fresh_adapter(model, cfg: TrainConfig, workdir: Path, device, data: Prepared | None, pad_id: int):
    """A new LoRA on ``model`` as PEFT initialises it for ``cfg.init``. For pissa/olora the
    starting factors are saved (`INIT_DIR`) for the conversion at save time; every init here
    is a function of the base, the data and the seed, so a resumed run rebuilds the same start."""
    from peft import LoraConfig, get_peft_model

    init = cfg.init or "default"
    extra = {}
    if init == "eva":
        from peft import EvaConfig

        # rho 1: the same rank in every layer (a plain LoRA every engine loads; EVA's
        # redistribution would need a rank_pattern)
        extra["eva_config"] = EvaConfig(rho=1.0)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.targets, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                      use_rslora=bool(cfg.use_rslora), use_dora=bool(cfg.use_dora),
                      init_lora_weights=True if init == "default" else init, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on PiSSA/OLoRA conversion, said in docs/training.md instead
        model = get_peft_model(runtime.place(model, device), lora)
    if init == "eva":
        from peft import initialize_lora_eva_weights

        from portfolio.data.tokenize import collate

        batches = [{k: v.to(device) for k, v in collate(data.fresh[i:i + cfg.batch_size], pad_id).items() if k != "labels"}
                   for i in range(0, len(data.fresh), cfg.batch_size)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    if init in MOVES_BASE:
        start = workdir / INIT_DIR
        shutil.rmtree(start, ignore_errors=True)
        model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the start saved as a plain LoRA
        model.save_pretrained(start, safe_serialization=True)
        model.peft_config["default"].init_lora_weights = init
    return model


def float32_model(registry: Registry, plan: Plan, base, lora_folder, workdir: Path, device, log):
    """The float32 base with the trained adapter (``default``) and the parent (``parent``)."""
    from peft import PeftModel

    from portfolio.modeling import load_base

    model, _ = load_base(base, log=log)
    model = PeftModel.from_pretrained(model, lora_folder.path, adapter_name="default")
    if plan.parent is not None:
        model.load_adapter(export_version(registry, plan.parent.ref, Path(tempfile.mkdtemp(dir=workdir)) / "parent", card=False),
                           adapter_name="parent")
    model.set_adapter("default")
    return model.to(device).eval()


def save_adapter(model, workdir: Path, convert: bool = False) -> adapter_files.LoraFolder:
    """The trained adapter as a PEFT folder; with ``convert`` (pissa/olora), PEFT's
    conversion to a plain LoRA of rank 2r over the original base, from the saved start."""
    out_dir = workdir / "adapter"
    shutil.rmtree(out_dir, ignore_errors=True)
    extra = {"path_initial_model_for_weight_conversion": str(workdir / INIT_DIR)} if convert else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out_dir, selected_adapters=["default"], safe_serialization=True, **extra)
    if convert:  # the conversion's config keeps the init's name; over the original base it is a plain LoRA
        config_path = out_dir / adapter_files.CONFIG_FILE
        config = json.loads(config_path.read_text())
        config["init_lora_weights"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return adapter_files.read_lora_folder(out_dir)


def concatenated(new: adapter_files.LoraFolder, workdir: Path) -> adapter_files.LoraFolder:
    """An O-LoRA version as one plain LoRA: the exact `cat` of the parent's factors and the
    new ones (rank r_parent + r_new, scale 1), what `export`, vLLM and merges read."""
    from portfolio.compose.lora_files import LoraSource
    from portfolio.compose.merge import MergeRecipe, merge_sources

    parent = adapter_files.read_lora_folder(workdir / PARENT_DIR)
    out = workdir / "adapter-cat"
    shutil.rmtree(out, ignore_errors=True)
    merge_sources([LoraSource("parent", parent.weights, parent.config), LoraSource("new", new.weights, new.config)],
                  MergeRecipe("cat"), out)
    return adapter_files.read_lora_folder(out)
