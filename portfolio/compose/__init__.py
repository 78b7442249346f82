"""Composition: merging several versions into one, stacking them, exporting stacks.

`MERGE_METHODS` is the one table of merge methods (torch-free, so the CLI can list them
without loading torch): how each works, its default weights and rank, whether it takes a
density. A dense method's tensor function is `merge_math.ELEMENTWISE[name]`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MergeMethod:
    """One merge method."""

    name: str
    dense: bool  # on each layer's dense updates ΔW (then factored to the rank), not on the factors
    averaging: bool  # default weights 1/n (else 1 each)
    exact_rank: bool  # without --rank the result keeps the exact rank Σ r_i
    refactors: bool  # the concatenated factors are re-factored (cat keeps them as they are)
    summary: str


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", False, True, True, True, "exact weighted sum (re-factored; --rank truncates)"),
    MergeMethod("cat", False, False, True, False, "exact, rank Σr"),
    MergeMethod("svd", False, True, False, True, "the sum at --rank"),
    MergeMethod("ties", True, False, False, True, "TIES on ΔW, then factored to --rank"),
    MergeMethod("dare_linear", True, True, False, True, "DARE drops, weighted sum on ΔW"),
    MergeMethod("dare_ties", True, False, False, True, "DARE drops, then TIES on ΔW"),
    MergeMethod("magnitude_prune", True, True, False, True, "keep the largest entries of ΔW"),
)}
METHODS = tuple(MERGE_METHODS)
"""Merge methods `portfolio merge --method` takes."""
DENSE_METHODS = tuple(name for name, m in MERGE_METHODS.items() if m.dense)
