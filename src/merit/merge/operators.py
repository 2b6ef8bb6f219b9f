"""Merge operators: pure functions of one parameter tensor across K branches.

Protocol: ``op(tensors, weights, *, base=None, **params) -> tensor``.

- ``tensors``: the K branches' values of one parameter (any floating dtype, same shape).
- ``weights``: one float per branch. The pipeline passes the plan's token weights w_k = N_k / Σ_j N_j
  (they sum to 1); the CLI normalises ``--weights`` to sum 1.
- ``base``: θ(0)'s value of the same parameter, for operators that work on task vectors τ_k = θ_k − θ(0).
- ``params``: the operator's own hyper-parameters (``density``, ``lam``, ``rescale``, ``seed``, ``eta``,
  ``alpha``, ``rank_fraction``, ``common_space_fraction``), checked by :meth:`MergeOperator.resolve_params`.

Arithmetic is in fp32 (fp64 stays fp64); the caller casts the result to the output dtype. Operators do
no IO. Each is registered as a :class:`MergeOperator`, which carries what the streaming engine needs to
know about it: whether it needs θ(0), whether it is elementwise (then the engine may call it on flat
slices of a tensor), whether it is linear (then a NaN/Inf input always shows in the output), and which
parameters it takes.

The spectral operators (``star``, ``tsv``, ``iso-c``, ``iso-cts``) and ``model-stock`` are in
:mod:`merit.merge.spectral`, registered the same way.

Which TIES / DARE variant (the original code, PEFT and mergekit differ; see ``ties`` and ``dare``):
every sparsifying operator here trims **per tensor** and is the corresponding ``peft.utils.merge_utils``
kernel applied to task vectors, so results match PEFT's kernels exactly (tests check this).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merit.errors import ConfigError
from merit.registry import register


@dataclass(frozen=True)
class MergeOperator:
    """A registered merge operator: a pure per-tensor function plus what the engine needs to know."""

    fn: Callable[..., torch.Tensor]
    needs_base: bool = False
    elementwise: bool = False  # out[i] depends only on inputs[i]: the engine may merge slices
    linear: bool = False  # Σ_k c_k x_k: a non-finite input always makes the output non-finite
    params: Mapping[str, Any] = field(default_factory=dict)  # accepted hyper-parameters and defaults
    mergekit: str = ""  # the mergekit merge_method of the same family, for --export-mergekit

    @property
    def name(self) -> str:
        return self.fn.__name__.replace("_", "-")

    @property
    def seeded(self) -> bool:
        return "seed" in self.params

    def __call__(self, tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, *,
                 base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if self.needs_base:
            if base is None:
                raise ValueError(f"merge operator {self.name!r} needs θ(0)'s tensor (base=)")
            return self.fn(tensors, weights, base=base, **params)
        return self.fn(tensors, weights, **params)

    def resolve_params(self, given: Mapping[str, Any] | None,
                       key: Callable[[str], str] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given``, each value checked; a ConfigError otherwise.

        ``key`` names a parameter in the error the way the user wrote it (``merge.params.ties.density``,
        ``--density``); by default its bare name. Integers given for float parameters become floats, so
        ``eta: 40`` and ``eta: 40.0`` are the same merge (and the same merge key).
        """
        key = key or (lambda p: p)
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            takes = ", ".join(sorted(self.params)) or "no parameters"
            raise ConfigError(f"{key(unknown[0])}: merge operator {self.name!r} takes {takes}; "
                              f"got {', '.join(unknown)}")
        out = {**self.params}
        for p, value in given.items():
            out[p] = _check_param(p, value, self.params[p], key(p))
        return out


def _check_param(name: str, value: Any, default: Any, where: str) -> Any:
    """``value`` for parameter ``name`` (typed like its default), or a ConfigError naming ``where``."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: must be a non-negative integer, got {value!r}")
        return value
    if value is None and default is None:
        return None  # "derive it from K" (tsv's rank_fraction)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    value = float(value)
    low, high, closed_low = _RANGES.get(name, (-math.inf, math.inf, True))
    if not ((low <= value) if closed_low else (low < value)) or value > high:
        raise ConfigError(f"{where}: must be in {'[' if closed_low else '('}{low:g}, {high:g}], got {value:g}")
    return value


# (low, high, low included): the range of each bounded parameter; high is always included.
_RANGES = {
    "density": (0.0, 1.0, False),  # fraction of entries kept: 0 would keep nothing
    "eta": (0.0, 100.0, False),  # percent of the nuclear norm STAR keeps
    "rank_fraction": (0.0, 1.0, False),  # fraction of each task's singular components TSV keeps
    "common_space_fraction": (0.0, 1.0, True),  # share of the rank Iso-CTS gives the common subspace
}


def operator(name: str, **spec: Any) -> Callable[[Callable[..., torch.Tensor]], MergeOperator]:
    """Decorator: wrap a per-tensor function in a MergeOperator and register it as ``merge/<name>``."""

    def wrap(fn: Callable[..., torch.Tensor]) -> MergeOperator:
        return register("merge", name)(MergeOperator(fn, **spec))

    return wrap


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from a run seed and the tensor's name: random operators then give the same
    result whatever order (or thread) the tensors are merged in."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")


def _task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    b = base.to(_compute_dtype(base))
    return [t.to(b.dtype) - b for t in tensors]  # τ_k = θ_k − θ(0), each (*shape)


def _peft():
    # Imported on first use: importing peft pulls in transformers (seconds), which the linear
    # operators and `merit --help` do not need.
    from peft.utils import merge_utils

    return merge_utils


def _random_prune(tau: torch.Tensor, density: float, rescale: bool, gen: torch.Generator) -> torch.Tensor:
    # peft.utils.merge_utils.random_pruning with an explicit generator instead of the global RNG, so that
    # concurrent tensors cannot interleave their draws. Masks are drawn on the CPU: the same seed gives
    # the same mask on any device.
    if density >= 1.0:
        return tau
    probs = torch.full(tau.shape, density, dtype=tau.dtype)
    mask = torch.bernoulli(probs, generator=gen).to(tau.device)
    pruned = tau * mask
    return pruned / density if rescale else pruned


@operator("token-weighted", elementwise=True, linear=True, mergekit="linear")
def token_weighted(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """θ̄ = Σ_k w_k θ_k with w_k = N_k / Σ_j N_j (the paper's Step 5), in fp32.

    With weights summing to 1 (the pipeline's token weights; the CLI normalises ``--weights``) it is
    computed as θ_1 + Σ_{k>1} w_k (θ_k − θ_1): the same average, but exact wherever every branch holds
    the same value, so parameters that no branch trains (a VLM's frozen vision tower, embedding rows of
    tokens no branch saw) come out bitwise equal to θ(0). Other weights: ``out += w_k θ_k`` in branch order.
    """
    _check(tensors, weights)
    dtype = _compute_dtype(tensors[0])
    if abs(sum(float(w) for w in weights) - 1.0) < 1e-6:
        anchor = tensors[0].to(dtype)
        out = anchor.clone()
        for t, w in zip(tensors[1:], weights[1:]):
            out.add_(t.to(dtype) - anchor, alpha=float(w))  # θ_k − θ_1 is exactly 0 where they agree
        return out
    out = torch.zeros_like(tensors[0], dtype=dtype)
    for t, w in zip(tensors, weights):
        out.add_(t.to(out.dtype), alpha=float(w))
    return out


@operator("uniform", elementwise=True, linear=True, mergekit="linear")
def uniform(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """θ̄ = (1/K) Σ_k θ_k: the uniform soup, ignoring ``weights``."""
    k = len(tensors)
    return token_weighted.fn(tensors, [1.0 / k] * k)


@operator("task-arithmetic", needs_base=True, elementwise=True, linear=True, params={"lam": 1.0},
          mergekit="task_arithmetic")
def task_arithmetic(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
                    lam: float = 1.0) -> torch.Tensor:
    """θ̄ = θ(0) + λ Σ_k w_k τ_k (Ilharco et al. 2023; PEFT ``task_arithmetic`` with weights w).

    With weights summing to 1, λ = 1 is the weighted average of the branches; λ = K with uniform
    weights is the paper's plain sum of task vectors.
    """
    _check(tensors, weights)
    out = base.to(_compute_dtype(base)).clone()
    for t, w in zip(tensors, weights):
        out.add_(t.to(out.dtype) - base.to(out.dtype), alpha=float(lam) * float(w))
    return out


@operator("ties", needs_base=True, params={"density": 0.2, "lam": 1.0}, mergekit="ties")
def ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
         density: float = 0.2, lam: float = 1.0) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): PEFT's ``merge_utils.ties`` kernel, per tensor, computed in place.

    θ̄ = θ(0) + λ · ties(τ_1..τ_K, weights=K·w, density, majority_sign_method="total"), i.e.:

    1. Trim: in each τ_k keep the ``int(density · numel)`` entries of largest |τ_k| *of this tensor*
       (``torch.topk``), zero the rest. The original code trims over the whole flattened model instead;
       PEFT and mergekit trim per tensor, as here.
    2. Elect: the sign of Σ_k τ̂_k (the trimmed, *unweighted* task vectors; a zero sum elects +).
    3. Disjoint merge: Σ_k K·w_k τ̂_k over the entries that agree with the elected sign, divided by the
       *number* of agreeing entries (at least 1). Equal weights give the paper's disjoint mean.

    mergekit's ``ties`` differs when weights are unequal: it elects on weighted task vectors and divides
    by the sum of the agreeing weights. With equal weights all three agree.

    The result equals PEFT's bit for bit (tested); the kernel is ours because PEFT's stacks, masks and
    weights whole copies of the K task vectors (≈ 4K + 4 float32 copies of the tensor at its peak: over the
    engine's memory bound on the 49152×576 embedding), where trimming in place and merging one branch at a
    time holds the K task vectors plus ≈ 4 tensor-sized temporaries.
    """
    _check(tensors, weights)
    taus = _task_vectors(tensors, base)
    for tau in taus:
        _trim_in_place(tau, density)
    # The kernel divides the sum of agreeing weighted entries by their *count* (PEFT), so the weights are
    # scaled by K: equal weights become all ones and the kernel is the paper's disjoint mean.
    mixed = _elect_and_disjoint_merge(taus, [len(weights) * float(w) for w in weights])
    return base.to(mixed.dtype) + float(lam) * mixed


def _trim_in_place(tau: torch.Tensor, density: float) -> None:
    # peft.utils.merge_utils.magnitude_based_pruning without its float mask and product copy: keep the
    # int(density · numel) entries of largest |τ| (torch.topk's choice among equal magnitudes), zero the rest.
    if density >= 1.0:
        return
    flat = tau.view(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = True
    flat.mul_(keep)


def _elect_and_disjoint_merge(taus: Sequence[torch.Tensor], kernel_weights: Sequence[float]) -> torch.Tensor:
    """PEFT's ``calculate_majority_sign_mask(method="total")`` then ``disjoint_merge`` of the weighted task
    vectors, one branch at a time: the sign of Σ_k τ_k is elected (0 elects +); each τ_k's entries of that
    sign (zeros never agree) are summed with weight w_k and divided by how many agreed (at least 1)."""
    total = torch.zeros_like(taus[0])
    for tau in taus:
        total.add_(tau)
    positive = total >= 0
    del total
    mixed = torch.zeros_like(taus[0])
    agreeing = torch.zeros(taus[0].shape, dtype=torch.int32, device=taus[0].device)  # counts ≤ K
    for tau, w in zip(taus, kernel_weights):
        agree = torch.where(positive, tau > 0, tau < 0)  # sign(τ) == elected sign; 0 and NaN never agree
        mixed.add_((tau * w) * agree)
        agreeing.add_(agree)
    return mixed / torch.clamp(agreeing, min=1.0)


@operator("dare", needs_base=True, params={"density": 0.1, "lam": 1.0, "rescale": True, "seed": 0},
          mergekit="dare_linear")
def dare(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
         density: float = 0.1, lam: float = 1.0, rescale: bool = True, seed: int = 0) -> torch.Tensor:
    """DARE (Yu et al. 2024): θ̄ = θ(0) + λ Σ_k w_k (m_k ⊙ τ_k) / density, m_k ~ Bernoulli(density).

    PEFT's ``dare_linear`` kernel with its RNG made explicit: one CPU generator seeded with ``seed`` draws
    the K masks in branch order (``torch.bernoulli`` on a tensor filled with ``density``), so the result
    equals ``dare_linear(τ, w, density)`` after ``torch.manual_seed(seed)``. The engine passes
    ``seed = tensor_seed(run_seed, tensor_name)``. ``rescale=False`` drops the 1/density factor.
    With weights summing to 1 and λ = 1 the expected result is the weighted average of the branches.
    mergekit's ``dare_linear`` rescales to preserve the L1 norm instead, and draws other random numbers.
    """
    _check(tensors, weights)
    gen = torch.Generator().manual_seed(int(seed))
    taus = [_random_prune(t, density, rescale, gen) for t in _task_vectors(tensors, base)]
    w = torch.tensor([float(x) for x in weights], dtype=taus[0].dtype, device=taus[0].device)
    mixed = _peft().task_arithmetic(taus, w)
    return base.to(mixed.dtype) + float(lam) * mixed


@operator("dare-ties", needs_base=True, params={"density": 0.1, "lam": 1.0, "rescale": True, "seed": 0},
          mergekit="dare_ties")
def dare_ties(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, base: torch.Tensor,
              density: float = 0.1, lam: float = 1.0, rescale: bool = True, seed: int = 0) -> torch.Tensor:
    """DARE's random drop-and-rescale, then TIES's sign election and disjoint merge.

    θ̄ = θ(0) + λ · (PEFT ``dare_ties`` on τ with weights K·w), the masks drawn as in :func:`dare`.
    """
    _check(tensors, weights)
    gen = torch.Generator().manual_seed(int(seed))
    taus = [_random_prune(t, density, rescale, gen) for t in _task_vectors(tensors, base)]
    mixed = _elect_and_disjoint_merge(taus, [len(weights) * float(w) for w in weights])  # K·w, as in ties
    return base.to(mixed.dtype) + float(lam) * mixed
