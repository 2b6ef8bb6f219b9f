"""STAR, TSV-M, Iso-C, Iso-CTS and Model Stock against literal transcriptions of their papers' formulas.

Each ``*_reference`` below is written from the paper (and its reference code's sizing rules) with numpy
in float64, in the most literal form: explicit loops over tasks, singular values and rank-1 terms.
The operators get float64 inputs too (they keep fp64), so agreement is to ~1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merit import plugins
from merit.errors import ConfigError
from merit.merge.operators import token_weighted
from merit.merge.spectral import iso_c, iso_cts, model_stock, star, tsv

OPS = [star, tsv, iso_c, iso_cts, model_stock]


def _problem(shape=(40, 30), k=4, seed=0, scale=0.1):
    """θ(0) and K branches θ_k = θ(0) + τ_k as float64 tensors, plus unequal weights summing to 1."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    branches = [base + scale * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(k)]
    weights = [float(x) for x in np.arange(1, k + 1) / np.arange(1, k + 1).sum()]
    return base, branches, weights


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def _close(ours: torch.Tensor, theirs: np.ndarray, atol: float = 1e-9) -> None:
    np.testing.assert_allclose(_np(ours), theirs, rtol=0, atol=atol)


def _polar(m: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(m, full_matrices=False)
    return p @ qt


# ------------------------------------------------------------------------------------ transcriptions


def star_reference(branches, weights, base, eta):
    """Lee et al. 2025, per task: the smallest r with Σ_{i<r} σ_i ≥ η/100 · Σ σ_i, σ'_i = σ_i · Σσ / Σ_{i<r}σ,
    τ'_k = Σ_{i<r} σ'_i u_i v_iᵀ; merged = θ(0) + Σ_k w_k τ'_k."""
    base = _np(base)
    merged = base.copy()
    for theta, w in zip(branches, weights):
        tau = _np(theta) - base
        u, s, vt = np.linalg.svd(tau)
        total = sum(s)
        r, kept_sum = 0, 0.0
        while r < len(s) and kept_sum < eta / 100 * total:
            kept_sum += s[r]
            r += 1
        truncated = np.zeros_like(tau)
        for i in range(r):
            truncated += (s[i] * total / kept_sum) * np.outer(u[:, i], vt[i])
        merged += w * truncated
    return merged


def tsv_reference(branches, base, alpha, rank_fraction=None):
    """Gargiulo et al. 2025 (TSV-M): each task's top ⌊r/K⌋ (or ⌊r·fraction⌋) singular triplets, U and V
    concatenated over tasks and replaced by their polar factors, merged = θ(0) + α Σ σ_i û_i v̂_iᵀ."""
    base = _np(base)
    k = len(branches)
    columns, sigmas, rows = [], [], []
    for theta in branches:
        u, s, vt = np.linalg.svd(_np(theta) - base, full_matrices=False)
        keep = int(len(s) * (1 / k if rank_fraction is None else rank_fraction))
        for i in range(keep):
            columns.append(u[:, i])
            sigmas.append(s[i])
            rows.append(vt[i])
    u_perp = _polar(np.stack(columns, axis=1))
    vt_perp = _polar(np.stack(rows, axis=0))
    update = np.zeros_like(base)
    for i, sigma in enumerate(sigmas):
        update += sigma * np.outer(u_perp[:, i], vt_perp[i])
    return base + alpha * update


def iso_c_reference(branches, base, alpha):
    """Marczak et al. 2025 (Iso-C): Δ = Σ_k τ_k = Σ σ_i u_i v_iᵀ, merged = θ(0) + α Σ mean(σ) u_i v_iᵀ."""
    base = _np(base)
    delta = sum(_np(theta) - base for theta in branches)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    iso = np.mean(s)
    update = np.zeros_like(base)
    for i in range(len(s)):
        update += iso * np.outer(u[:, i], vt[i])
    return base + alpha * update


def iso_cts_reference(branches, base, alpha, common_space_fraction):
    """Marczak et al. 2025 (Iso-CTS): the top c triplets of Σ τ_k, then for each task the top d triplets of
    (I − U_c U_cᵀ) τ_k, with c = r − K·round((r − ⌊r·f⌋)/K) and d = (r − c)/K; U, V orthogonalised (polar),
    every singular value replaced by the mean of all r kept values."""
    base = _np(base)
    k = len(branches)
    taus = [_np(theta) - base for theta in branches]
    r = min(base.shape)
    c = r - round((r - int(r * common_space_fraction)) / k) * k
    d = (r - c) // k
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    columns, sigmas, rows = [u[:, i] for i in range(c)], [s[i] for i in range(c)], [vt[i] for i in range(c)]
    projector = np.eye(base.shape[0]) - u[:, :c] @ u[:, :c].T
    for tau in taus:
        ut, st, vtt = np.linalg.svd(projector @ tau, full_matrices=False)
        for i in range(d):
            columns.append(ut[:, i])
            sigmas.append(st[i])
            rows.append(vtt[i])
    assert len(sigmas) == r
    u_perp = _polar(np.stack(columns, axis=1))
    vt_perp = _polar(np.stack(rows, axis=0))
    iso = np.mean(sigmas)
    update = np.zeros_like(base)
    for i in range(r):
        update += iso * np.outer(u_perp[:, i], vt_perp[i])
    return base + alpha * update


def model_stock_reference(branches, base):
    """Jang et al. 2024: cos θ = mean over pairs of cos∠(τ_i, τ_j); t = K cos θ / (1 + (K − 1) cos θ);
    merged = t · (1/K) Σ θ_k + (1 − t) θ(0)."""
    base = _np(base).ravel()
    thetas = [_np(t).ravel() for t in branches]
    k = len(thetas)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            a, b = thetas[i] - base, thetas[j] - base
            cosines.append(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    cos = np.mean(cosines)
    t = k * cos / (1 + (k - 1) * cos)
    return (t * (sum(thetas) / k) + (1 - t) * base).reshape(branches[0].shape)


# ------------------------------------------------------------------------------- against the formulas


@pytest.mark.parametrize("eta", [10.0, 40.0, 75.0])
@pytest.mark.parametrize("shape", [(40, 30), (17, 50)])
def test_star_equals_the_formula(shape, eta):
    base, branches, weights = _problem(shape)
    _close(star(branches, weights, base=base, eta=eta), star_reference(branches, weights, base, eta))


@pytest.mark.parametrize("k, shape", [(4, (40, 30)), (3, (25, 41)), (2, (12, 12))])
def test_tsv_equals_the_formula(k, shape):
    base, branches, weights = _problem(shape, k=k, seed=1)
    _close(tsv(branches, weights, base=base), tsv_reference(branches, base, 1.0))
    _close(tsv(branches, weights, base=base, alpha=0.7, rank_fraction=0.1),
           tsv_reference(branches, base, 0.7, rank_fraction=0.1))


@pytest.mark.parametrize("shape", [(40, 30), (20, 64)])
def test_iso_c_equals_the_formula(shape):
    base, branches, weights = _problem(shape, seed=2)
    _close(iso_c(branches, weights, base=base), iso_c_reference(branches, base, 1.0))
    _close(iso_c(branches, weights, base=base, alpha=1.3), iso_c_reference(branches, base, 1.3))


@pytest.mark.parametrize("shape, fraction", [((40, 30), 0.8), ((30, 40), 0.5), ((48, 36), 0.9)])
def test_iso_cts_equals_the_formula(shape, fraction):
    base, branches, weights = _problem(shape, seed=3)
    ours = iso_cts(branches, weights, base=base, alpha=1.2, common_space_fraction=fraction)
    _close(ours, iso_cts_reference(branches, base, 1.2, fraction))
    # Not Iso-C in disguise: the task-specific directions change the result.
    assert not torch.allclose(ours, iso_c(branches, weights, base=base, alpha=1.2), atol=1e-6)


@pytest.mark.parametrize("k, shape", [(2, (30, 20)), (4, (30, 20)), (3, (50,))])
def test_model_stock_equals_the_formula(k, shape):
    base, branches, weights = _problem(shape, k=k, seed=4)
    # Correlated task vectors (a shared direction plus noise): cos θ well above 0, as between fine-tunes.
    shared = branches[0] - base
    branches = [base + shared + (b - base) for b in branches]
    _close(model_stock(branches, weights, base=base), model_stock_reference(branches, base))


# ---------------------------------------------------------------------------------------- properties


def test_star_with_eta_100_is_the_plain_weighted_mean():
    base, branches, weights = _problem()
    torch.testing.assert_close(star(branches, weights, base=base, eta=100.0), token_weighted(branches, weights),
                               rtol=0, atol=1e-10)


def test_star_keeps_fewer_components_as_eta_falls_and_preserves_the_nuclear_norm():
    base, branches, _ = _problem()
    one = [branches[0]]
    ranks = [torch.linalg.matrix_rank(star(one, [1.0], base=base, eta=eta) - base).item() for eta in (10, 40, 90)]
    assert ranks[0] < ranks[1] < ranks[2] <= 30
    tau = branches[0] - base
    truncated = star(one, [1.0], base=base, eta=40.0) - base
    torch.testing.assert_close(torch.linalg.svdvals(truncated).sum(), torch.linalg.svdvals(tau).sum())


def test_iso_c_singular_values_are_all_equal():
    base, branches, weights = _problem(seed=5)
    s = torch.linalg.svdvals(iso_c(branches, weights, base=base, alpha=1.5) - base)
    torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-9, atol=0)
    total = sum(b - base for b in branches)
    assert s[0].item() == pytest.approx(1.5 * torch.linalg.svdvals(total).mean().item(), rel=1e-9)


def test_iso_cts_singular_values_are_all_equal_and_full_rank():
    base, branches, weights = _problem(seed=6)
    s = torch.linalg.svdvals(iso_cts(branches, weights, base=base) - base)
    assert s.shape == (30,)
    torch.testing.assert_close(s, torch.full_like(s, s.mean().item()), rtol=1e-9, atol=0)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_tsv_with_one_task_and_full_rank_is_theta0_plus_alpha_tau(alpha):
    base, branches, _ = _problem(k=1, seed=7)
    out = tsv(branches, [1.0], base=base, alpha=alpha)  # rank_fraction defaults to 1/K = 1
    torch.testing.assert_close(out, base + alpha * (branches[0] - base), rtol=0, atol=1e-10)


def test_tsv_keeps_r_over_k_components_per_task():
    base, branches, weights = _problem(k=4, seed=8)  # r = 30: int(30 / 4) = 7 per task, 28 in all
    assert torch.linalg.matrix_rank(tsv(branches, weights, base=base) - base).item() == 28
    assert torch.linalg.matrix_rank(tsv(branches, weights, base=base, rank_fraction=0.1) - base).item() == 12


def test_model_stock_with_identical_task_vectors_returns_the_branch():
    base, branches, weights = _problem(seed=9)
    same = [branches[0].clone() for _ in range(4)]
    torch.testing.assert_close(model_stock(same, weights, base=base), branches[0], rtol=0, atol=1e-12)


def test_model_stock_orthogonal_task_vectors_give_theta0_and_negative_cosines_are_clamped():
    base = torch.zeros(4, dtype=torch.float64)
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(model_stock([e[0], e[1]], [0.5, 0.5], base=base), base)  # cos 0: t = 0
    # cos = −1: the raw formula would divide by zero (K = 2); clamped to 0, t = 0.
    torch.testing.assert_close(model_stock([e[0], -e[0]], [0.5, 0.5], base=base), base)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_vectors_fall_back_to_the_average_of_task_vectors(op):
    base, branches, weights = _problem((50,), seed=10)
    taus = [b - base for b in branches]
    if op is model_stock:
        return  # the same formula for every tensor (checked against the reference above)
    expected = base + sum(w * t for w, t in zip(weights, taus)) if op is star else base + sum(taus) / len(taus)
    torch.testing.assert_close(op(branches, weights, base=base), expected, rtol=0, atol=1e-12)
    if op is not star:
        torch.testing.assert_close(op(branches, weights, base=base, alpha=2.0), base + 2 * sum(taus) / len(taus),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("shape", [(6, 5), (7,)])
def test_parameters_no_branch_changed_come_out_equal_to_theta0(op, shape):
    base = torch.randn(shape)
    out = op([base.clone() for _ in range(3)], [0.2, 0.3, 0.5], base=base)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base, rtol=0, atol=0)


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_fp32_from_bf16_and_fp64_stays_fp64(op):
    base, branches, weights = _problem((12, 10), k=3)
    assert op([b.to(torch.bfloat16) for b in branches], weights, base=base.to(torch.bfloat16)).dtype == torch.float32
    assert op(branches, weights, base=base).dtype == torch.float64


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_registered_as_whole_tensor_operators_on_task_vectors(op):
    assert plugins.get("merge", op.name) is op
    assert op.needs_base and not op.elementwise and not op.linear
    with pytest.raises(ValueError, match="needs θ\\(0\\)"):
        op([torch.zeros(2, 2), torch.ones(2, 2)], [0.5, 0.5])


def test_iso_cts_sizes_follow_the_reference_rounding():
    from merit.merge.spectral import _iso_cts_sizes

    assert _iso_cts_sizes(576, 4, 0.8) == (460, 29)  # int(460.8) = 460; round(116 / 4) · 4 = 116
    assert _iso_cts_sizes(30, 4, 0.8) == (22, 2)  # round(6 / 4) = 2: 8 task-specific directions
    assert _iso_cts_sizes(8, 4, 0.8) == (8, 0)  # round(0.5) = 0: only the common subspace
    assert _iso_cts_sizes(6, 4, 0.0) == (2, 1)  # round(1.5) · 4 = 8 > 6: rounded down instead


@pytest.mark.parametrize("op, params, message", [
    (star, {"eta": 0}, "eta: must be in \\(0, 100\\], got 0"),
    (star, {"eta": 101}, "eta: must be in \\(0, 100\\]"),
    (tsv, {"rank_fraction": 1.5}, "rank_fraction: must be in \\(0, 1\\]"),
    (tsv, {"alpha": float("nan")}, "alpha: must be a finite number"),
    (iso_cts, {"common_space_fraction": -0.1}, "common_space_fraction: must be in \\[0, 1\\]"),
    (iso_c, {"alpha": "big"}, "alpha: must be a finite number, got 'big'"),
    (model_stock, {"alpha": 1.0}, "takes no parameters; got alpha"),
])
def test_bad_parameters_are_refused(op, params, message):
    with pytest.raises(ConfigError, match=message):
        op.resolve_params(params)


def test_parameters_resolve_with_defaults_and_typed():
    assert star.resolve_params({"eta": 40}) == {"eta": 40.0} and isinstance(star.resolve_params({"eta": 40})["eta"], float)
    assert tsv.resolve_params(None) == {"alpha": 1.0, "rank_fraction": None}
    assert iso_cts.resolve_params({"alpha": 1.5}) == {"alpha": 1.5, "common_space_fraction": 0.8}
    with pytest.raises(ConfigError, match="^merge.params.star.eta: must be in"):
        star.resolve_params({"eta": -1}, key=lambda p: f"merge.params.star.{p}")


# ------------------------------------------------------------- merge.params: config → the merge stage


@pytest.fixture(scope="module")
def branch_run(tmp_path_factory):
    """θ(0) and two trained-looking branches laid out as a run's ``branches/<k>/`` with their manifests."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from merit.models.loading import checkpoint_hash

    root = tmp_path_factory.mktemp("merge_params")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "theta0")
    h = checkpoint_hash(root / "theta0")
    for k in range(2):
        torch.manual_seed(k + 1)
        folder = root / "variant" / "branches" / str(k)
        LlamaForCausalLM(cfg).save_pretrained(folder)
        (folder / "manifest.json").write_text(json.dumps({"key": f"branch{k}", "theta0": str(root / "theta0"),
                                                          "theta0_hash": h}))
    return root


def _stage_merge(root, ops, params=None, target_root=None):
    from merit.config import load_config
    from merit.pipeline import Variant, check, stage_merge

    cfg = load_config({"model": {"preset": "tiny"}, "mixture": {"builtin": {}},
                       "merge": {"operators": ops, **({"params": params} if params is not None else {})}})
    check(cfg)
    variant = Variant("merit-r1", "pca-median", target_root or root / "variant", ops, 1, plan={"weights": [0.75, 0.25]})
    if target_root is not None and not (target_root / "branches").exists():
        import shutil

        shutil.copytree(root / "variant" / "branches", target_root / "branches")
    return stage_merge(cfg, [variant], {"merit-r1": ["branch0", "branch1"]})


def test_unset_params_keep_the_merge_keys_of_earlier_runs(branch_run, tmp_path):
    from merit import artifacts

    merged = _stage_merge(branch_run, ["token-weighted", "ties"], target_root=tmp_path / "a")
    for op, row in (("token-weighted", "merit-r1"), ("ties", "merit-r1-ties")):
        # The key formula before merge.params existed: old run folders still resume.
        assert merged[row][1] == artifacts.fingerprint("merge", op, ["branch0", "branch1"], [0.75, 0.25])
    # A default written out is the same merge, hence the same key.
    again = _stage_merge(branch_run, ["ties"], {"ties": {"density": 0.2}}, target_root=tmp_path / "a")
    assert again["merit-r1-ties"][1] == merged["merit-r1-ties"][1]


def test_params_reach_the_operator_and_the_key(branch_run, tmp_path):
    from safetensors.torch import load_file

    from merit.merge.operators import ties

    default = _stage_merge(branch_run, ["ties"], target_root=tmp_path / "d")["merit-r1-ties"]
    dense = _stage_merge(branch_run, ["ties"], {"ties": {"density": 0.6}}, target_root=tmp_path / "e")["merit-r1-ties"]
    assert dense[1] != default[1]
    a, b = (load_file(str(p / "model.safetensors")) for p, _ in (default, dense))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[name], b[name])
    states = [load_file(str(branch_run / "variant" / "branches" / str(k) / "model.safetensors")) for k in range(2)]
    base = load_file(str(branch_run / "theta0" / "model.safetensors"))
    expected = ties([s[name] for s in states], [0.75, 0.25], base=base[name], density=0.6)
    torch.testing.assert_close(b[name], expected, rtol=0, atol=1e-6)
    import json

    assert json.loads((dense[0] / "manifest.json").read_text())["params"] == {"density": 0.6, "lam": 1.0}
    # An SVD operator through the same stage, with its own parameter.
    star_row = _stage_merge(branch_run, ["star"], {"star": {"eta": 70}}, target_root=tmp_path / "s")["merit-r1-star"]
    out = load_file(str(star_row[0] / "model.safetensors"))
    torch.testing.assert_close(out[name], star([s[name] for s in states], [0.75, 0.25], base=base[name], eta=70.0),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ({"ties": {"eta": 40}}, r"^merge\.params\.ties\.eta: merge operator 'ties' takes density, lam; got eta$"),
    ({"ties": {"density": 1.5}}, r"^merge\.params\.ties\.density: must be in \(0, 1\], got 1\.5$"),
    ({"ties": {"density": 0}}, r"^merge\.params\.ties\.density: must be in \(0, 1\], got 0$"),
    ({"star": {"eta": 400}}, r"^merge\.params\.star\.eta: must be in \(0, 100\]"),
    ({"nope": {"x": 1}}, r"^merge\.params\.nope: unknown merge 'nope'; known: dare, "),
    ({"model-stock": {"alpha": 1}}, r"^merge\.params\.model-stock\.alpha: .* takes no parameters"),
])
def test_bad_merge_params_are_config_errors_naming_the_key(params, message):
    from merit.config import load_config
    from merit.pipeline import check

    cfg = load_config({"model": {"preset": "tiny"}, "mixture": {"builtin": {}}, "merge": {"params": params}})
    with pytest.raises(ConfigError, match=message):
        check(cfg)


def test_merit_run_refuses_bad_merge_params_before_any_work(tmp_path, capsys):
    import yaml

    from merit.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "mixture": {"builtin": {}},
                                   "merge": {"operators": ["ties"], "params": {"ties": {"density": 2}}}}))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 2
    assert "merge.params.ties.density: must be in (0, 1]" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("failing", ["float32", "all"])
def test_svd_that_fails_to_converge_is_retried(monkeypatch, failing):
    # LAPACK's gesdd can fail on Iso-CTS's rank-deficient residuals (seen on a 576×576 matrix in the
    # benchmark): the SVD is retried in fp64, then taken from the Gram matrix's eigendecomposition.
    base, branches, weights = _problem((40, 30), seed=11)
    base, branches = base.float(), [b.float() for b in branches]
    expected = iso_cts(branches, weights, base=base)
    real_svd = torch.linalg.svd

    def flaky(m, *args, **kwargs):
        if failing == "all" or m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real_svd(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    out = iso_cts(branches, weights, base=base)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
