"""Merge operators (pure per-tensor math): hand-computed cases and equality with the PEFT kernels."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from merit import plugins
from merit.errors import ConfigError
from merit.merge.operators import (
    MergeOperator,
    dare,
    dare_ties,
    task_arithmetic,
    tensor_seed,
    ties,
    token_weighted,
    uniform,
)


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registry_has_every_operator_with_its_needs():
    assert {"token-weighted", "uniform", "task-arithmetic", "ties", "dare", "dare-ties"} <= set(plugins.names("merge"))
    for name in ("token-weighted", "uniform"):
        op = plugins.get("merge", name)
        assert isinstance(op, MergeOperator) and not op.needs_base and op.elementwise and op.linear
    for name in ("task-arithmetic", "ties", "dare", "dare-ties"):
        assert plugins.get("merge", name).needs_base
    assert not ties.elementwise and not dare.elementwise and dare.seeded and not ties.seeded


def test_token_weighted_hand_case():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    _exact(token_weighted([a, b], [0.25, 0.75]), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_token_weighted_computes_in_fp32_from_bf16():
    a = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    b = torch.tensor([2.0, 5.0], dtype=torch.bfloat16)
    out = token_weighted([a, b], [0.5, 0.5])
    assert out.dtype == torch.float32
    _exact(out, torch.tensor([1.5, 4.0]))


def test_uniform_ignores_weights():
    a, b, c = torch.tensor([3.0]), torch.tensor([6.0]), torch.tensor([9.0])
    _exact(uniform([a, b, c], [0.9, 0.05, 0.05]), torch.tensor([6.0]))
    _exact(uniform([a, b, c]), torch.tensor([6.0]))


def test_token_weighted_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="2 tensors but 3 weights"):
        token_weighted([torch.zeros(1), torch.zeros(1)], [0.2, 0.3, 0.5])


def test_task_arithmetic_hand_case():
    base = torch.tensor([1.0, 1.0])
    b1, b2 = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 5.0])  # τ = [2, 0], [0, 4]
    # θ(0) + λ Σ w τ = [1, 1] + 2 · [1, 2]
    _exact(task_arithmetic([b1, b2], [0.5, 0.5], base=base, lam=2.0), torch.tensor([3.0, 5.0]))
    # λ = 1 with weights summing to 1 is the weighted average of the branches.
    torch.testing.assert_close(task_arithmetic([b1, b2], [0.25, 0.75], base=base),
                               token_weighted([b1, b2], [0.25, 0.75]))


def test_operators_needing_base_refuse_without_it():
    with pytest.raises(ValueError, match="needs θ\\(0\\)"):
        ties([torch.zeros(2), torch.ones(2)], [0.5, 0.5])


# τ1..τ3 of a 4-entry tensor; density 0.5 keeps the top 2 |τ| entries of each.
TAUS = [torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-2.0, 4.0, 0.1, 1.0]), torch.tensor([1.0, -3.0, -0.2, -5.0])]


def test_ties_hand_case_equal_weights_is_the_papers_disjoint_mean():
    # trimmed: [3, 0, 0, 2], [-2, 4, 0, 0], [0, -3, 0, -5]
    # elected signs (sum of trimmed): +1 (1), +1 (1), + (0, nobody agrees), −1 (−3)
    # disjoint mean over agreeing entries: 3/1, 4/1, 0, −5/1
    base = torch.full((4,), 10.0)
    out = ties([base + t for t in TAUS], [1 / 3] * 3, base=base, density=0.5, lam=1.0)
    torch.testing.assert_close(out, base + torch.tensor([3.0, 4.0, 0.0, -5.0]))
    out = ties([base + t for t in TAUS], [1 / 3] * 3, base=base, density=0.5, lam=0.5)
    torch.testing.assert_close(out, base + 0.5 * torch.tensor([3.0, 4.0, 0.0, -5.0]))


def test_ties_hand_case_unequal_weights_scales_by_k_w():
    # kernel weights K·w = [1.5, 0.75, 0.75]; the election ignores weights (PEFT), the mean counts entries.
    base = torch.zeros(4)
    out = ties([base + t for t in TAUS], [0.5, 0.25, 0.25], base=base, density=0.5)
    torch.testing.assert_close(out, torch.tensor([1.5 * 3.0, 0.75 * 4.0, 0.0, 0.75 * -5.0]))


@pytest.mark.parametrize("shape,integer", [((7,), False), ((5, 6), False), ((3, 4, 5), False), ((40, 30), True)])
def test_ties_equals_peft_ties_kernel(shape, integer):
    # integer: task vectors in {-2..2}, so many magnitudes tie at the trim threshold and many sums are 0
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(-3, 4, shape, generator=gen).float() if integer else torch.randn(shape, generator=gen)
    noise = (lambda: torch.randint(-2, 3, shape, generator=gen).float()) if integer else (
        lambda: 0.1 * torch.randn(shape, generator=gen))
    branches = [base + noise() for _ in range(4)]
    if integer:
        assert any((b - base).abs().eq(1).sum() > 1 for b in branches)  # ties at a magnitude, exactly
    weights = [0.1, 0.2, 0.3, 0.4]
    ours = ties(branches, weights, base=base, density=0.4, lam=0.7)
    taus = [b - base for b in branches]
    theirs = merge_utils.ties(taus, torch.tensor([4 * w for w in weights]), 0.4, majority_sign_method="total")
    _exact(ours, base + 0.7 * theirs)


def test_dare_is_reproducible_from_its_seed_and_equals_peft_dare_linear():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(50, 40, generator=gen)
    branches = [base + torch.randn(50, 40, generator=gen) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    a = dare(branches, weights, base=base, density=0.3, seed=123)
    _exact(a, dare(branches, weights, base=base, density=0.3, seed=123))
    assert not torch.equal(a, dare(branches, weights, base=base, density=0.3, seed=124))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        theirs = merge_utils.dare_linear([b - base for b in branches], torch.tensor(weights), 0.3)
    _exact(a, base + theirs)


def test_dare_keeps_about_density_and_rescales():
    base = torch.zeros(200_000)
    branch = torch.ones(200_000)
    out = dare([branch, branch], [0.5, 0.5], base=base, density=0.25, seed=0)
    kept_by_one = ((out == 0.5 / 0.25) | (out == 1.0 / 0.25)).float().mean().item()
    assert 1 - 0.75 ** 2 == pytest.approx(kept_by_one, abs=0.01)  # each branch keeps 25%, independently
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased: E = Σ w τ
    no_rescale = dare([branch, branch], [0.5, 0.5], base=base, density=0.25, rescale=False, seed=0)
    _exact(no_rescale, out * 0.25)
    _exact(dare([branch, branch], [0.5, 0.5], base=base, density=1.0, seed=0), branch)


def test_dare_ties_equals_peft_dare_ties_kernel():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(30, 20, generator=gen)
    branches = [base + torch.randn(30, 20, generator=gen) for _ in range(4)]
    weights = [0.4, 0.3, 0.2, 0.1]
    ours = dare_ties(branches, weights, base=base, density=0.5, lam=1.5, seed=9)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        theirs = merge_utils.dare_ties([b - base for b in branches], torch.tensor([4 * w for w in weights]), 0.5)
    _exact(ours, base + 1.5 * theirs)


def test_tensor_seed_depends_on_name_and_run_seed_only():
    assert tensor_seed(0, "a.weight") == tensor_seed(0, "a.weight")
    assert len({tensor_seed(0, "a.weight"), tensor_seed(0, "b.weight"), tensor_seed(1, "a.weight")}) == 3
    assert 0 <= tensor_seed(7, "x") < 2**63


@pytest.mark.parametrize("op", [token_weighted, uniform, task_arithmetic])
def test_elementwise_operators_give_the_same_result_on_slices(op):
    # The engine relies on this to merge long tensors slice by slice.
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1000, generator=gen)
    branches = [torch.randn(1000, generator=gen) for _ in range(3)]
    kw = {"base": base} if op.needs_base else {}
    whole = op(branches, [0.2, 0.3, 0.5], **kw)
    parts = [op([b[i:i + 300] for b in branches], [0.2, 0.3, 0.5],
                **({"base": base[i:i + 300]} if op.needs_base else {})) for i in range(0, 1000, 300)]
    _exact(torch.cat(parts), whole)


def test_params_are_validated():
    assert ties.resolve_params({"density": 0.5}) == {"density": 0.5, "lam": 1.0}
    with pytest.raises(ConfigError, match="takes density, lam; got seed"):
        ties.resolve_params({"seed": 1})
    with pytest.raises(ConfigError, match="density: must be in \\(0, 1\\]"):
        dare.resolve_params({"density": 0.0})
    with pytest.raises(ConfigError, match="takes no parameters"):
        token_weighted.resolve_params({"lam": 2.0})
