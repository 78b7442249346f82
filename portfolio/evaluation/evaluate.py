"""`evaluate`: score versions (or a base) on the held-out rows of snapshots, reusing any
stored result for identical inputs.

A result's key is the sha256 of everything that determines it: the base weights, the
adapter's artifact digest (none for the base alone), the snapshot's sha256, the exact held-out
row ids, the sequence length and `METRICS_VERSION`. Equal key, equal numbers: the stored ones
are returned and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portfolio.data.splits import split_rows
from portfolio.data.tokenize import encode_rows
from portfolio.errors import InvalidState
from portfolio.registry.registry import Registry

METRICS_VERSION = 2  # bump when the metric code changes, so stored results are not reused (2: per-example scores)
DEFAULT_SEQ_LEN = 256


@dataclass(frozen=True)
class Score:
    """One model on one snapshot."""

    model: str
    snapshot: str
    metrics: dict[str, float]
    n_tokens: int
    reused: bool
    per_example: list[list[float]] | None = None  # [loss sum, correct, tokens] per example, in order


def eval_key(base_sha: str, artifact: str | None, snapshot_sha: str, row_ids: list[int], seq_len: int) -> str:
    """The identity of an evaluation's inputs."""
    payload = {"base": base_sha, "adapter": artifact, "data": snapshot_sha, "rows": row_ids, "seq_len": seq_len, "metrics": METRICS_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _resolve(registry: Registry, ref: str) -> tuple[str, str, str | None]:
    """(label, base name, artifact digest or None) of a version ref or ``base:NAME``."""
    if ref.startswith("base:"):
        return ref, registry.get_base(ref[5:]).name, None
    from portfolio.serving import serving_key

    version = registry.get_version(ref)
    if version.status == "archived":
        raise InvalidState(f"{version.ref} is archived and its bytes are gone; its stored scores remain (`portfolio show`)")
    return version.ref, version.base_model, serving_key(registry, version)


def resolve_models(registry: Registry, models: list[str]) -> tuple[list[tuple[str, str, str | None]], Any]:
    """(label, base name, serving key) of each model, and the one base they share (models on
    different bases cannot share one model load)."""
    resolved = [_resolve(registry, m) for m in models]
    bases = {base for _, base, _ in resolved}
    if len(bases) > 1:
        raise InvalidState(f"models on different bases cannot share one evaluation: {', '.join(sorted(bases))}")
    return resolved, registry.get_base(bases.pop())


def evaluate(
    registry: Registry,
    models: list[str],
    snapshots: list[str],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    batch_size: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> list[Score]:
    """Scores of every model on every snapshot's held-out rows (loss, perplexity,
    accuracy, tokens scored); computed only where no stored result matches."""
    resolved, base = resolve_models(registry, models)
    snaps = [registry.get_snapshot(s) for s in snapshots]
    heldout = {s.ref: split_rows(registry.snapshot_rows(s.ref))[1] for s in snaps}

    scores: dict[tuple[str, str], Score] = {}
    pending: list[tuple[str, str | None, Any, str]] = []
    for label, _, artifact in resolved:
        for snap in snaps:
            rows = [r["row"] for r in heldout[snap.ref]]
            key = eval_key(base.weights_sha256, artifact, snap.sha256, rows, seq_len)
            stored = registry.find_evaluation(key)
            if stored is not None:
                scores[(label, snap.ref)] = Score(label, snap.ref, stored["metrics"], stored["n_tokens"] or 0, True, stored.get("per_example"))
            else:
                pending.append((label, artifact, snap, key))
    if pending:
        _compute(registry, base, pending, heldout, seq_len, batch_size, device, scores, log)
    return [scores[(label, s.ref)] for label, _, _ in resolved for s in snaps]


def _compute(registry, base, pending, heldout, seq_len, batch_size, device_name, scores, log) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from portfolio.evaluation.metrics import evaluate_examples
    from portfolio.modeling import load_base, model_folder
    from portfolio.serving import activate, attach
    from portfolio.training.loop import resolve_device

    device = resolve_device(device_name)
    batch_size = batch_size or (32 if device.type == "cuda" else 8)
    folder, _ = model_folder(base, log)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model, _ = load_base(base, log=log)
    tmp = Path(tempfile.mkdtemp(prefix="portfolio-eval-"))
    try:
        adapters: dict[str, list[str]] = {}
        for label, artifact, _, _ in pending:
            if artifact is None or label in adapters:
                continue
            model, adapters[label] = attach(model, registry, label, tmp, prefix=f"v{len(adapters)}_")
        model.to(device).eval()
        examples = {}
        for label, artifact, snap, key in pending:
            if snap.ref not in examples:
                examples[snap.ref] = encode_rows(heldout[snap.ref], snap.format, tokenizer, seq_len)
            log(f"evaluating {label} on {snap.ref} ({len(heldout[snap.ref])} held-out rows)")
            if artifact is None and isinstance(model, PeftModel):
                with model.disable_adapter():
                    metrics = evaluate_examples(model, examples[snap.ref], pad_id, batch_size, device)
            else:
                if artifact is not None:
                    activate(model, adapters[label])
                metrics = evaluate_examples(model, examples[snap.ref], pad_id, batch_size, device)
            n_tokens = int(metrics.pop("n_tokens"))
            per_example = metrics.pop("per_example")
            rows = [r["row"] for r in heldout[snap.ref]]
            registry.record_evaluation(label, snap.ref, metrics, n_tokens=n_tokens, row_ids=rows, eval_key=key, per_example=per_example)
            scores[(label, snap.ref)] = Score(label, snap.ref, metrics, n_tokens, False, per_example)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
