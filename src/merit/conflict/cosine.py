"""The T×T cosine conflict matrix, from scratch or extended by new sources (pure numpy).

The rows come from a ``Rows`` reader that hands out one row's columns ``start:stop`` at a time, so C
is computed in bounded memory whatever the rows' length D: O(T × ``COLUMN_CHUNK``) for the current
column chunk plus O(T²) for C, never a (T, D) matrix. An in-memory array is read the same way
(``array_rows``): there is one algorithm.

1. Row norms, in float64, each summed over the row's column chunks in order (a row's norm depends on
   that row alone, not on which other rows are read with it).
2. For every column chunk in order: the chunk of every row, scaled by its norm (float64), and the block
   products on a fixed grid of ``tile`` × ``tile`` row tiles (the last tile zero-padded, a diagonal
   block as ``a @ a.T``), each added to its block's running sum.

Every entry of C thus comes out of the same sequence of BLAS calls, of the same shapes, on the same
rows, whichever path computed it: extending a cached C by new sources (recomputing only the tile rows
that hold new sources, O((m + tile)·T·D) work instead of O(T²·D)) is bitwise equal to computing it from
scratch in the same row order, as long as ``tile`` and ``chunk`` are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TILE = 64
# Columns read per step: 64 tiles' worth of rows × 2^16 float64 columns is ~32 MB per 64 sources.
COLUMN_CHUNK = 1 << 16


@dataclass(frozen=True)
class Rows:
    """``count`` row vectors of length ``dim``, read a column range at a time.

    ``read(i, start, stop)`` returns columns ``start:stop`` of row i as a 1-D float32 or float64 array
    (converted to float64 on use). It is called in a fixed order and must return the same values every
    time for the same arguments.
    """

    count: int
    dim: int
    read: Callable[[int, int, int], np.ndarray]


def array_rows(grads: np.ndarray) -> Rows:
    """A ``Rows`` reader over the rows of an in-memory (T, D) array."""
    g = np.asarray(grads)
    if g.ndim != 2:
        raise ValueError(f"expected a (T, D) matrix of gradients, got shape {g.shape}")
    return Rows(g.shape[0], g.shape[1], lambda i, start, stop: g[i, start:stop])


def _column_chunks(dim: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, dim)) for a in range(0, dim, chunk)]


def row_norms(rows: Rows, *, chunk: int = COLUMN_CHUNK) -> np.ndarray:
    """(T,) float64 Euclidean norms, each a sum of its row's chunk dot products in column order.

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    norms = np.empty(rows.count)
    for i in range(rows.count):
        squares = 0.0
        for a, b in _column_chunks(rows.dim, chunk):
            x = np.asarray(rows.read(i, a, b), dtype=np.float64)
            squares += float(np.dot(x, x))
        norms[i] = math.sqrt(squares)
    if np.any(norms == 0):
        raise ValueError(f"zero gradient for row(s) {np.flatnonzero(norms == 0).tolist()}")
    return norms


def streamed_cosine(rows: Rows, *, c_old: np.ndarray | None = None, norms: np.ndarray | None = None,
                    tile: int = TILE, chunk: int = COLUMN_CHUNK) -> np.ndarray:
    """C_ij = <g_i, g_j> / (|g_i| |g_j|) for all rows, reusing the cosines of the first ones when given.

    Args:
        rows: the T row vectors, old sources first.
        c_old: (T_old, T_old) cosine matrix of rows 0..T_old-1, as computed by this module with the same
            ``tile`` and ``chunk``; only the tile rows from T_old's tile on are computed. None: from scratch.
        norms: (T,) row norms when the caller has them (``row_norms``); otherwise computed here.
        tile, chunk: the row tile grid and the column chunk (fixed: the bits of C depend on them).

    Returns:
        The (T, T) float64 matrix, clipped to [-1, 1], with ones on the diagonal.

    Raises:
        ValueError: a row is all zeros, or ``c_old`` does not fit ``rows``.
    """
    t = rows.count
    c_old = np.zeros((0, 0)) if c_old is None else np.asarray(c_old, dtype=np.float64)
    t_old = len(c_old)
    if c_old.shape != (t_old, t_old) or t_old > t:
        raise ValueError(f"c_old {c_old.shape} does not fit {t} rows")
    norms = row_norms(rows, chunk=chunk) if norms is None else np.asarray(norms, dtype=np.float64)
    if norms.shape != (t,):
        raise ValueError(f"{norms.shape[0]} norms for {t} rows")
    first = (t_old // tile) * tile  # the first tile row that holds a new source (recomputed whole)
    t_pad = -(-t // tile) * tile
    gram = np.zeros((t_pad, t_pad))  # running block sums; only blocks (i0 ≥ first, j0 ≤ i0) are used
    if first < t:
        for a, b in _column_chunks(rows.dim, chunk):
            unit = np.zeros((t_pad, b - a))  # (T padded to the tile grid, chunk): rows ≥ T stay zero
            for i in range(t):  # every row: tile rows ≥ first meet every column tile up to their own
                unit[i] = rows.read(i, a, b)
                unit[i] /= norms[i]
            for i0 in range(first, t, tile):
                x = unit[i0 : i0 + tile]
                for j0 in range(0, i0 + 1, tile):
                    gram[i0 : i0 + tile, j0 : j0 + tile] += (x @ x.T) if j0 == i0 else (x @ unit[j0 : j0 + tile].T)
    c = np.empty((t, t))
    c[:t_old, :t_old] = c_old
    for i0 in range(first, t, tile):
        i1 = min(i0 + tile, t)
        for j0 in range(0, i0 + 1, tile):
            j1 = min(j0 + tile, t)
            c[i0:i1, j0:j1] = gram[i0:i1, j0:j1]
            c[j0:j1, i0:i1] = gram[i0:i1, j0:j1].T
    np.clip(c, -1.0, 1.0, out=c)
    np.fill_diagonal(c, 1.0)
    return c


def unit_rows(grads: np.ndarray, *, chunk: int = COLUMN_CHUNK) -> np.ndarray:
    """Rows of ``grads`` (T, D) scaled to unit length, in float64 (norms as ``row_norms``).

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    g = np.array(grads, dtype=np.float64)  # a copy: scaled in place below
    g /= row_norms(array_rows(g), chunk=chunk)[:, None]
    return g


def extend_cosine(c_old: np.ndarray, unit_old: np.ndarray, g_new: np.ndarray, *,
                  tile: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """C for the old sources plus new ones, reusing the old sources' cosines (in-memory rows).

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
    new = array_rows(g_new)
    norms_new = row_norms(new)
    if len(c_old) != len(unit_old) or c_old.shape != (len(c_old), len(c_old)):
        raise ValueError(f"c_old {c_old.shape} does not match {len(unit_old)} old unit rows")
    if len(unit_old) and unit_old.shape[1] != new.dim:
        raise ValueError(f"old rows have {unit_old.shape[1]} dims, new rows {new.dim}")
    t_old = len(unit_old)

    def read(i: int, start: int, stop: int) -> np.ndarray:
        return unit_old[i, start:stop] if i < t_old else new.read(i - t_old, start, stop)

    # Old rows are already unit rows: a norm of exactly 1 leaves them bit for bit as a from-scratch
    # computation scales them.
    norms = np.concatenate([np.ones(t_old), norms_new])
    c = streamed_cosine(Rows(t_old + new.count, new.dim, read), c_old=c_old, norms=norms, tile=tile)
    unit_new = np.array(g_new, dtype=np.float64) / norms_new[:, None]
    return c, (np.vstack([unit_old, unit_new]) if t_old else unit_new)


def cosine_matrix(grads: np.ndarray, *, tile: int = TILE, chunk: int = COLUMN_CHUNK) -> np.ndarray:
    """C_ij = <g_i, g_j> / (|g_i| |g_j|) for the rows of ``grads`` (T, D); computed in float64.

    Raises:
        ValueError: a row is all zeros (its direction is undefined).
    """
    return streamed_cosine(array_rows(grads), tile=tile, chunk=chunk)


def residual_gram(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """⟨g_i − ḡ, g_j − ḡ⟩ with ḡ = Σ_j p_j g_j, p = weights / Σ weights, from the Gram matrix alone.

    ⟨g_i − ḡ, g_j − ḡ⟩ = G_ij − (Gp)_i − (Gp)_j + pᵀGp: no gradient is read again. With sample weights,
    ḡ is the mixture's mean gradient (what joint training follows), and the residuals are what each
    source adds to it; they satisfy Σ_i p_i (g_i − ḡ) = 0.
    """
    g = np.asarray(gram, dtype=np.float64)
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    gp = g @ p
    return g - gp[:, None] - gp[None, :] + float(p @ gp)


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """The cosine matrix of the vectors whose Gram matrix is ``gram`` (a zero vector: cosine 0, diagonal 1)."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    safe = np.where(norms > 0, norms, 1.0)
    c = g / np.outer(safe, safe)
    c[norms == 0, :] = 0.0
    c[:, norms == 0] = 0.0
    c = np.clip((c + c.T) / 2, -1.0, 1.0)
    np.fill_diagonal(c, 1.0)
    return c
