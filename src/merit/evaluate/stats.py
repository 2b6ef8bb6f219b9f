"""Uncertainty of macro scores (pure): stratified bootstrap intervals and paired differences.

A macro score is the mean over sources of each source's mean item score. Its sampling noise comes
from the items, so the bootstrap resamples items *within* each source (stratified: every replicate
keeps each source and its size) and recomputes the macro mean. A paired difference between two
checkpoints scored on the same items resamples the same item indices for both, which cancels the
items' own difficulty and leaves the checkpoints' difference: much tighter than two separate
intervals. The difference of a checkpoint with itself is exactly 0 in every replicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """For a difference: the interval excludes 0 (a difference inside it is not resolved)."""
        return not (self.low <= 0.0 <= self.high)

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "ci": [self.low, self.high], "resolved": self.resolved}


def macro(items: Mapping[str, Sequence[float]]) -> float:
    """Mean over sources of each source's mean item score."""
    return float(np.mean([np.mean(v) for v in items.values()]))


def _replicates(items: Mapping[str, Sequence[float]], names: Sequence[str], draws: dict[str, np.ndarray]) -> np.ndarray:
    """Macro score of every bootstrap replicate, given each source's drawn item indices (replicates × n)."""
    return np.mean([np.asarray(items[n], dtype=np.float64)[draws[n]].mean(axis=1) for n in names], axis=0)


def _draws(items: Mapping[str, Sequence[float]], names: Sequence[str], replicates: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, len(items[n]), size=(replicates, len(items[n]))) for n in names}


def _check(items: Mapping[str, Sequence[float]], what: str) -> list[str]:
    names = list(items)
    if not names:
        raise ValueError(f"{what}: no sources")
    empty = [n for n in names if len(items[n]) == 0]
    if empty:
        raise ValueError(f"{what}: sources without items: {', '.join(empty)}")
    return names


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    return float(np.quantile(values, tail)), float(np.quantile(values, 1.0 - tail))


def macro_interval(items: Mapping[str, Sequence[float]], *, replicates: int = REPLICATES, level: float = LEVEL,
                   seed: int = 0) -> Interval:
    """The macro score and its percentile-bootstrap interval (items resampled within each source)."""
    names = _check(items, "macro_interval")
    low, high = _bounds(_replicates(items, names, _draws(items, names, replicates, seed)), level)
    return Interval(macro(items), low, high)


def paired_difference(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], *,
                      replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0) -> Interval:
    """macro(a) − macro(b) over the same items, with a paired bootstrap interval.

    ``a`` and ``b`` must score the same sources with the same number of items each, in the same
    order (item i of a source is the same example in both)."""
    names = _check(a, "paired_difference")
    if set(names) != set(b) or any(len(a[n]) != len(b[n]) for n in names):
        raise ValueError("paired_difference: both checkpoints must be scored on the same items of the same sources")
    draws = _draws(a, names, replicates, seed)
    diffs = _replicates(a, names, draws) - _replicates(b, names, draws)
    low, high = _bounds(diffs, level)
    return Interval(macro(a) - macro(b), low, high)
