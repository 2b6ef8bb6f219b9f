"""Partitioners: sources -> K disjoint, non-empty groups (pure numpy), registered as kind ``"split"``.

- ``pca-median`` (the paper's Algorithm 1): recursive 50/50 splits along PCA axis 1, then axis 2, ...;
  each split cuts a group at its **sample-weighted median** (weights s_t) along the current axis,
  recomputed inside each subgroup. K = 2^r.
- ``pca-median-tokens``: the same with token weights n_t (the poster's and project page's wording).
- ``kmeans``: seeded k-means++ / Lloyd on the rows of C (each source's similarity profile, the
  representation PCA reads), K = 2^r clusters; groups need not be balanced.
- ``random``: the recursive weighted-median cuts along random scores, i.e. K sample-balanced random
  groups — the paper's random-split baseline.
- ``manual``: the groups listed in ``split.groups``.
- ``pca-median-raw``: ``pca-median`` on the raw Gram matrix K = G Gᵀ of the stored (unnormalised)
  gradient vectors instead of their cosines (the paper's Table 20 ablation): sources with large
  gradients dominate the axes.
- ``conflict-greedy`` (K = 2, the paper's conflict-induced baseline, A.1.3): the most conflicting pair
  (lowest cosine) seeds the two groups; then, one at a time, the unassigned source with the clearest
  preference joins a group by ``split.greedy_rule``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from merit.errors import ConfigError
from merit.registry import register
from merit.split.pca import pca_scores


@dataclass(frozen=True)
class SplitInputs:
    conflict: np.ndarray  # (T, T) cosine matrix
    samples: np.ndarray  # (T,) sample counts s_t
    tokens: np.ndarray  # (T,) token budgets n_t
    r: int
    seed: int
    names: list[str] | None = None  # (T,) source names, needed by ``manual``
    groups: list[list[str]] | None = None  # ``split.groups`` for ``manual``
    gram: np.ndarray | None = None  # (T, T) G Gᵀ of the stored vectors, for ``pca-median-raw``
    greedy_rule: str = "separate"  # ``split.greedy_rule`` for ``conflict-greedy``


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
    """The paper's MERIT split: PCA of the cosine conflict matrix, recursive sample-weighted median splits on the top r axes."""
    scores, _ = pca_scores(x.conflict, x.r)
    return recursive_median_partition(scores, x.samples)


@register("split", "pca-median-tokens")
def pca_median_tokens(x: SplitInputs) -> list[list[int]]:
    """As pca-median, but the medians weigh sources by tokens instead of samples."""
    scores, _ = pca_scores(x.conflict, x.r)
    return recursive_median_partition(scores, x.tokens)


@register("split", "pca-median-raw")
def pca_median_raw(x: SplitInputs) -> list[list[int]]:
    """As pca-median, on the raw-gradient Gram matrix G Gᵀ instead of cosines (the paper's Table 20)."""
    if x.gram is None or not np.all(np.isfinite(x.gram)):
        raise ConfigError("split.method=pca-median-raw needs the stored gradient norms (grads/manifest.json); "
                          "rerun the grads stage")
    scores, _ = pca_scores(x.gram, x.r)
    return recursive_median_partition(scores, x.samples)


def conflict_greedy_groups(conflict: np.ndarray, rule: str = "separate") -> list[list[int]]:
    """Two groups from C: seeds are the most conflicting pair; each step assigns the unassigned source
    whose mean cosine to the two groups differs most, to the group with the higher mean (``separate``)
    or the lower one (``literal``). Ties go to the smaller index and to group 0."""
    c = np.asarray(conflict, dtype=np.float64)
    t = len(c)
    if t < 2:
        raise ValueError(f"{t} source(s) cannot form 2 groups")
    off = c + np.diag(np.full(t, np.inf))
    i, j = np.unravel_index(int(np.argmin(off)), off.shape)
    groups = [[int(min(i, j))], [int(max(i, j))]]
    left = [s for s in range(t) if s not in (i, j)]
    while left:
        mean = np.array([[c[s, g].mean() for g in groups] for s in left])  # (left, 2)
        margin = mean[:, 0] - mean[:, 1]
        pick = int(np.argmax(np.abs(margin)))  # first index on ties (argmax)
        prefers_0 = margin[pick] >= 0
        to = 0 if prefers_0 == (rule == "separate") else 1
        groups[to].append(left.pop(pick))
    return [sorted(g) for g in groups]


@register("split", "conflict-greedy")
def conflict_greedy(x: SplitInputs) -> list[list[int]]:
    """K = 2: seed the groups with the most conflicting pair, add the rest greedily (split.greedy_rule)."""
    if x.r != 1:
        raise ConfigError(f"split.method=conflict-greedy makes K = 2 groups; set split.r: 1 (got {x.r})")
    return conflict_greedy_groups(x.conflict, x.greedy_rule)


@register("split", "random")
def random_split(x: SplitInputs) -> list[list[int]]:
    """The random baseline: the same sample-weighted median splits on seeded random scores."""
    rng = np.random.default_rng(x.seed)
    scores = rng.standard_normal((len(x.samples), x.r))
    return recursive_median_partition(scores, x.samples)


def kmeans_labels(points: np.ndarray, k: int, seed: int, n_init: int = 10, max_iter: int = 100) -> np.ndarray:
    """Cluster labels (T,) of the rows of ``points`` (T, F): best of ``n_init`` seeded k-means++ + Lloyd runs.

    No cluster is ever empty: an emptied cluster takes the point farthest from its centre among clusters
    with more than one point. Deterministic for a given seed.
    """
    x = np.asarray(points, dtype=np.float64)
    t = len(x)
    if not 1 <= k <= t:
        raise ValueError(f"{t} sources cannot form {k} non-empty clusters")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [int(rng.integers(t))]
        d2 = np.sum((x - x[centres[0]]) ** 2, axis=1)
        while len(centres) < k:  # k-means++: next centre with probability ∝ squared distance
            free = np.setdiff1d(np.arange(t), centres)
            p = d2[free] if d2[free].sum() > 0 else np.ones(len(free))
            centres.append(int(rng.choice(free, p=p / p.sum())))
            d2 = np.minimum(d2, np.sum((x - x[centres[-1]]) ** 2, axis=1))
        c = x[centres].copy()
        labels = np.full(t, -1)
        for _ in range(max_iter):
            dist = np.sum((x[:, None, :] - c[None, :, :]) ** 2, axis=2)  # (T, K)
            new = np.argmin(dist, axis=1)
            for j in range(k):
                if not np.any(new == j):
                    sizes = np.bincount(new, minlength=k)
                    own = dist[np.arange(t), new]
                    own[sizes[new] <= 1] = -1.0
                    new[int(np.argmax(own))] = j
            if np.array_equal(new, labels):
                break
            labels = new
            c = np.stack([x[labels == j].mean(axis=0) for j in range(k)])
        inertia = float(np.sum((x - c[labels]) ** 2))
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels.copy(), inertia
    return best


def _groups_from_labels(labels: np.ndarray, k: int) -> list[list[int]]:
    groups = [sorted(int(i) for i in np.flatnonzero(labels == j)) for j in range(k)]
    return sorted(groups, key=lambda g: g[0])  # a canonical order: by first source


@register("split", "kmeans")
def kmeans_split(x: SplitInputs) -> list[list[int]]:
    """k-means (K = 2^r) on the rows of the conflict matrix (the paper's Table 10)."""
    k = 2**x.r
    return _groups_from_labels(kmeans_labels(x.conflict, k, x.seed), k)


def validate_manual_groups(groups: list[list[str]] | None, names: list[str]) -> list[list[int]]:
    """Index groups for ``split.groups``; a ConfigError unless every source appears exactly once.

    Raises:
        ConfigError: no groups, an empty group, an unknown name, a repeated name or a missing source.
    """
    if not groups:
        raise ConfigError("split.groups: split.method=manual needs the groups as lists of source names")
    pos = {n: i for i, n in enumerate(names)}
    listed = [n for g in groups for n in g]
    problems = []
    unknown = [n for n in listed if n not in pos]
    if unknown:
        problems.append(f"unknown source(s) {', '.join(unknown)} (known: {', '.join(names)})")
    dup = sorted({n for n in listed if listed.count(n) > 1})
    if dup:
        problems.append(f"listed more than once: {', '.join(dup)}")
    missing = [n for n in names if n not in set(listed)]
    if missing:
        problems.append(f"missing from every group: {', '.join(missing)}")
    if any(not g for g in groups):
        problems.append("every group needs at least one source")
    if problems:
        raise ConfigError("split.groups: " + "; ".join(problems))
    return [sorted(pos[n] for n in g) for g in groups]


@register("split", "manual")
def manual_split(x: SplitInputs) -> list[list[int]]:
    """The groups named in split.groups, as given."""
    if x.names is None:
        raise ValueError("manual split needs the source names")
    return validate_manual_groups(x.groups, list(x.names))


def token_weights(tokens: np.ndarray, groups: list[list[int]]) -> list[float]:
    """w_k = N_k / Σ_j N_j with N_k the group's token budget (paper Step 5)."""
    n = np.array([float(np.sum(np.asarray(tokens)[g])) for g in groups])
    return (n / n.sum()).tolist()
