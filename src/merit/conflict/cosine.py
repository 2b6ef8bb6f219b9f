"""The T×T cosine conflict matrix, from scratch or extended by new sources (pure numpy).

Both paths compute C in float64 from unit rows, tile by tile on a fixed grid of ``tile`` × ``tile``
blocks (the last block zero-padded), so every entry comes out of a BLAS call of the same shape on the
same two rows whichever path computed it: ``extend_cosine(C[:T, :T], U[:T], G[T:])`` is bitwise equal to
``cosine_matrix(G)``. Adding m sources to T costs the rows of the tiles that hold new sources,
O((m + tile)·T·D), instead of O(T²·D).
"""

from __future__ import annotations

import math

import numpy as np

TILE = 64


def unit_rows(grads: np.ndarray) -> np.ndarray:
    """Rows of ``grads`` (T, D) scaled to unit length, in float64.

    Each norm is one dot product of that row alone, so a row's unit vector does not depend on which other
    rows were loaded with it.

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    g = np.array(grads, dtype=np.float64)  # a copy: scaled in place below
    if g.ndim != 2:
        raise ValueError(f"expected a (T, D) matrix of gradients, got shape {g.shape}")
    norms = np.array([math.sqrt(float(np.dot(row, row))) for row in g])
    if np.any(norms == 0):
        raise ValueError(f"zero gradient for row(s) {np.flatnonzero(norms == 0).tolist()}")
    g /= norms[:, None]
    return g


def _tile(unit: np.ndarray, start: int, tile: int) -> np.ndarray:
    """Rows start..start+tile of ``unit``, zero-padded to exactly ``tile`` rows: a fixed GEMM shape."""
    block = unit[start : start + tile]
    if len(block) == tile:
        return block
    padded = np.zeros((tile, unit.shape[1]))
    padded[: len(block)] = block
    return padded


def extend_cosine(c_old: np.ndarray, unit_old: np.ndarray, g_new: np.ndarray, *,
                  tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """C for the old sources plus new ones, reusing the old sources' cosines.

    Args:
        c_old: (T, T) cosine matrix of the old sources, as computed by this module.
        unit_old: (T, D) their unit rows (``unit_rows`` of their compressed gradients).
        g_new: (m, D) compressed gradients of the new sources (any scale).
        tile: the tile grid; must be the one ``c_old`` was computed with.

    Returns:
        The (T+m, T+m) matrix, old sources first, and the (T+m, D) unit rows to extend it again later.
    """
    c_old = np.asarray(c_old, dtype=np.float64)
    unit_old = np.asarray(unit_old, dtype=np.float64)
    unit_new = unit_rows(g_new)
    if len(c_old) != len(unit_old) or c_old.shape != (len(c_old), len(c_old)):
        raise ValueError(f"c_old {c_old.shape} does not match {len(unit_old)} old unit rows")
    if len(unit_old) and unit_old.shape[1] != unit_new.shape[1]:
        raise ValueError(f"old rows have {unit_old.shape[1]} dims, new rows {unit_new.shape[1]}")
    unit = np.vstack([unit_old, unit_new]) if len(unit_old) else unit_new
    t_old, t = len(unit_old), len(unit)
    c = np.empty((t, t))
    c[:t_old, :t_old] = c_old
    # Recompute every tile row that holds a new source (old entries in them come out identical).
    for i0 in range((t_old // tile) * tile, t, tile):
        a = _tile(unit, i0, tile)
        i1 = min(i0 + tile, t)
        for j0 in range(0, i0 + 1, tile):
            j1 = min(j0 + tile, t)
            block = (a @ a.T) if j0 == i0 else (a @ _tile(unit, j0, tile).T)  # (tile, tile)
            c[i0:i1, j0:j1] = block[: i1 - i0, : j1 - j0]
            c[j0:j1, i0:i1] = block[: i1 - i0, : j1 - j0].T
    np.clip(c, -1.0, 1.0, out=c)
    np.fill_diagonal(c, 1.0)
    return c, unit


def cosine_matrix(grads: np.ndarray, *, tile: int = TILE) -> np.ndarray:
    """C_ij = <g_i, g_j> / (|g_i| |g_j|) for the rows of ``grads`` (T, D); computed in float64.

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    return extend_cosine(np.zeros((0, 0)), np.zeros((0, 0)), grads, tile=tile)[0]
