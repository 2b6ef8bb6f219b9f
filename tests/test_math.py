"""Pure math with hand-computed expectations: cosine, PCA, weighted-median splits, weights, merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit.conflict.compress import stride_compress
from merit.conflict.cosine import cosine_matrix
from merit.merge.operators import token_weighted, uniform
from merit.split.partition import (SplitInputs, pca_median, random_split, recursive_median_partition,
                                   token_weights, weighted_median_cut)
from merit.split.pca import pca_scores


def test_cosine_matrix_hand_computed():
    g = np.array([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]])
    c = cosine_matrix(g)
    s = 1 / np.sqrt(2)
    expected = np.array([[1, s, -1], [s, 1, -s], [-1, -s, 1]])
    np.testing.assert_allclose(c, expected, atol=1e-12)


def test_cosine_matrix_rejects_zero_gradient():
    with pytest.raises(ValueError, match="row"):
        cosine_matrix(np.array([[1.0, 2.0], [0.0, 0.0]]))


def test_pca_scores_match_numpy_svd_of_column_centred_matrix():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((7, 40))
    c = cosine_matrix(g)
    scores, ratio = pca_scores(c, 3)
    centred = c - c.mean(axis=0)
    u, s, vt = np.linalg.svd(centred)
    reference = centred @ vt[:3].T  # projections onto the top-3 principal axes
    # Equal up to the sign of each axis.
    for j in range(3):
        sign = np.sign(scores[:, j] @ reference[:, j])
        np.testing.assert_allclose(scores[:, j], sign * reference[:, j], atol=1e-10)
    np.testing.assert_allclose(ratio, s[:3] ** 2 / np.sum(s**2), atol=1e-12)
    assert np.all(np.diff(ratio) <= 0)


def test_pca_scores_are_deterministic_in_sign():
    c = cosine_matrix(np.random.default_rng(1).standard_normal((5, 9)))
    a, _ = pca_scores(c, 2)
    b, _ = pca_scores(c.copy(), 2)
    np.testing.assert_array_equal(a, b)


def test_weighted_median_cut_with_unequal_sample_counts():
    # Sorted by score: d(-3, w=1) a(-1, w=10) c(0.5, w=2) b(2, w=3); total 16, half 8.
    # Cut after d: 1; after a: 11; after c: 13 -> |1-8|=7, |11-8|=3, |13-8|=5 -> cut after a.
    scores = np.array([-1.0, 2.0, 0.5, -3.0])  # a b c d
    weights = np.array([10, 3, 2, 1])
    lo, hi = weighted_median_cut(scores, weights)
    assert lo.tolist() == [0, 3] and hi.tolist() == [1, 2]
    # An unweighted median would cut between a and c as well, but with weights 1,1,1,20 on a,b,c,d
    # (d lowest) the heavy source alone balances the rest: cut after d.
    lo, hi = weighted_median_cut(scores, np.array([1, 1, 1, 20]))
    assert lo.tolist() == [3] and hi.tolist() == [0, 1, 2]


def test_weighted_median_cut_keeps_min_side():
    lo, hi = weighted_median_cut(np.array([0.0, 1.0, 2.0, 3.0]), np.array([100, 1, 1, 1]), min_side=2)
    assert len(lo) == 2 and len(hi) == 2


def test_recursive_partition_uses_axis_per_level_and_subgroup_medians():
    # Axis 0 separates {0,1,2,3} (negative) from {4,5,6,7}; axis 1 then splits each half at its own median.
    scores = np.array([[-1, 5], [-2, 6], [-3, -5], [-4, -6], [1, 0.1], [2, 0.2], [3, -0.1], [4, -0.2]], float)
    groups = recursive_median_partition(scores, np.ones(8))
    assert groups == [[2, 3], [0, 1], [6, 7], [4, 5]]


@pytest.mark.parametrize("r", [1, 2, 3])
@pytest.mark.parametrize("method", [pca_median, random_split])
def test_groups_are_nonempty_disjoint_and_cover(r, method):
    rng = np.random.default_rng(r)
    t = 11
    c = cosine_matrix(rng.standard_normal((t, 30)))
    samples = rng.integers(1, 500, size=t)
    groups = method(SplitInputs(c, samples, samples * 20, r, seed=3))
    assert len(groups) == 2**r
    assert all(groups)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(t))


def test_too_few_sources_for_k_groups():
    with pytest.raises(ValueError, match="cannot form 8"):
        recursive_median_partition(np.zeros((7, 3)), np.ones(7))


def test_token_weights_sum_to_one_and_follow_budgets():
    w = token_weights(np.array([100, 300, 50, 50]), [[0, 2], [1, 3]])
    assert w == pytest.approx([150 / 500, 350 / 500])
    assert sum(w) == pytest.approx(1.0)


def test_token_weighted_merge_equals_weighted_sum():
    rng = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=rng) for _ in range(3)]
    w = [0.5, 0.3, 0.2]
    expected = 0.5 * tensors[0] + 0.3 * tensors[1] + 0.2 * tensors[2]
    torch.testing.assert_close(token_weighted(tensors, w), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(uniform(tensors, w), sum(tensors) / 3, rtol=0, atol=1e-6)


def test_stride_compress_keeps_every_sth_entry_across_tensors():
    a = torch.arange(7.0)  # global 0..6
    b = torch.arange(7.0, 12.0).reshape(1, 5)  # global 7..11
    out = stride_compress([a, b], stride=5)
    assert out.tolist() == [0.0, 5.0, 10.0]
    full = torch.cat([a, b.flatten()])
    assert torch.equal(stride_compress([a, b], stride=3), full[::3])
