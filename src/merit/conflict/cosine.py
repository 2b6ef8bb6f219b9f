"""The T×T cosine conflict matrix (pure numpy)."""

from __future__ import annotations

import numpy as np


def cosine_matrix(grads: np.ndarray) -> np.ndarray:
    """C_ij = <g_i, g_j> / (|g_i| |g_j|) for the rows of ``grads`` (T, D); computed in float64.

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    g = np.asarray(grads, dtype=np.float64)
    norms = np.linalg.norm(g, axis=1)
    if np.any(norms == 0):
        raise ValueError(f"zero gradient for row(s) {np.flatnonzero(norms == 0).tolist()}")
    unit = g / norms[:, None]
    c = unit @ unit.T
    np.clip(c, -1.0, 1.0, out=c)
    np.fill_diagonal(c, 1.0)
    return c
