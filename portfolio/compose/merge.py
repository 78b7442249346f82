"""`merge`: several registered LoRA versions become one new version, exactly where the math
allows it, and with the reconstruction error recorded where it does not.

`merge_sources` works on files (no registry, no model): per module it reads the factors of
every source, applies the method, and keeps only the merged factors. `merge_adapters` wraps
it for the registry: checks, a `merge` run, and one `register_version` call with a `merge`
lineage edge (carrying the recipe) to each parent, so the new version inherits every parent's
data provenance through lineage.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from portfolio import adapter_files
from portfolio.compose import DENSE_METHODS, MERGE_METHODS, METHODS
from portfolio.compose import merge_math as mm
from portfolio.compose.lora_files import (
    FactorReader,
    LoraSource,
    check_same_modules,
    factor_keys,
    merged_config,
    module_shapes,
    union_modules,
    write_lora,
)
from portfolio.errors import IncompatibleAdapter, InvalidAdapter, InvalidState, PortfolioError
from portfolio.registry.specs import ParentSpec

DEFAULT_DENSITY = 0.5


@dataclass(frozen=True)
class MergeRecipe:
    """How to merge. ``weights`` default to 1/n for the averaging methods (linear, svd,
    dare_linear, magnitude_prune) and to 1 for cat, ties and dare_ties (a sum, or TIES's own
    disjoint mean). ``rank`` defaults to exact for cat and linear (Σ r_i) and to the largest
    source rank otherwise. ``density`` (share of entries kept) only applies to ties, dare_*
    and magnitude_prune, default 0.5; ``seed`` drives DARE's random drops."""

    method: str
    weights: tuple[float, ...] | None = None
    density: float | None = None
    rank: int | None = None
    seed: int = 0

    def check(self, n_sources: int) -> "MergeRecipe":
        """Every problem with this recipe for ``n_sources`` adapters, raised at once; returns
        the recipe with its defaults filled in."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if n_sources < 1:
            problems.append("nothing to merge; give at least one --from REF")
        problems += weight_problems(self.weights, n_sources)
        method = MERGE_METHODS.get(self.method)
        elementwise = method is not None and method.dense
        if self.density is not None and method is not None and not elementwise:
            problems.append(f"--density applies to {', '.join(DENSE_METHODS)}, not {self.method}")
        if self.density is not None and not 0 < self.density <= 1:
            problems.append(f"density must be in (0, 1], got {self.density}")
        if self.rank is not None and method is not None and not method.refactors:
            problems.append("cat is exact at rank Σ r_i; to choose a rank use --method linear (exact sum) or svd")
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be a positive integer, got {self.rank}")
        if problems:
            raise InvalidState("; ".join(problems))
        weights = self.weights or tuple([1.0 / n_sources if method.averaging else 1.0] * n_sources)
        density = self.density if self.density is not None else (DEFAULT_DENSITY if elementwise else None)
        return MergeRecipe(self.method, tuple(float(w) for w in weights), density, self.rank, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as stored on lineage edges and runs."""
        return {**asdict(self), "weights": list(self.weights or [])}


MAX_WEIGHT = 1e4  # beyond this a weighted update overflows float32 long before it is useful


def weight_problems(weights: tuple[float, ...] | list[float] | None, n_sources: int) -> list[str]:
    """What is wrong with ``--weights`` for ``n_sources`` adapters (nothing if not given)."""
    if weights is None:
        return []
    problems = []
    if len(weights) != n_sources:
        problems.append(f"{len(weights)} weights for {n_sources} adapters; give one --weights value per --from")
    if not all(math.isfinite(w) and abs(w) <= MAX_WEIGHT for w in weights):
        problems.append(f"weights must be finite numbers between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")
    return problems


@dataclass(frozen=True)
class MergeStats:
    """What a merge produced: output rank and the relative Frobenius error of the factored
    result against the merged update it stands for (‖M − B'A'‖ / ‖M‖, over all layers and
    the worst single layer); 0 for exact merges."""

    method: str
    rank: int
    modules: int
    reconstruction_error: float
    max_layer_error: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON and run metrics."""
        return asdict(self)


def output_rank(method: str, rank: int | None, shapes: list[dict[str, tuple[int, int, int]]]) -> int:
    """The uniform rank of the merged factors (PEFT configs take one ``r``), from the
    sources' `module_shapes`."""
    per_module_sum: dict[str, int] = {}
    for sh in shapes:
        for module, (r, _, _) in sh.items():
            per_module_sum[module] = per_module_sum.get(module, 0) + r
    exact = max(per_module_sum.values())
    if MERGE_METHODS[method].exact_rank and rank is None:
        return exact
    if rank is not None:
        # the widest rank any layer can hold: more is zero padding
        full = max(min(i, o) for sh in shapes for _, i, o in sh.values())
        if rank > full:
            raise InvalidState(f"--rank {rank} exceeds what these layers can hold ({full}); pass --rank {full} or less")
    return rank or max(r for sh in shapes for r, _, _ in sh.values())


def merge_sources(
    sources: list[LoraSource],
    recipe: MergeRecipe,
    dest: str | Path,
    *,
    allow_missing: bool = False,
    progress: bool = False,
) -> MergeStats:
    """Merge LoRA files into a PEFT folder at ``dest``, one module at a time (memory: one
    layer's factors, or for the elementwise methods one layer's dense updates).

    Per module, with c_i = w_i·s_i: cat → `concat`; linear/svd → `refactor` of the concat to
    rank R; ties/dare/magnitude_prune → the method on the dense stack [s_i B_i A_i] with
    weights w_i, then `factor_dense` to rank R. ``allow_missing`` treats a module a source
    does not adapt as a zero update (stacks); merges require identical modules."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    recipe = recipe.check(len(sources))
    sources = [LoraSource(s.label, s.weights_path, s.config, w) for s, w in zip(sources, recipe.weights)]
    shapes = [module_shapes(s) for s in sources]  # safetensors headers, read once
    modules = union_modules(sources, shapes) if allow_missing else check_same_modules(sources, shapes)
    rank = output_rank(recipe.method, recipe.rank, shapes)
    tensors: dict[str, torch.Tensor] = {}
    err_total = norm_total = worst = 0.0
    with FactorReader(sources) as reader:
        for module in tqdm(sorted(modules), desc=f"merge ({recipe.method})", unit="layer", disable=not progress, leave=False):
            factors = reader.factors(module)
            method = MERGE_METHODS[recipe.method]
            if method.dense:
                deltas = torch.stack([(s * (b @ a)) for a, b, s, _ in factors])
                weights = torch.tensor([w for *_, w in factors], dtype=torch.float32)
                merged = mm.ELEMENTWISE[recipe.method](deltas, weights, recipe.density, _generator(recipe.seed, module))
                a, b, err, norm = mm.factor_dense(merged, rank)
            else:
                a, b = mm.concat([(a, b, s * w) for a, b, s, w in factors])
                if not method.refactors:
                    norm = float(((b.T @ b) * (a @ a.T)).sum())  # ‖BA‖² = Σ (BᵀB ⊙ AAᵀ), no dense BA
                    a, b, err = _pad(a, rank, 0), _pad(b, rank, 1), 0.0
                else:
                    a, b, err, norm = mm.refactor(a, b, rank)
            a, b = a.float(), b.float()  # what is written; float64 intermediates can hide an overflow
            # Finite factors can still multiply out beyond float32 (B'A' is what a server adds).
            too_big = not math.isfinite(norm) or math.sqrt(norm) > torch.finfo(torch.float32).max
            if too_big or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise InvalidAdapter(
                    f"the {recipe.method} merge of {', '.join(s.label for s in sources)} is not finite at {module}; "
                    "check the weights for overflow"
                )
            key_a, key_b = factor_keys(module)
            tensors[key_a], tensors[key_b] = a, b
            err_total, norm_total = err_total + err, norm_total + norm
            worst = max(worst, math.sqrt(err / norm) if norm > 0 else 0.0)
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    write_lora(dest, tensors, merged_config(sources[0].config, rank, targets))
    rel = math.sqrt(err_total / norm_total) if norm_total > 0 else 0.0
    return MergeStats(recipe.method, rank, len(modules), rel, worst, time.perf_counter() - start)


def _pad(t: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    missing = rank - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=dim)


def _generator(seed: int, module: str) -> torch.Generator:
    # One stream per (seed, layer): the drops of a layer do not depend on which layers came
    # before it, so a merge is reproducible layer by layer.
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class MergeOutcome:
    """The new version and how the merge went."""

    version: Any
    stats: MergeStats
    recipe: MergeRecipe


def merge_adapters(
    registry,
    name: str,
    refs: list[str],
    recipe: MergeRecipe,
    *,
    description: str | None = None,
    domain: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> MergeOutcome:
    """Merge registered versions into a new candidate version of ``name``.

    Checks first (same base by weight hash, same modules and shapes, none archived, a valid
    recipe), then merges from the stored safetensors without loading the base, records a
    ``merge`` run and registers the result with a ``merge`` edge to each parent whose recipe
    holds the method, weights, density, rank, seed and reconstruction error."""

    versions = [registry.get_version(r) for r in refs]
    seen: dict[str, str] = {}
    for ref, v in zip(refs, versions):
        if v.ref in seen:
            raise InvalidState(f"--from {ref} names {v.ref} again (as {seen[v.ref]}); list each version once and give it the summed weight")
        seen[v.ref] = ref
    recipe = recipe.check(len(versions))
    stacked = [v.ref for v in versions if v.kind == "stack"]
    if stacked:
        raise InvalidState(f"{stacked[0]} is a stack; merge its parts, or `portfolio export` it to one adapter first")
    dora = [v.ref for v in versions if (v.lora_config or {}).get("use_dora")]
    if dora:
        raise InvalidState(f"{dora[0]} is a DoRA adapter, and no merge of DoRA adapters is exact: DoRA sets each output row of "
                           "W + s·BA to a learned magnitude, so the sum (or cat) of two DoRA adapters' factors is not the sum "
                           f"of their effects; serve them together as a stack (`portfolio stack`), or merge plain LoRA versions")
    base = check_same_base(registry, versions)
    sources = [source_of(registry, v, w) for v, w in zip(versions, recipe.weights)]
    output_rank(recipe.method, recipe.rank, [module_shapes(s) for s in sources])  # refuse an impossible rank before any record
    run = registry.runs.start("merge", name, {"recipe": recipe.to_dict(), "sources": [v.ref for v in versions]}, seed=recipe.seed)
    tmp = Path(tempfile.mkdtemp(prefix="portfolio-merge-"))
    try:
        stats = merge_sources(sources, recipe, tmp, progress=progress)
        lora = adapter_files.read_lora_folder(tmp)
        adapter_files.check_fits_base(lora, registry.bases.modules(base), base)
        edge = {**recipe.to_dict(), "reconstruction_error": stats.reconstruction_error}
        parts = " + ".join(f"{w:g}·{v.ref}" for v, w in zip(versions, recipe.weights))
        domains = {v.domain for v in versions}
        version = registry.register_version(
            name,
            base=base,
            lora=lora,
            parents=[ParentSpec(v.ref, "merge", {**edge, "weight": w}) for v, w in zip(versions, recipe.weights)],
            domain=domain or (domains.pop() if len(domains) == 1 else None),
            description=description or (f"{recipe.method} merge of {parts} (rank {stats.rank}, "
                                        f"reconstruction error {stats.reconstruction_error:.2e})"),
            run_id=run.id,
            run_metrics=stats.to_dict(),
        )
    except BaseException as exc:
        registry.runs.update(run.id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"merged {len(versions)} adapters ({recipe.method}, rank {stats.rank}) in {stats.seconds:.2f}s; "
        f"reconstruction error {stats.reconstruction_error:.2e}")
    return MergeOutcome(version, stats, recipe)


def check_same_base(registry, versions) -> str:
    """The one base every version is built on, compared by weight hash (two names for the
    same weights are fine); an error naming the odd one out otherwise."""
    first = registry.bases.get(versions[0].base_model)
    for v in versions[1:]:
        other = registry.bases.get(v.base_model)
        if other.weights_sha256 != first.weights_sha256:
            raise IncompatibleAdapter(
                f"{v.ref} is built on base {other.name!r} but {versions[0].ref} on {first.name!r} "
                "(different weights); adapters of different bases cannot be combined"
            )
    return first.name


def source_of(registry, version, weight: float) -> LoraSource:
    """The stored safetensors of a single-artifact version, as a merge source."""
    if version.status == "archived" or version.artifact_digest is None:
        what = "is archived and its bytes are gone" if version.status == "archived" else f"is a {version.kind} version"
        raise InvalidState(f"{version.ref} {what}; it cannot be read as an adapter")
    if (version.lora_config or {}).get("use_dora"):  # its magnitudes are no LoRA factors: reading only A and B would drop them
        raise InvalidState(f"{version.ref} is a DoRA adapter; merges and stacks combine plain LoRA factors, and DoRA's "
                           "magnitude vectors do not combine exactly; serve it on its own, or combine plain LoRA versions")
    try:
        path = registry.store.verified_path(version.artifact_digest, f"the weights of {version.ref}")
    except PortfolioError:
        if registry.get_version(version.ref).status == "archived":  # archived since it was read: a refusal, not damage
            raise InvalidState(f"{version.ref} was archived while it was being read; it cannot be read as an adapter") from None
        raise
    return LoraSource(version.ref, path, dict(version.lora_config), weight)
