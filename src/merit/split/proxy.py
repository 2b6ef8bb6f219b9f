"""The merge-gain proxy of a split, computed from the cosine matrix alone (pure numpy).

Paper §3 (Thm 3.1): merging K branches gains G_var = ½ Σ_ℓ λ_ℓ Var_w(u_ℓᵀ δ_k); to first order a branch
moves by δ_k ≈ −η ḡ_k, its group's mean gradient. With H replaced by the identity and each source's
gradient by its unit vector g̃_t (the cosine geometry the split is computed in, M = C), the gain is
(η²/2)·P with

    P = Σ_k w_k ‖ḡ_k − ḡ‖²,   ḡ_k = Σ_{t∈G_k} n_t g̃_t / N_k,   w_k = N_k / N,   ḡ = Σ_k w_k ḡ_k,

the token-weighted between-group dispersion of the unit gradients: n_t are token budgets, N_k = Σ_{t∈G_k} n_t
(the merge weights, and the weights a group's joint loss gives its sources). Everything is a quadratic
form in C:

    P = Σ_k n_{G_k}ᵀ C_{G_k G_k} n_{G_k} / (N_k N) − nᵀ C n / N².

Reduction to the paper's sign-vector form: for K = 2 balanced groups of T/2 sources with equal budgets,
ḡ_1 − ḡ_2 = (2/T) Σ_t s_t g̃_t with s ∈ {±1}^T, and Σ_k w_k ‖ḡ_k − ḡ‖² = w_1 w_2 ‖ḡ_1 − ḡ_2‖²
= ¼ · (4/T²) sᵀCs, so P = sᵀCs / T², i.e. G_var(s) = (η²/(2T²)) sᵀMs with M = C.

``share`` = P / (1 − ‖ḡ‖²) is the fraction of the total dispersion Σ_t (n_t/N) ‖g̃_t − ḡ‖² that lies
between groups (1 when every source is its own group); comparable across mixtures.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def merge_gain_proxy(conflict: np.ndarray, groups: list[list[int]], weights: np.ndarray) -> float:
    """P = Σ_k w_k ‖ḡ_k − ḡ‖² for index ``groups`` with per-source ``weights`` (token budgets)."""
    c = np.asarray(conflict, dtype=np.float64)
    a = np.asarray(weights, dtype=np.float64)
    total = a.sum()
    between = sum(float(a[g] @ c[np.ix_(g, g)] @ a[g]) / (a[g].sum() * total) for g in groups)
    return between - float(a @ c @ a) / total**2


def total_dispersion(conflict: np.ndarray, weights: np.ndarray) -> float:
    """Σ_t (n_t/N) ‖g̃_t − ḡ‖² = 1 − ‖ḡ‖²: the proxy's value when every source is its own group."""
    a = np.asarray(weights, dtype=np.float64)
    return 1.0 - float(a @ np.asarray(conflict, dtype=np.float64) @ a) / a.sum() ** 2


def proxy_share(conflict: np.ndarray, groups: list[list[int]], weights: np.ndarray) -> float:
    """P as a fraction of the total dispersion (0 when the mixture has none)."""
    tot = total_dispersion(conflict, weights)
    return merge_gain_proxy(conflict, groups, weights) / tot if tot > 1e-12 else 0.0


def compare(conflict: np.ndarray, weights: np.ndarray, candidates: dict[str, Callable[[], list[list[int]]]],
            random_draws: Callable[[int], list[list[int]]] | None = None, n_random: int = 32) -> list[dict]:
    """One row per candidate split: groups, proxy, share, and the ratio to the mean proxy of random splits.

    Args:
        conflict: (T, T) cosine matrix.
        weights: (T,) token budgets.
        candidates: name -> a function returning that method's index groups (a failure becomes the row's error).
        random_draws: seed -> one random split, averaged over ``n_random`` seeds as the reference row.
    """
    rows = []
    for name, make in candidates.items():
        try:
            groups = make()
        except Exception as e:  # noqa: BLE001 - one method failing must not hide the others
            rows.append({"method": name, "error": str(e)})
            continue
        rows.append({"method": name, "groups": groups, "proxy": merge_gain_proxy(conflict, groups, weights),
                     "share": proxy_share(conflict, groups, weights)})
    if random_draws is not None and n_random > 0:
        draws = [merge_gain_proxy(conflict, random_draws(s), weights) for s in range(n_random)]
        ref = float(np.mean(draws))
        rows.append({"method": f"random (mean of {n_random} seeds)", "groups": None, "proxy": ref,
                     "proxy_std": float(np.std(draws)), "share": ref / max(total_dispersion(conflict, weights), 1e-12)})
        for r in rows:
            if "proxy" in r:
                r["vs_random"] = r["proxy"] / ref if ref > 0 else float("nan")
    return rows
