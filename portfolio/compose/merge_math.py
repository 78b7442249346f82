"""Merge math: pure functions on tensors, one module (one layer) at a time.

Notation, per adapted linear layer: adapter i has factors A_i [r_i, in] and B_i [out, r_i] and
scale s_i (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA), so its update is
ΔW_i = s_i · B_i · A_i [out, in]. A merge with weights w_i aims at a new pair (A', B') with
scale 1 such that B'·A' is the merged update.

Two families:

- **Low-rank, exact** (`concat`, `refactor`): Σ w_i ΔW_i is a product of stacked factors and
  is re-factored without forming the dense [out, in] matrix.
- **Elementwise** (`ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the published
  methods trim, drop or elect signs entry by entry, so they need the dense ΔW_i of one layer;
  they mirror PEFT's ``utils/merge_utils.py`` applied to ΔW (not to A and B separately), and
  `truncated_svd` factors the result back to rank R.

Everything here is float32 or wider; callers check the result with `torch.isfinite`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def lora_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """The dense update ΔW = s · B · A of one LoRA layer ([out, in])."""
    return scale * (b.double() @ a.double())


def concat(factors: list[tuple[Tensor, Tensor, float]]) -> tuple[Tensor, Tensor]:
    """Exact low-rank sum: given (A_i, B_i, c_i) with c_i = w_i · s_i, return

        A' = [c_1 A_1; c_2 A_2; ...]   (Σ r_i × in, rows stacked)
        B' = [B_1, B_2, ...]           (out × Σ r_i, columns stacked)

    so that B' A' = Σ c_i B_i A_i exactly, negative weights included; rank Σ r_i."""
    a = torch.cat([c * fa.double() for fa, _, c in factors], dim=0)
    b = torch.cat([fb.double() for _, fb, _ in factors], dim=1)
    return a, b


def refactor(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``rank`` factors of M = B·A without forming M.

    With reduced QR decompositions B = Q_b R_b and Aᵀ = Q_a R_a (Q's orthonormal columns),
    M = Q_b (R_b R_aᵀ) Q_aᵀ, and the small core C = R_b R_aᵀ (at most Σr × Σr) has the same
    singular values as M. With C = U S Vᵀ:

        B' = Q_b U_k √S_k,   A' = √S_k (Q_a V_k)ᵀ,   k = min(rank, len(S))

    which is the truncated SVD of M (Eckart–Young optimal). The √S split keeps both factors
    at the same scale, so the result fine-tunes well. Factors are zero-padded to ``rank``.
    Returns (A' [rank, in], B' [out, rank], ‖M − B'A'‖², ‖M‖²); the errors are exact,
    read off the discarded singular values."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return _from_svd(qb @ u, s, vh @ qa.T, rank)


def truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``rank`` factors of a dense update M ([out, in]) by its SVD M = U S Vᵀ:
    B' = U_k √S_k, A' = √S_k V_kᵀ. Returns (A', B', ‖M − B'A'‖², ‖M‖²)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _from_svd(u, s, vh, rank)


def _from_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=u.dtype)
    a = torch.zeros(rank, vh.shape[1], dtype=vh.dtype)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    total = float((s * s).sum())
    err = float((s[k:] * s[k:]).sum())
    return a, b, err, total


# -- elementwise methods on a stack of dense updates [n, out, in] ---------------------


def _weighted(deltas: Tensor, weights: Tensor) -> Tensor:
    return deltas * weights.to(deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))


def trim_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density · numel)`` entries of largest magnitude, zero the rest
    (TIES step 1; PEFT ``magnitude_based_pruning``). The k-th largest magnitude is found with
    a selection (`kthvalue`), 5× faster than PEFT's `topk` on a SmolLM2 MLP layer; the two
    differ only when several entries tie exactly at the threshold (all of them are kept)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1), delta.numel() - k + 1).values
    return delta * (magnitude >= threshold)


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE (Yu et al. 2023): keep each entry with probability ``density`` and divide the
    survivors by ``density``, so the expected update is unchanged (PEFT ``random_pruning``)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def elect_sign(deltas: Tensor) -> Tensor:
    """TIES step 2: per entry, the sign of the sum over adapters (ties count as +); returns
    the mask of entries that agree with it."""
    sign = deltas.sign()
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return sign == majority


def disjoint_mean(weighted: Tensor, agree: Tensor) -> Tensor:
    """TIES step 3: per entry, the mean of the agreeing (weighted) values: Σ_i m_i x_i /
    max(1, Σ_i m_i)."""
    kept = (weighted * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1).to(weighted.dtype)


def magnitude_prune(deltas: Tensor, weights: Tensor, density: float, generator=None) -> Tensor:
    """Σ_i w_i · trim(ΔW_i, density)."""
    trimmed = torch.stack([trim_by_magnitude(d, density) for d in deltas])
    return _weighted(trimmed, weights).sum(dim=0)


def ties(deltas: Tensor, weights: Tensor, density: float, generator=None) -> Tensor:
    """TIES-merging (Yadav et al. 2023): T_i = trim(ΔW_i, density); γ = sign(Σ_i T_i);
    result = Σ_i [sign T_i = γ] w_i T_i / max(1, Σ_i [sign T_i = γ]). As PEFT, the sign is
    elected on the unweighted trimmed updates."""
    trimmed = torch.stack([trim_by_magnitude(d, density) for d in deltas])
    return disjoint_mean(_weighted(trimmed, weights), elect_sign(trimmed))


def dare_linear(deltas: Tensor, weights: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """Σ_i w_i · DARE(ΔW_i, density)."""
    dropped = torch.stack([drop_and_rescale(d, density, generator) for d in deltas])
    return _weighted(dropped, weights).sum(dim=0)


def dare_ties(deltas: Tensor, weights: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE drop-and-rescale, then TIES sign election and disjoint mean."""
    dropped = torch.stack([drop_and_rescale(d, density, generator) for d in deltas])
    return disjoint_mean(_weighted(dropped, weights), elect_sign(dropped))


ElementwiseMerge = Callable[[Tensor, Tensor, float, "torch.Generator | None"], Tensor]

ELEMENTWISE: dict[str, ElementwiseMerge] = {
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "magnitude_prune": magnitude_prune,
}
"""Merges that need each layer's dense updates, by method name."""


def factor_dense(delta: Tensor, rank: int, oversample: int = 10, iters: int = 4) -> tuple[Tensor, Tensor, float, float]:
    """Rank-``rank`` factors of a dense update, as `truncated_svd` returns them.

    A full SVD of every [out, in] layer dominates an elementwise merge, so when ``rank`` is
    well below min(out, in) a randomized range finder (Halko et al. 2011; ``torch.svd_lowrank``
    with ``rank + oversample`` columns and ``iters`` power iterations) takes its place. The
    error returned is the exact residual ‖M − B'A'‖², whichever path ran."""
    if 2 * (rank + oversample) >= min(delta.shape):
        return truncated_svd(delta, rank)
    m = delta.float()
    u, s, v = torch.svd_lowrank(m, q=rank + oversample, niter=iters)
    a, b, _, _ = _from_svd(u.double(), s.double(), v.T.double(), rank)
    residual = m - (b.float() @ a.float())
    return a, b, float(residual.double().square().sum()), float(m.double().square().sum())
