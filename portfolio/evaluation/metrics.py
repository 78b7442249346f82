"""Token-level language-model metrics, streamed batch by batch so memory stays flat."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from portfolio.data.tokenize import IGNORE, Example, collate, shifted_labels


@torch.no_grad()
def evaluate_examples(model: Any, examples: list[Example], pad_id: int, batch_size: int = 8, device: torch.device | None = None) -> dict[str, float]:
    """Mean next-token loss, perplexity and next-token accuracy over every scored position
    of ``examples``, plus ``n_tokens`` (how many positions were scored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = shifted_labels(batch["labels"])
        mask = targets != IGNORE
        scored = logits[mask].float()  # only the scored positions, [n, vocab]
        total_loss += float(F.cross_entropy(scored, targets[mask], reduction="sum"))
        total_correct += int((scored.argmax(-1) == targets[mask]).sum())
        total += int(mask.sum())
    if was_training:
        model.train()
    if total == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "accuracy": float("nan"), "n_tokens": 0}
    loss = total_loss / total
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "accuracy": total_correct / total, "n_tokens": total}
