"""Token-level language-model metrics, streamed batch by batch so memory stays flat."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from portfolio import mixed_batch
from portfolio.data.tokenize import IGNORE, Example, collate, shifted_labels


@torch.no_grad()
def evaluate_examples(model: Any, examples: list[Example], pad_id: int, batch_size: int = 8, device: torch.device | None = None,
                      adapter_names: list[str] | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and next-token accuracy over every scored position
    of ``examples``, plus ``n_tokens`` (how many positions were scored) and ``per_example``:
    ``[loss sum, correct, scored positions]`` of each example, in order, so that two models
    scored on the same examples can be compared pair by pair (`policy.gates`).

    ``adapter_names`` (one per example, PEFT's ``__base__`` for none) scores each example with
    its own adapter of a PeftModel: several models in the same batches (PEFT's mixed-adapter
    batch)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    per_example: list[list[float]] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        names = adapter_names[start : start + batch_size] if adapter_names else None
        with autocast:
            logits = mixed_batch.forward(model, names, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = shifted_labels(batch["labels"])
        mask = targets != IGNORE
        scored = logits[mask].float()  # only the scored positions, [n, vocab], row by row
        losses = F.cross_entropy(scored, targets[mask], reduction="none")
        correct = scored.argmax(-1) == targets[mask]
        counts = mask.sum(1).tolist()
        for row_loss, row_correct, row_n in zip(losses.split(counts), correct.split(counts), counts):
            per_example.append([float(row_loss.sum()), int(row_correct.sum()), int(row_n)])
        total_loss += float(losses.sum())
        total_correct += int(correct.sum())
        total += int(mask.sum())
    if was_training:
        model.train()
    if total == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "n_tokens": 0, "per_example": per_example}
    loss = total_loss / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": total_correct / total, "n_tokens": total,
            "per_example": per_example}


def metrics_from_rows(per_example: list[list[float]]) -> dict[str, float]:
    """Loss, perplexity, accuracy and ``n_tokens`` from per-example ``[loss sum, correct,
    tokens]``: token-weighted, exactly as `evaluate_examples` computes them."""
    total = sum(int(r[2]) for r in per_example)
    if total == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "n_tokens": 0}
    loss = sum(r[0] for r in per_example) / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": sum(r[1] for r in per_example) / total,
            "n_tokens": total}
