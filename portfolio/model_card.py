"""A model card for an exported version: README.md with Hugging Face's YAML header, so the
folder says on the Hub (or in any file browser) what it is, what it was trained on — down to
each snapshot's sha256 — how it scored, and where it came from."""

from __future__ import annotations

from typing import Any

MAX_LINEAGE_HOPS = 8


def model_card(registry, ref: str) -> str:
    """The README.md text of version ``ref``."""
    import yaml

    version = registry.get_version(ref)
    base = registry.bases.get(version.base_model)
    lineage = registry.lineage(version.ref)
    own = [d for d in lineage.data if d.version == version.ref]
    upstream = [d for d in lineage.data if d.version != version.ref]
    header: dict[str, Any] = {
        "base_model": base.model_id,
        "base_model_relation": "merge" if version.kind in ("merge", "stack") else "adapter",
        "library_name": "peft",
        "tags": ["lora", "portfolio", version.domain],
        "datasets": sorted({d.snapshot for d in lineage.data}),
        "portfolio": {
            "version": version.ref,
            "kind": version.kind,
            "status": version.status,
            "artifact_sha256": version.artifact_digest,
            "base_weights_sha256": base.weights_sha256,
            "data": [{"snapshot": d.snapshot, "sha256": d.sha256, "role": d.role, "rows": d.n_rows, "used_by": d.version}
                     for d in lineage.data],
        },
    }
    lines = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {version.ref}", "",
             f"A LoRA adapter (rank {version.rank}, alpha {version.alpha:g}, on {', '.join(version.target_modules)}) for "
             f"`{base.model_id}`, exported by portfolio. Load it with "
             f"`PeftModel.from_pretrained(base_model, \"<this folder>\")`.", ""]
    if version.description:
        lines += [version.description, ""]
    lines += ["## Data", "", "| snapshot | role | rows | sha256 | used by |", "|---|---|---|---|---|"]
    lines += [f"| {d.snapshot} | {d.role} | {d.n_rows} | `{d.sha256}` | {d.version} |" for d in own + upstream] or ["| - | | | | |"]
    lines += ["", "## Evaluations", ""]
    latest: dict[tuple[str, str], Any] = {}
    for e in registry.evaluations.list(version.ref):
        latest[(e.snapshot, e.metric)] = e
    if latest:
        metrics = sorted({m for _, m in latest})
        lines += ["| snapshot | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for snap in sorted({s for s, _ in latest}):
            lines.append(f"| {snap} | " + " | ".join(f"{latest[(snap, m)].value:.4f}" if (snap, m) in latest else "" for m in metrics) + " |")
    else:
        lines.append("None stored (`portfolio eval` scores a version).")
    lines += ["", "## Lineage", "", _lineage_line(lineage, version.ref), "",
              f"The full record: `portfolio lineage {version.ref}`.", ""]
    return "\n".join(lines)


def _lineage_line(lineage, root: str) -> str:
    """``a@3 ← a@2 (finetune) ← a@1 (finetune)``: the first parent of each hop, newest first."""
    first: dict[str, Any] = {}
    for edge in lineage.parents:
        first.setdefault(edge.child, edge)
    parts, node = [root], root
    while node in first and len(parts) <= MAX_LINEAGE_HOPS:
        edge = first[node]
        others = [e.parent for e in lineage.parents if e.child == node and e is not edge]
        parts.append(f"{edge.parent} ({edge.relation}{', with ' + ', '.join(others) if others else ''})")
        node = edge.parent
    if node in first:
        parts.append("…")
    return " ← ".join(parts) + f" ← base {lineage.base_model.name}"
