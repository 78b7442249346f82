"""The model runtime's primitives: which device, which pad id, and PEFT's name for "no
adapter". A base loaded with versions attached is `serving.loaded`, built on these; training,
evaluation, suites and the server all take them from here.

torch and transformers are imported inside the functions, on purpose: `portfolio --help` and
the registry commands never pay for them.
"""

from __future__ import annotations

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def resolve_device(name: str):
    """``auto`` -> CUDA when present, else CPU; any other name as given (a `torch.device`)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def place(model, device):
    """``model`` on ``device``; a bitsandbytes-quantised model stays where it was loaded
    (``device_map``: its packed weights are not moved by ``.to``)."""
    return model if getattr(model, "is_quantized", False) else model.to(device)


def pad_id(tokenizer) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its end of sequence."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
