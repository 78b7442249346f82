"""Stacks: a version made of several versions served together (PEFT multi-adapter), not
merged. A stack has no artifact of its own; its components and their weights live in the
version's config and as ``stack`` lineage edges, so lineage and data provenance run through
it like through any version. `export_stack` writes the one-adapter equivalent: the exact
`cat` merge, for servers that take a single adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from portfolio import adapter_files
from portfolio.compose.lora_files import module_shapes, union_modules
from portfolio.compose.merge import MergeRecipe, check_same_base, merge_sources, source_of, weight_problems
from portfolio.errors import InvalidState
from portfolio.registry.specs import ParentSpec


def flatten(registry, refs: list[str], weights: list[float] | None) -> list[tuple[Any, float]]:
    """(single-artifact version, weight) for each ref, a stack's parts expanded with their
    weights multiplied in (a stack of stacks is one flat stack)."""
    from portfolio.serving import components

    problems = weight_problems(weights, len(refs))
    if problems:
        raise InvalidState(problems[0])
    out = []
    for ref, w in zip(refs, weights or [1.0] * len(refs)):
        for part, pw in components(registry, registry.get_version(ref)):
            out.append((part, w * pw))
    return out


def stack_adapters(registry, name: str, refs: list[str], weights: list[float] | None = None, *,
                   description: str | None = None, domain: str | None = None):
    """Record a stack version of ``name`` whose forward pass adds every component's update
    (times its weight). Components must share a base; they may adapt different modules,
    but where two adapt the same module the shapes must agree."""

    if not refs:
        raise InvalidState("nothing to stack; give at least one --from REF")
    parts = flatten(registry, refs, weights)
    base = check_same_base(registry, [v for v, _ in parts])
    sources = [source_of(registry, v, w) for v, w in parts]
    shapes = [module_shapes(s) for s in sources]
    modules = union_modules(sources, shapes)
    composite = {
        "components": [{"ref": v.ref, "weight": w, "artifact": v.artifact_digest} for v, w in parts],
        "rank": sum(v.rank for v, _ in parts),
        "alpha": sum(v.rank for v, _ in parts),  # the exported cat merge has scale 1
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "n_params": sum(r * (i + o) for sh in shapes for r, i, o in sh.values()),
    }
    domains = {v.domain for v, _ in parts}
    label = " + ".join(f"{w:g}·{v.ref}" for v, w in parts)
    return registry.register_version(
        name,
        base=base,
        kind="stack",
        composite=composite,
        parents=[ParentSpec(v.ref, "stack", {"weight": w}) for v, w in parts],
        domain=domain or (domains.pop() if len(domains) == 1 else None),
        description=description or f"stack of {label}",
    )


def export_stack(registry, version, dest: str | Path) -> Path:
    """Write a stack as one PEFT folder: the exact `cat` merge of its weighted components
    (B'A' = Σ w_i s_i B_i A_i, rank Σ r_i, zero-padded where a component skips a module)."""
    from portfolio.serving import components

    parts = components(registry, version)
    sources = [source_of(registry, v, w) for v, w in parts]
    tmp = Path(tempfile.mkdtemp(prefix="portfolio-stack-"))
    try:
        merge_sources(sources, MergeRecipe("cat", tuple(w for _, w in parts)), tmp, allow_missing=True)
        base = registry.bases.get(version.base_model)
        config = json.loads((tmp / adapter_files.CONFIG_FILE).read_text())
        return adapter_files.write_peft_folder(dest, tmp / adapter_files.WEIGHTS_FILE, config, base.model_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
