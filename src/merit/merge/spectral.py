"""Spectral merge operators of the paper's Table 12 (STAR, TSV-M, Iso-C, Iso-CTS) and Model Stock.

Transcriptions of their papers' reference code, per 2-D task-vector matrix (Model Stock: per tensor);
each docstring says where its defaults come from and whether it uses the weights. Pure tensor code,
registered with :func:`merit.merge.operators.operator` like the operators there; listed in
:data:`merit.plugins.BUILTIN_MODULES`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from merit.merge.operators import _check, _task_vectors, operator


# ------------------------------------------------------------------------------- spectral (SVD) operators
#
# STAR, TSV, Iso-C and Iso-CTS work on each 2-D task-vector matrix τ_k (out, in) through its thin SVD
# τ = U diag(S) Vᵀ (U: (out, r), S: (r,), Vᵀ: (r, in), r = min(out, in)). Every 2-D tensor counts as a
# matrix, embeddings included, as in the reference code (which only leaves out CLIP's text_projection).
# Tensors of other ranks (biases, norms, conv kernels) get each method's own fallback: the average of
# the task vectors. None of them is elementwise: the engine hands them whole tensors.


def _svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD: U (out, r), S (r,) descending, Vᵀ (r, in), in ``m``'s dtype.

    LAPACK's divide-and-conquer driver (gesdd, torch's CPU SVD) can fail to converge on matrices with
    many repeated (near-)zero singular values, which Iso-CTS's residuals τ_k − U_c U_cᵀ τ_k are by
    construction (measured: a 576×576 residual of rank ≤ 116 failed in fp32). Then the SVD is retried in
    fp64, and if that fails too it is taken from the eigendecomposition of the smaller Gram matrix
    (a symmetric eigensolver always converges; its small singular vectors are less accurate, and they
    carry singular values near 0)."""
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    wide = m.double()
    try:
        u, s, vt = torch.linalg.svd(wide, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vt = _svd_by_gram(wide)
    return u.to(m.dtype), s.to(m.dtype), vt.to(m.dtype)


def _svd_by_gram(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # mᵀm = V S² Vᵀ (for a tall m; a wide one is transposed first), then U = m V / S where S > 0 and any
    # orthonormal completion elsewhere (those columns are multiplied by S = 0 when reconstructing).
    if m.shape[0] < m.shape[1]:
        u, s, vt = _svd_by_gram(m.T)
        return vt.T, s, u.T
    evals, v = torch.linalg.eigh(m.T @ m)  # ascending
    s = evals.flip(0).clamp(min=0).sqrt()
    v = v.flip(1)
    u = m @ v
    # Below σ_max · √eps a singular value is lost in the squaring: treat it as 0.
    positive = s > s.max() * (m.shape[1] * torch.finfo(m.dtype).eps) ** 0.5 if s.numel() else s > 0
    u[:, positive] /= s[positive]
    if not bool(positive.all()):
        gen = torch.Generator(device=m.device).manual_seed(0)  # a deterministic completion
        filler = torch.randn(m.shape[0], int((~positive).sum()), dtype=m.dtype, device=m.device, generator=gen)
        q, r = torch.linalg.qr(torch.cat([u[:, positive], filler], 1))
        # Householder QR may flip a column's sign: undo it, so the kept columns are U's own.
        u = q * torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return u, s * positive, v.T


def _orthogonalise(m: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns (rows, if wide) nearest to ``m``: P Qᵀ from m = P Σ Qᵀ.

    TSV's and Iso-CTS's whitening of concatenated singular vectors (the polar factor of ``m``)."""
    p, _, qt = _svd(m)
    return p @ qt


def _mean(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    out = taus[0].clone()
    for i, t in enumerate(taus[1:], start=2):
        out += (t - out) / i  # the reference code's running mean
    return out


def _star_truncate(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """STAR on one matrix: keep the fewest singular values whose sum reaches eta% of ‖τ‖_*, rescale them
    so the nuclear norm is unchanged, reconstruct."""
    u, s, vt = _svd(tau)
    total = s.sum()
    if total == 0:  # a tensor no branch changed: nothing to truncate (and 0/0 below)
        return tau
    target = (total * (eta / 100.0)).reshape(1)
    # First index whose cumulative sum reaches the target, + 1 = the number of values kept (IBM/STAR).
    keep = int(torch.searchsorted(torch.cumsum(s, 0), target).item()) + 1
    kept = s[:keep] * (total / s[:keep].sum())
    return (u[:, :keep] * kept) @ vt[:keep]


@operator("star", needs_base=True, params={"eta": 40.0})
def star(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
         eta: float = 40.0) -> torch.Tensor:
    """STAR, Spectral Truncation And Rescale (Lee et al. 2025): θ̄ = θ(0) + Σ_k w_k STAR_η(τ_k).

    Per matrix τ_k = U diag(S) Vᵀ: keep the smallest r with Σ_{i≤r} S_i ≥ η% · Σ_i S_i, rescale the kept
    values by Σ_i S_i / Σ_{i≤r} S_i (the nuclear norm is preserved), reconstruct U_r diag(S'_r) V_rᵀ.
    The truncated task vectors are then averaged: IBM/STAR (``runner/*.py``) calls its
    ``weighted_merge`` with weights 1/K; merit passes the pipeline's token weights w_k there, which is
    the reference exactly when the weights are equal. η = 100 keeps every value and gives the plain
    weighted average of the branches.

    Default η = 40: the ``--eta`` default of IBM/STAR's runners and the value in all its example
    scripts. Tensors that are not matrices: STAR's code only sees LoRA matrices; merit averages their
    task vectors with the same weights (θ(0) + Σ w_k τ_k).
    """
    _check(tensors, weights)
    taus = _task_vectors(tensors, base)
    if taus[0].ndim == 2:
        taus = [_star_truncate(t, float(eta)) for t in taus]
    out = base.to(taus[0].dtype).clone()
    for t, w in zip(taus, weights):
        out.add_(t, alpha=float(w))
    return out


@operator("tsv", needs_base=True, params={"alpha": 1.0, "rank_fraction": None})
def tsv(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, base: torch.Tensor,
        alpha: float = 1.0, rank_fraction: float | None = None) -> torch.Tensor:
    """TSV-M, Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025).

    Per matrix: from each τ_k = U_k diag(S_k) V_kᵀ keep its top ``int(r · rank_fraction)`` components;
    concatenate them, U = [U_1 … U_K] (out, K·r'), S = [S_1 … S_K], Vᵀ = [V_1ᵀ; …; V_Kᵀ] (K·r', in);
    decorrelate the tasks' subspaces by replacing U and Vᵀ with their nearest orthonormal matrices
    (U_⊥ = P Qᵀ from U = P Σ Qᵀ, likewise for Vᵀ); θ̄ = θ(0) + α · U_⊥ diag(S) V_⊥ᵀ. As the reference
    (``compute_and_sum_svd_mem_reduction`` in AntoAndGar/task_singular_vectors) this *sums* the tasks'
    components and takes no per-task weights: ``weights`` are ignored (uniform). With K = 1 and
    rank_fraction = 1 it returns θ(0) + α τ_1.

    Defaults: rank_fraction = 1/K (the reference's ``sv_reduction = 1 / len(DATASETS)``). α = 1.0: the
    reference code has no fixed α; for TSVM it picks α on validation accuracy over 0.1, 0.2, …, 3.0
    (``src/eval/eval.py``, ``np.linspace(0, 3, 31)[1:]``), and merit's merge stage has no validation
    set, so 1.0 (the unscaled sum of the tasks' components) is the neutral choice; set a tuned value with
    ``merge.params.tsv.alpha`` (``--alpha``). Tensors that are not matrices: θ(0) + α · mean_k τ_k, the
    reference's running mean (its α scales the whole task vector).
    """
    taus = _task_vectors(tensors, base)
    k = len(taus)
    if taus[0].ndim != 2:
        return base.to(taus[0].dtype) + float(alpha) * _mean(taus)
    fraction = 1.0 / k if rank_fraction is None else float(rank_fraction)
    us, ss, vts = [], [], []
    for tau in taus:
        u, s, vt = _svd(tau)
        keep = int(s.shape[0] * fraction)
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vts.append(vt[:keep])
    u_cat, s_cat, vt_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vts, 0)  # (out, K·r'), (K·r',), (K·r', in)
    if s_cat.numel() == 0:  # r' = 0 (a matrix of rank < K): no component survives
        return base.to(taus[0].dtype).clone()
    merged = (_orthogonalise(u_cat) * s_cat) @ _orthogonalise(vt_cat)
    return base.to(merged.dtype) + float(alpha) * merged


@operator("iso-c", needs_base=True, params={"alpha": 1.0})
def iso_c(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, base: torch.Tensor,
          alpha: float = 1.0) -> torch.Tensor:
    """Iso-C, isotropic merging in the common subspace (Marczak et al. 2025, "No task left behind").

    Per matrix: the task-arithmetic sum Δ = Σ_k τ_k = U diag(S) Vᵀ, its spectrum flattened to its mean,
    θ̄ = θ(0) + α · mean(S) · U Vᵀ: every singular value of the update equals α · mean(S). Like the
    reference (``iso_c`` in danielm1405/iso-merging, ``src/utils/iso.py``) it sums the task vectors
    with no per-task weight: ``weights`` are ignored (uniform).

    α = 1.0 here. The reference has no fixed default: it picks α on validation accuracy over
    0.1, 0.2, …, 3.0 (``src/eval/eval.py``: ``np.linspace(0, 3, 31)[1:]``, early stopping); merit's
    merge stage has no validation set, so 1.0 (the spectrum's mean left as it is) is the neutral choice;
    set a tuned value with ``merge.params.iso-c.alpha`` (``--alpha``). Tensors that are not matrices:
    θ(0) + α · mean_k τ_k (the reference's ``sum(tvs) / len(tvs)``, scaled by α like the rest).
    """
    taus = _task_vectors(tensors, base)
    if taus[0].ndim != 2:
        return base.to(taus[0].dtype) + float(alpha) * _mean(taus)
    u, s, vt = _svd(torch.stack(taus).sum(0))
    return base.to(u.dtype) + float(alpha) * ((u * s.mean()) @ vt)


def _iso_cts_sizes(rank: int, k: int, common_space_fraction: float) -> tuple[int, int]:
    """(common subspace size, directions per task), as the reference sizes them: the task-specific
    share rounded to a multiple of K, so common + K · per_task = rank."""
    common = int(rank * common_space_fraction)
    task_specific = round((rank - common) / k) * k
    if task_specific > rank:  # rounding up past the rank (tiny matrices, fraction near 0): round down
        task_specific -= k
    return rank - task_specific, task_specific // k


@operator("iso-cts", needs_base=True, params={"alpha": 1.0, "common_space_fraction": 0.8})
def iso_cts(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *, base: torch.Tensor,
            alpha: float = 1.0, common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

    Per matrix of rank r = min(out, in):

    1. Common subspace: the top c singular triplets (U_c, S_c, V_c) of Σ_k τ_k, c ≈ r · common_space_fraction.
    2. Task-specific: for each k, the top d = (r − c) / K triplets of τ_k − U_c U_cᵀ τ_k (τ_k with the
       common subspace projected out of its column space).
    3. Concatenate (K·d + c = r columns), orthogonalise U and Vᵀ (P Qᵀ, as TSV), flatten the r singular
       values to their mean: θ̄ = θ(0) + α · mean(S) · U_⊥ V_⊥ᵀ.

    ``weights`` are ignored (uniform), like the reference (``iso_cts`` in danielm1405/iso-merging).
    Defaults: common_space_fraction = 0.8 (``config/method/iso_cts.yaml`` and the README's command);
    α = 1.0, with the same caveat as :func:`iso_c` (the reference picks α on validation data). Tensors
    that are not matrices: θ(0) + α · mean_k τ_k (the reference's running mean).
    """
    taus = _task_vectors(tensors, base)
    if taus[0].ndim != 2:
        return base.to(taus[0].dtype) + float(alpha) * _mean(taus)
    k = len(taus)
    common, per_task = _iso_cts_sizes(min(taus[0].shape), k, float(common_space_fraction))
    u, s, vt = _svd(torch.stack(taus).sum(0))
    u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common]
    us, ss, vts = [], [], []
    for tau in taus:
        u_t, s_t, vt_t = _svd(tau - u_c @ (u_c.T @ tau))  # what τ_k holds outside the common subspace
        us.append(u_t[:, :per_task])
        ss.append(s_t[:per_task])
        vts.append(vt_t[:per_task])
    # Task-specific blocks first, then the common one: the reference's column order.
    u_all, s_all, vt_all = torch.cat(us + [u_c], 1), torch.cat(ss + [s_c]), torch.cat(vts + [vt_c], 0)
    merged = (_orthogonalise(u_all) * s_all.mean()) @ _orthogonalise(vt_all)
    return base.to(merged.dtype) + float(alpha) * merged


@operator("model-stock", needs_base=True, mergekit="model_stock")
def model_stock(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                base: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang et al., ECCV 2024): θ̄ = t · mean_k θ_k + (1 − t) · θ(0), per tensor.

    t = K cos θ / (1 + (K − 1) cos θ), with cos θ the angle between task vectors τ_k (each tensor
    flattened). The paper's code merges K = 2; for K > 2 cos θ is the mean over pairs i < j, and a norm
    product below 1e-6 is clamped, as in mergekit's ``model_stock`` (filter_wise: false). Every tensor is
    treated alike, matrices or not. Computed as θ(0) + t · mean_k τ_k, the same value, exact where no
    branch moved (then cos θ = 0, t = 0 and θ̄ = θ(0)).

    merit clamps cos θ to [0, 1] (mergekit: [−1, 1]), so t stays in [0, 1]: below 0 the formula would
    step away from the branches, past θ(0), with a pole at cos θ = −1/(K − 1). The method has no
    per-model weight: ``weights`` are ignored (uniform). One branch: that branch (t = 1).
    """
    taus = _task_vectors(tensors, base)
    k = len(taus)
    mean_tau = _mean(taus)
    if k == 1:
        return base.to(mean_tau.dtype) + mean_tau
    flat = [t.reshape(-1) for t in taus]
    cosines = [(flat[i] @ flat[j]) / (flat[i].norm() * flat[j].norm()).clamp(min=1e-6)
               for i in range(k) for j in range(i + 1, k)]
    cos = torch.stack(cosines).mean().clamp(0.0, 1.0)
    t = k * cos / (1 + (k - 1) * cos)
    return base.to(mean_tau.dtype) + t * mean_tau
