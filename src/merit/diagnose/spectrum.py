"""The math of the Hessian–PCA alignment check (paper Table 21, App. F.3): pure numpy, no model.

Does the direction along which datasets conflict (the PCA of the conflict matrix, lifted to parameter
space) line up with the directions of highest curvature at θ(0)? The paper's protocol:

1. double-centre the T×T cosine matrix and embed the tasks on its top-2 eigenvectors;
2. in each sign quadrant of (PC1, PC2) take the task farthest from the origin (≤ 4 tasks);
3. lift: the top eigenvectors of those tasks' gradient Gram matrix, as combinations of the gradients;
4. the Hessian's top eigenvectors by Lanczos with full reorthogonalisation;
5. |cos| between the two sets, the leading principal angle, and a z-score against random directions.

Vectors are flat arrays of the trainable parameters. Lanczos keeps its basis in a caller-given array
(a memory map on disk for a real model: ``(iterations + 1) × d`` float32, which is 27 GB for 50
iterations of a 135M model, never in RAM at once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------- choosing the tasks


def double_centred_embedding(cosine: np.ndarray, dims: int = 2) -> np.ndarray:
    """(T, dims) classical-MDS coordinates: the top eigenvectors of J C J, scaled by √λ (λ < 0 → 0)."""
    c = np.asarray(cosine, dtype=np.float64)
    t = c.shape[0]
    j = np.eye(t) - np.full((t, t), 1.0 / t)
    b = j @ c @ j
    b = (b + b.T) / 2
    vals, vecs = np.linalg.eigh(b)
    order = np.argsort(vals)[::-1][:dims]
    vecs = vecs[:, order]
    # The sign of an eigenvector is arbitrary; fix it (largest-magnitude entry positive) so the quadrant
    # a task falls in, and so the tasks picked, do not depend on the LAPACK build.
    pivot = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs * np.sqrt(np.clip(vals[order], 0.0, None))


def quadrant_extremes(embedding: np.ndarray) -> list[int]:
    """In each sign quadrant of the first two coordinates (++, −+, −−, +−), the index of the point
    farthest from the origin; an empty quadrant contributes nothing (so 1 to 4 indices, in that order)."""
    e = np.asarray(embedding, dtype=np.float64)[:, :2]
    radius = np.linalg.norm(e, axis=1)
    picked = []
    for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1)):
        inside = [i for i in range(len(e)) if (e[i, 0] >= 0) == (sx > 0) and (e[i, 1] >= 0) == (sy > 0)]
        if inside:
            picked.append(max(inside, key=lambda i: (radius[i], -i)))
    return picked


# ------------------------------------------------------------------------------------------ lifting


def lifted_directions(gradients: np.ndarray, top: int, centred: bool = False) -> np.ndarray:
    """(top, d) orthonormal directions: the leading eigenvectors of the Gram matrix of the unit-norm
    ``gradients`` (n, d), lifted to R^d as combinations of the gradients (the left singular vectors of
    Gᵀ). ``centred``: of the gradients minus their mean first (the directions along which they differ,
    not the one they share); rank ≤ n − 1 then. Directions with a zero eigenvalue are dropped."""
    g = np.asarray(gradients, dtype=np.float64)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    if centred:
        g = g - g.mean(axis=0, keepdims=True)
    gram = g @ g.T
    vals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    order = [i for i in np.argsort(vals)[::-1] if vals[i] > 1e-12 * max(vals.max(), 1e-300)][:top]
    dirs = (vecs[:, order].T @ g) / np.sqrt(vals[order])[:, None]
    return dirs


# ------------------------------------------------------------------------------------------ Lanczos


@dataclass
class Lanczos:
    values: np.ndarray  # (top,) Ritz values, largest first
    vectors: np.ndarray  # (top, d) Ritz vectors, unit norm
    residuals: np.ndarray  # (top,) |β_m s_{m,i}| = ‖H y_i − θ_i y_i‖ in exact arithmetic
    iterations: int  # performed (fewer than asked when an invariant subspace was found)


def lanczos(matvec: Callable[[np.ndarray], np.ndarray], start: np.ndarray, iterations: int, top: int,
            basis: np.ndarray | None = None, chunk: int = 1 << 22) -> Lanczos:
    """The ``top`` largest eigenpairs of a symmetric operator by ``iterations`` Lanczos steps with full
    reorthogonalisation (each new vector is orthogonalised against the whole basis, twice: classical
    Gram–Schmidt repeated, which is enough in floating point), from ``start``.

    ``basis``: an (iterations + 1, d) array to hold the Krylov basis (a float32 memory map for a large d);
    float64 in memory by default. It is read ``chunk`` columns at a time, so RAM beyond it is a few
    float64 d-vectors. One matvec per iteration; everything else is O(iterations · d) per step. The Ritz
    vectors come back in the basis's dtype.
    """
    v = np.asarray(start, dtype=np.float64)
    d = v.shape[0]
    if basis is None:
        basis = np.zeros((iterations + 1, d))
    cols = [slice(c, min(c + chunk, d)) for c in range(0, d, chunk)]
    basis[0] = v / np.linalg.norm(v)
    alphas, betas = [], []
    m = 0
    for j in range(iterations):
        q = np.asarray(basis[j], dtype=np.float64)
        w = np.asarray(matvec(q), dtype=np.float64)
        alphas.append(float(q @ w))
        m = j + 1
        for _ in range(2):  # full reorthogonalisation against q_0 … q_j (includes the three-term recurrence)
            coeffs = sum(np.asarray(basis[: j + 1, c], dtype=np.float64) @ w[c] for c in cols)
            for c in cols:
                w[c] -= coeffs @ np.asarray(basis[: j + 1, c], dtype=np.float64)
        beta = float(np.linalg.norm(w))
        betas.append(beta)
        if j == iterations - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break  # the last step, or an invariant subspace: T's eigenpairs are exact ones
        basis[j + 1] = w / beta
    t = np.diag(alphas) + np.diag(betas[: m - 1], 1) + np.diag(betas[: m - 1], -1)
    vals, s = np.linalg.eigh(t)
    order = np.argsort(vals)[::-1][: min(top, m)]
    vectors = np.empty((len(order), d), dtype=basis.dtype)
    for c in cols:
        vectors[:, c] = s[:, order].T @ np.asarray(basis[:m, c], dtype=np.float64)
    vectors /= np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True).astype(vectors.dtype)
    residuals = np.abs(betas[m - 1] * s[m - 1, order])
    return Lanczos(vals[order], vectors, residuals, m)


def central_difference_hvp(gradient_at: Callable[[np.ndarray], np.ndarray], vector: np.ndarray,
                           epsilon: float) -> np.ndarray:
    """H·v ≈ (∇L(θ + εv̂) − ∇L(θ − εv̂)) / (2ε) · ‖v‖ with v̂ = v/‖v‖ (the paper's fp32 HVPs, ε = 0.1):
    exact for a quadratic loss, error O(ε²) otherwise. ``gradient_at(offset)`` is ∇L at θ + offset."""
    norm = float(np.linalg.norm(vector))
    if norm == 0:
        return np.zeros_like(vector, dtype=np.float64)
    unit = vector / norm
    plus = np.asarray(gradient_at(epsilon * unit), dtype=np.float64)
    minus = np.asarray(gradient_at(-epsilon * unit), dtype=np.float64)
    return (plus - minus) / (2 * epsilon) * norm


# ---------------------------------------------------------------------------------------- alignment


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) cosines between every row of ``a`` and every row of ``b`` (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T


def abs_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cos| between every row of ``a`` and every row of ``b`` (an eigenvector's sign is arbitrary)."""
    return np.abs(cosines(a, b))


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, smallest first) between span(rows of a) and span(rows of b)."""
    qa, _ = np.linalg.qr(np.asarray(a, dtype=np.float64).T)
    qb, _ = np.linalg.qr(np.asarray(b, dtype=np.float64).T)
    s = np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1.0, 1.0)
    return np.degrees(np.arccos(s))


def random_top1_baseline(dim: int, eigenvectors: int, draws: int = 200_000, seed: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of max_i |cos(u, v_i)| for u uniform on the sphere of R^dim and
    ``eigenvectors`` fixed orthonormal v_i. For eigenvectors ≪ dim the cosines are i.i.d. N(0, 1/dim), so
    this is E/SD of the largest of that many |N(0, 1)|, over √dim (Monte Carlo with a fixed seed)."""
    z = np.abs(np.random.default_rng(seed).standard_normal((draws, eigenvectors))).max(axis=1)
    return float(z.mean() / np.sqrt(dim)), float(z.std() / np.sqrt(dim))


def alignment(directions: np.ndarray, eigenvectors: np.ndarray, dim: int) -> dict:
    """Table 21's numbers for one set of directions against the Hessian's eigenvectors.

    z: (mean top-1 |cos| − its mean for random directions) / its standard deviation for a mean over as
    many random directions (SD / √n); the paper does not define its z, and this is the reading we use.
    """
    cos = abs_cosines(directions, eigenvectors)
    top1 = cos.max(axis=1)
    mu, sd = random_top1_baseline(dim, eigenvectors.shape[0])
    return {"max_abs_cos": float(cos.max()), "mean_top1_abs_cos": float(top1.mean()),
            "top1_abs_cos": top1.tolist(), "abs_cos": cos.tolist(),
            "leading_principal_angle_deg": float(principal_angles_deg(directions, eigenvectors)[0]),
            "random_mean_top1_abs_cos": mu,
            "z_vs_random": float((top1.mean() - mu) / (sd / np.sqrt(len(top1)))) if sd > 0 else None}
