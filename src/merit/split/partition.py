"""Partitioners: sources -> K = 2^r disjoint, non-empty groups (pure numpy).

``pca-median`` (the paper's Algorithm 1): recursive 50/50 splits along PCA axis 1, then axis 2, ...;
each split cuts a group at its **sample-weighted median** (weights s_t) along the current axis,
recomputed inside each subgroup. ``random``: the same recursive weighted-median cuts along random
scores, i.e. K sample-balanced random groups — the paper's random-split baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merit.registry import register
from merit.split.pca import pca_scores


@dataclass(frozen=True)
class SplitInputs:
    conflict: np.ndarray  # (T, T) cosine matrix
    samples: np.ndarray  # (T,) sample counts s_t
    tokens: np.ndarray  # (T,) token budgets n_t
    r: int
    seed: int


def weighted_median_cut(scores: np.ndarray, weights: np.ndarray, min_side: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Split items into (low, high) index arrays at the weighted median of ``scores``.

    Items are ordered by score (ties by index). The cut position k puts the first k items low; it is
    the k whose low-side weight is closest to half the total, i.e. the weighted median with the item
    that straddles it placed on the side that balances weight best (ties: the smaller k). Both sides
    keep at least ``min_side`` items, so later splits always have something to split.
    """
    n = len(scores)
    if n < 2 * min_side:
        raise ValueError(f"cannot split {n} items into two sides of at least {min_side}")
    order = np.lexsort((np.arange(n), np.asarray(scores)))
    cum = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    ks = np.arange(min_side, n - min_side + 1)
    k = ks[np.argmin(np.abs(cum[ks - 1] - cum[-1] / 2))]
    return np.sort(order[:k]), np.sort(order[k:])


def recursive_median_partition(scores: np.ndarray, weights: np.ndarray) -> list[list[int]]:
    """K = 2^r groups from (T, r) scores: level j splits every group along axis j at its own weighted median."""
    t, r = scores.shape
    if t < 2**r:
        raise ValueError(f"{t} sources cannot form {2 ** r} non-empty groups")
    groups = [np.arange(t)]
    for j in range(r):
        min_side = 2 ** (r - j - 1)  # each side must still split into 2^(levels left) groups
        nxt = []
        for g in groups:
            lo, hi = weighted_median_cut(scores[g, j], weights[g], min_side)
            nxt += [g[lo], g[hi]]
        groups = nxt
    return [sorted(int(i) for i in g) for g in groups]


@register("split", "pca-median")
def pca_median(x: SplitInputs) -> list[list[int]]:
    scores, _ = pca_scores(x.conflict, x.r)
    return recursive_median_partition(scores, x.samples)


@register("split", "random")
def random_split(x: SplitInputs) -> list[list[int]]:
    rng = np.random.default_rng(x.seed)
    scores = rng.standard_normal((len(x.samples), x.r))
    return recursive_median_partition(scores, x.samples)


def token_weights(tokens: np.ndarray, groups: list[list[int]]) -> list[float]:
    """w_k = N_k / Σ_j N_j with N_k the group's token budget (paper Step 5)."""
    n = np.array([float(np.sum(np.asarray(tokens)[g])) for g in groups])
    return (n / n.sum()).tolist()
