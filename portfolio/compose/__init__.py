"""Composition: merging several versions into one, stacking them, exporting stacks."""

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Merge methods `portfolio merge --method` takes (kept here so the CLI imports no torch)."""
