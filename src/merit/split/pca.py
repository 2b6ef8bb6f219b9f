"""Column-centred PCA of the conflict matrix (pure numpy).

Each source's row of C (its similarity profile against all sources) is its feature vector. Columns
are mean-centred, C_c = U S Vᵀ, and the top-r scores are z = U_r S_r = C_c V_r (paper-notes §1.6).
"""

from __future__ import annotations

import numpy as np


def pca_scores(c: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``r`` principal-component scores (T, r) and the explained-variance ratio of each axis.

    Signs are fixed so that each axis's largest-magnitude loading is positive (as scikit-learn does):
    the same matrix always gives the same scores.
    """
    c = np.asarray(c, dtype=np.float64)
    centred = c - c.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    pivot = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), pivot])
    signs[signs == 0] = 1.0
    u, vt = u * signs, vt * signs[:, None]
    var = s**2
    ratio = var / var.sum() if var.sum() > 0 else np.zeros_like(var)
    return (u[:, :r] * s[:r]), ratio[:r]
