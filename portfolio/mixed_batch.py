"""Several adapters in one batch, including the ones PEFT cannot mix.

PEFT runs a batch whose rows use different adapters in one forward pass (``adapter_names``,
one per row, ``__base__`` for none), except when one of them is DoRA: its magnitude vector
rescales the whole adapted weight, so PEFT refuses (``Cannot pass adapter_names when DoRA is
enabled``). `forward` and `generate` take the same arguments either way: rows of plain LoRA
adapters (and the base) still go in one mixed pass, and each DoRA adapter's rows go in a pass
of their own with that adapter active; the outputs come back in the rows' order.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from portfolio.runtime import BASE_ADAPTER


def is_dora(model: Any, name: str) -> bool:
    """Whether adapter ``name`` of a PeftModel is a DoRA adapter."""
    config = getattr(model, "peft_config", {}).get(name)
    return bool(getattr(config, "use_dora", False))


def _groups(model: Any, names: list[str]) -> list[tuple[str | None, list[int]]]:
    """Rows that can share one pass: (None, the mixable rows) and (name, rows) per DoRA adapter."""
    dora = {n for n in set(names) if n != BASE_ADAPTER and is_dora(model, n)}
    mixed = [i for i, n in enumerate(names) if n not in dora]
    groups: list[tuple[str | None, list[int]]] = [(None, mixed)] if mixed else []
    return groups + [(n, [i for i, m in enumerate(names) if m == n]) for n in sorted(dora)]


@contextmanager
def only(model: Any, name: str):
    """``name`` as the one active adapter for the duration (the base for ``__base__``)."""
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            yield
        return
    before = list(model.active_adapters)
    model.base_model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.base_model.set_adapter(before if len(before) > 1 else before[0], inference_mode=True)


def _rows(inputs: dict[str, Any], rows: list[int], batch: int) -> dict[str, Any]:
    import torch

    index = None
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            if index is None:
                index = torch.tensor(rows, device=value.device)
            out[key] = value.index_select(0, index.to(value.device))
        else:
            out[key] = value
    return out


def _batch_size(inputs: dict[str, Any]) -> int:
    return int(inputs["input_ids"].shape[0])


def forward(model: Any, adapter_names: list[str] | None, **inputs: Any) -> Any:
    """``model(**inputs, adapter_names=...)``; the result's ``logits`` are those of each row
    under its own adapter, whatever the adapters are."""
    if not adapter_names:
        return model(**inputs)
    groups = _groups(model, adapter_names)
    if len(groups) == 1 and groups[0][0] is None:
        return model(**inputs, adapter_names=adapter_names)
    batch = _batch_size(inputs)
    logits = None
    for name, rows in groups:
        part = _rows(inputs, rows, batch)
        if name is None:
            out = model(**part, adapter_names=[adapter_names[i] for i in rows]).logits
        else:
            with only(model, name):
                out = model(**part).logits
        if logits is None:
            logits = out.new_empty((batch, *out.shape[1:]))
        logits[rows] = out
    return SimpleNamespace(logits=logits)


def generate(model: Any, adapter_names: list[str] | None, pad_id: int, **inputs: Any) -> Any:
    """``model.generate(**inputs, adapter_names=...)``: one sequence per row, each generated
    under its row's adapter; rows of separate passes are right-padded with ``pad_id`` to one
    width (what a finished row of one pass gets too)."""
    if not adapter_names:
        return model.generate(**inputs)
    groups = _groups(model, adapter_names)
    if len(groups) == 1 and groups[0][0] is None:
        return model.generate(**inputs, adapter_names=adapter_names)
    batch = _batch_size(inputs)
    parts = []
    for name, rows in groups:
        part = _rows(inputs, rows, batch)
        if name is None:
            parts.append((rows, model.generate(**part, adapter_names=[adapter_names[i] for i in rows])))
        else:
            with only(model, name):
                parts.append((rows, model.generate(**part)))
    width = max(seq.shape[1] for _, seq in parts)
    out = parts[0][1].new_full((batch, width), pad_id)
    for rows, seq in parts:
        out[rows, :seq.shape[1]] = seq
    return out
