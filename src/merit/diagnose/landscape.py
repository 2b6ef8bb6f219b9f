"""Pure math of the loss landscape around a merge: tensors and numbers in, tensors and numbers out.

No file IO, no model loading: ``merit.diagnose.cli`` reads the run folder and calls these functions
tensor by tensor (one tensor name of K checkpoints at a time, never K whole models).

Notation (MERIT, paper §3): θ(0) the shared start, θ_k the branches, w_k their token weights (Σ w_k = 1),
δ_k = θ_k − θ(0), θ̄ = Σ_k w_k θ_k the merge, so δ̄ = θ̄ − θ(0) = Σ_k w_k δ_k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# ------------------------------------------------------------------------------- linear mode connectivity


def alpha_grid(points: int) -> list[float]:
    """``points`` evenly spaced α in [0, 1], both ends included (21 → steps of 0.05, as the paper's Table 5).

    Fewer than 3 points cannot show a barrier (the two ends define the chord), hence the ValueError.
    """
    if points < 3:
        raise ValueError(f"an α grid needs at least 3 points (the two ends and one between), got {points}")
    return [i / (points - 1) for i in range(points)]


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 − α)·a + α·b in float32 (or float64 if an input is), in the dtype of ``a``.

    Written as the two-term sum rather than ``torch.lerp`` (a + α(b − a)) so that α = 0 gives exactly a and
    α = 1 exactly b: the curve's ends are then bit-identical to the checkpoints themselves.
    """
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return ((1.0 - alpha) * a.to(wide) + alpha * b.to(wide)).to(a.dtype)


@dataclass(frozen=True)
class Barrier:
    height: float  # max_α [L(α) − ((1 − α) L(0) + α L(1))] ≥ 0 (the ends count, where the excess is 0)
    alpha: float  # where the maximum is (0.0 when no point lies above the chord)
    min_loss: float  # the lowest loss on the path (Table 5's "min L at α")
    min_alpha: float


def barrier(alphas: Sequence[float], losses: Sequence[float]) -> Barrier:
    """The loss barrier of a curve L(α) sampled at ``alphas`` (first 0, last 1), as in the paper's Table 5.

    The maximum runs over every α, the ends included, so a path on or under its chord reads exactly 0 (the
    paper reports 0.0 for all its paths); how far under the chord the middle dips shows in ``min_loss``.
    """
    a = np.asarray(alphas, dtype=np.float64)
    loss = np.asarray(losses, dtype=np.float64)
    if a.shape != loss.shape or len(a) < 3:
        raise ValueError("barrier: need ≥ 3 α points with one loss each")
    excess = loss - ((1.0 - a) * loss[0] + a * loss[-1])
    excess[[0, -1]] = 0.0  # exactly 0 at the ends, whatever the rounding of the chord
    i, j = int(np.argmax(excess)), int(np.argmin(loss))
    return Barrier(float(excess[i]), float(a[i]), float(loss[j]), float(a[j]))


# ------------------------------------------------------------------------------------------ displacement


@dataclass
class ParallelAxis:
    """Running sums, tensor by tensor, of the parallel-axis (Huygens–Steiner) identity of the merge:

        Σ_k w_k ‖δ_k‖²  =  ‖δ̄‖²  +  Σ_k w_k ‖δ_k − δ̄‖²

    (mean square displacement = square of the mean displacement + the branches' spread around it). The
    spread term is what merging averages away; it holds exactly only when Σ w_k = 1.
    """

    weighted_sq_norms: float = 0.0  # Σ_k w_k ‖δ_k‖²
    mean_sq_norm: float = 0.0  # ‖δ̄‖²
    spread: float = 0.0  # Σ_k w_k ‖δ_k − δ̄‖²

    def add(self, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """Add one tensor's K displacements (each any shape, all the same); returns its δ̄ (float64)."""
        wide = [d.to(torch.float64) for d in deltas]
        mean = sum(w * d for w, d in zip(weights, wide))
        self.weighted_sq_norms += float(sum(w * d.pow(2).sum() for w, d in zip(weights, wide)))
        self.mean_sq_norm += float(mean.pow(2).sum())
        self.spread += float(sum(w * (d - mean).pow(2).sum() for w, d in zip(weights, wide)))
        return mean

    @property
    def residual(self) -> float:
        """left side − right side: 0 up to rounding when the weights sum to 1."""
        return self.weighted_sq_norms - (self.mean_sq_norm + self.spread)

    @property
    def relative_error(self) -> float:
        return abs(self.residual) / max(self.weighted_sq_norms, 1e-300)


class TaskVectorGram:
    """Running Gram matrix G_ij = τ_i · τ_j, tensor by tensor in float64, of task vectors τ = θ − θ(0) (the
    branches', the merge's and optionally joint's): what :func:`task_vector_geometry` reads.

    Pairwise dot products of flattened views, not a stacked matrix product, so no tensor is copied: at 7B
    the embedding's float64 displacement is 4.4 GB, and a stack of K + 2 of them would double the stage's
    peak memory for nothing.
    """

    def __init__(self, n: int):
        self.gram = np.zeros((n, n))

    def add(self, taus: Sequence[torch.Tensor]) -> None:
        flat = [t.to(torch.float64).reshape(-1) for t in taus]
        for i in range(len(flat)):
            for j in range(i, len(flat)):
                v = float(torch.dot(flat[i], flat[j]))
                self.gram[i, j] += v
                if i != j:
                    self.gram[j, i] += v


def task_vector_geometry(gram: np.ndarray, weights: Sequence[float], joint: bool) -> dict:
    """What the merge keeps of each branch's update, from the Gram matrix of [τ_1 … τ_K, τ̄ (, τ_joint)].

    - ``pair_cosines`` (K × K) and ``mean_pair_cos``: 0 when the branches moved in orthogonal directions,
      1 when they made the same update;
    - ``retention``: per branch (τ̄ · τ_k) / ‖τ_k‖², the share of its own update the merge keeps along it.
      With orthogonal τ_k it is exactly w_k (``retention_if_orthogonal``): a branch's tasks then see a
      1/w_k-times smaller update than the branch learned; with equal τ_k it is 1;
    - ``merged_vs_weighted_sum``: |‖τ̄‖² − wᵀ G_KK w| / ‖τ̄‖², 0 up to rounding when the merge file is Σ w_k θ_k;
    - with joint: ‖τ̄‖ / ‖τ_joint‖, cos(τ̄, τ_joint) and each branch's cosine with joint.
    """
    g = np.asarray(gram, dtype=np.float64)
    k = len(weights)
    w = np.asarray(weights, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    cos = g / np.maximum(np.outer(norms, norms), 1e-300)
    pairs = [cos[i, j] for i in range(k) for j in range(i + 1, k)]
    retention = [float(g[k, i] / g[i, i]) if g[i, i] > 0 else float("nan") for i in range(k)]
    from_gram = float(w @ g[:k, :k] @ w)
    out = {
        "branches": k, "weights": [float(x) for x in w],
        "pair_cosines": cos[:k, :k].tolist(), "mean_pair_cos": float(np.mean(pairs)) if pairs else float("nan"),
        "retention": retention, "mean_retention": float(np.mean(retention)),
        "retention_if_orthogonal": [float(x) for x in w],
        "branch_norms": norms[:k].tolist(), "branch_norm_mean": float(norms[:k].mean()), "merged_norm": float(norms[k]),
        "merged_vs_weighted_sum": abs(g[k, k] - from_gram) / max(g[k, k], 1e-300),
    }
    if joint:
        out["merged_over_joint_norm"] = float(norms[k] / norms[k + 1]) if norms[k + 1] > 0 else float("nan")
        out["cos_merged_joint"] = float(cos[k, k + 1])
        out["cos_branch_joint"] = cos[:k, k + 1].tolist()
        out["mean_cos_branch_joint"] = float(cos[:k, k + 1].mean())
    return out


# ------------------------------------------------------------------------------------------- merge gain


def measured_gain(weights: Sequence[float], branch_losses: Sequence[float], merged_loss: float) -> float:
    """Σ_k w_k L(θ_k) − L(θ̄): how much lower the merge's loss is than its branches' weighted mean."""
    return float(sum(w * loss for w, loss in zip(weights, branch_losses)) - merged_loss)


def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H·v for H the Hessian of ``loss_fn()`` with respect to ``params``, by double backward.

    Double backward (grad of ⟨∇L, v⟩) rather than forward-over-reverse (``torch.func.jvp`` of ``grad``):
    it works on an ordinary ``nn.Module`` in place (no ``functional_call`` copy of the parameters) and
    with every attention implementation that has a differentiable backward, while forward-mode AD is not
    implemented for some fused kernels. Cost: about two backward passes; memory: one graph of the gradient.
    Parameters that do not reach the loss get a zero product.
    """
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vector) if g is not None)
    if not torch.is_tensor(dot) or not dot.requires_grad:
        return [torch.zeros_like(p) for p in params]
    hv = torch.autograd.grad(dot, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]


def quadratic_form(vector: Sequence[torch.Tensor], hessian_times_vector: Sequence[torch.Tensor]) -> float:
    """vᵀ H v from v and H·v (float64 sums)."""
    return float(sum((v.to(torch.float64) * h.to(torch.float64)).sum() for v, h in zip(vector, hessian_times_vector)))


def second_difference_curvature(loss_plus: float, loss_at: float, loss_minus: float, epsilon: float) -> float:
    """vᵀ H v from three losses on the line through θ along v: [L(θ + εv) − 2 L(θ) + L(θ − εv)] / ε².

    The central second difference: exact for a quadratic loss whatever ε, O(ε²·‖v‖⁴) otherwise (the
    fourth-order term). Two forward passes per direction and no graph, against an HVP's double backward:
    the cheap way to the same Thm 3.1 prediction when the loss is computed in float32 (in bfloat16 its
    rounding, ~1e-3 of the loss, would swamp ε²·vᵀHv).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    return (loss_plus - 2.0 * loss_at + loss_minus) / (epsilon * epsilon)


def predicted_gain(weights: Sequence[float], curvatures: Sequence[float]) -> float:
    """½ Σ_k w_k (δ_k − δ̄)ᵀ H (δ_k − δ̄), given each branch's curvature term (δ_k − δ̄)ᵀ H (δ_k − δ̄).

    Second-order Taylor expansion of L(θ_k) around θ̄: the first-order terms Σ_k w_k ∇L·(θ_k − θ̄) vanish
    because Σ_k w_k (θ_k − θ̄) = 0, so for a quadratic loss this equals :func:`measured_gain` exactly.
    """
    return 0.5 * float(sum(w * c for w, c in zip(weights, curvatures)))


def gain_ratio(measured: float, predicted: float) -> float | None:
    """measured / predicted (None when the prediction is 0: nothing to compare with)."""
    return None if predicted == 0 else measured / predicted


# ------------------------------------------------------------------------------------------ flatness


def relative_gaussian_noise(tensor: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """σ · RMS(tensor) · N(0, I), shaped like ``tensor`` (float32).

    Relative to each tensor's own root-mean-square so that σ means the same thing for an embedding
    (RMS ~0.02) and a normalisation weight (RMS ~1): σ = 0.1 moves every tensor by a tenth of its typical
    entry. A tensor that is all zeros gets no noise.
    """
    wide = tensor.to(torch.float32)
    rms = wide.pow(2).mean().sqrt() if wide.numel() else torch.tensor(0.0)
    noise = torch.randn(wide.shape, generator=generator, dtype=torch.float32, device=wide.device)
    return sigma * rms * noise


def flatness_auc(sigmas: Sequence[float], loss_increases: Sequence[float]) -> float:
    """Trapezoid area under ΔL(σ) from σ = 0 (where ΔL = 0 by definition) to the largest σ.

    The origin is included so that the area does not depend on where the first σ lies; smaller = flatter.
    """
    s = np.concatenate([[0.0], np.asarray(sigmas, dtype=np.float64)])
    d = np.concatenate([[0.0], np.asarray(loss_increases, dtype=np.float64)])
    order = np.argsort(s, kind="stable")
    s, d = s[order], d[order]
    return float(np.sum((s[1:] - s[:-1]) * (d[1:] + d[:-1]) / 2.0))
