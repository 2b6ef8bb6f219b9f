"""Merge operators: pure functions of one parameter tensor across K branches.

Signature: ``op(tensors, weights) -> tensor`` where ``tensors`` are the K branches' values of one
parameter and ``weights`` the plan's token weights (summing to 1). Arithmetic is in fp32; the caller
casts the result back to the checkpoint's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merit.registry import register


@register("merge", "token-weighted")
def token_weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ_j N_j (the paper's Step 5)."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.float(), alpha=float(w))
    return out


@register("merge", "uniform")
def uniform(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """θ̄ = (1/K) Σ_k θ_k: the uniform soup, ignoring token budgets."""
    k = len(tensors)
    return token_weighted(tensors, [1.0 / k] * k)
