"""A PEFT LoRA adapter as a GGUF LoRA adapter, the file llama.cpp (``--lora``) and Ollama
(``ADAPTER``) load over the base's GGUF.

What llama.cpp reads (its ``llama-adapter.cpp``): ``general.type = adapter``,
``adapter.type = lora``, ``general.architecture`` equal to the base's, ``adapter.lora.alpha``,
and for each adapted weight ``blk.N.<tensor>.weight.lora_a`` (numpy shape ``[r, in]``) and
``.lora_b`` (``[out, r]``). It applies ``W x + s · B (A x)`` with ``s = alpha / r`` (``r`` read
from the tensor) when alpha is non-zero, and ``s = 1`` when it is zero.

Two facts make the conversion exact rather than approximate:

- llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` for its rotary
  embedding (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``), so the shipped base's Q/K
  weights are ``P W``. ΔW = B A then has to become ``P B A``: the same permutation on B's
  rows, A untouched.
- Where one ``alpha / r`` does not describe every module (rsLoRA, ``alpha_pattern``), each
  module's scale is folded into its B and alpha is written as 0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

from portfolio.compose.lora_files import module_alpha
from portfolio.compose.merge_math import lora_scale
from portfolio.errors import InvalidAdapter

#: Hugging Face model class -> llama.cpp architecture name, for the bases this export knows.
ARCHITECTURES = {"LlamaForCausalLM": "llama"}
#: PEFT module suffix -> llama.cpp tensor name inside ``blk.N``.
TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_MODULE_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a rotary projection: within each head, the two halves of
    the head dimension interleaved (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: dict[str, np.ndarray], config: dict[str, Any], base_config: dict[str, Any]
                 ) -> tuple[dict[str, np.ndarray], float]:
    """(GGUF tensor name -> float32 array, the ``adapter.lora.alpha`` to write) for PEFT
    ``tensors`` with adapter ``config`` over a base with ``base_config`` (its HF config)."""
    problems = [k for k in tensors if not _MODULE_RE.match(k)]
    if problems:
        raise InvalidAdapter(f"{problems[0]} has no llama.cpp equivalent (only LoRA on the decoder's linear layers converts); "
                             "export this version as a PEFT folder instead")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        layer, sub, which = _MODULE_RE.match(key).groups()
        if sub not in TENSOR_NAMES:
            raise InvalidAdapter(f"module {sub} of layer {layer} has no llama.cpp tensor; adapt only {', '.join(TENSOR_NAMES)}")
        modules.setdefault(f"model.layers.{layer}.{sub}", {})[which] = value.astype(np.float32)
    rslora = bool(config.get("use_rslora"))
    scales = {m: lora_scale(module_alpha(config, m), f["A"].shape[0], rslora) for m, f in modules.items()}
    alpha = float(config["lora_alpha"])
    uniform = not rslora and all(s == alpha / modules[m]["A"].shape[0] for m, s in scales.items())
    n_head = int(base_config["num_attention_heads"])
    n_kv = int(base_config.get("num_key_value_heads") or n_head)
    out: dict[str, np.ndarray] = {}
    for module, f in sorted(modules.items(), key=lambda kv: _order(kv[0])):
        layer, sub = module.split(".", 3)[2], module.split(".", 3)[3]
        b = f["B"] if uniform else f["B"] * np.float32(scales[module])
        if sub == "self_attn.q_proj":
            b = permute_rows(b, n_head)
        elif sub == "self_attn.k_proj":
            b = permute_rows(b, n_kv)
        name = f"blk.{layer}.{TENSOR_NAMES[sub]}.weight"
        out[name + ".lora_a"] = np.ascontiguousarray(f["A"])
        out[name + ".lora_b"] = np.ascontiguousarray(b)
    return out, (alpha if uniform else 0.0)


def _order(module: str) -> tuple[int, str]:
    return int(module.split(".")[2]), module


def write_gguf_adapter(peft_folder: str | os.PathLike, dest: str | os.PathLike, base_architecture: str,
                       base_config: dict[str, Any], name: str) -> Path:
    """Convert the PEFT folder at ``peft_folder`` to the GGUF adapter file ``dest``."""
    arch = ARCHITECTURES.get(base_architecture)
    if arch is None:
        raise InvalidAdapter(f"a {base_architecture} base has no GGUF adapter export yet (known: {', '.join(ARCHITECTURES)}); "
                             "export a PEFT folder instead")
    folder = Path(peft_folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("use_dora"):
        raise InvalidAdapter("llama.cpp has no DoRA; export this version as a PEFT folder instead")
    tensors, alpha = gguf_tensors(load_file(str(folder / "adapter_model.safetensors")), config, base_config)
    dest = Path(dest)
    writer = gguf.GGUFWriter(str(dest), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    for key, value in tensors.items():
        writer.add_tensor(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
