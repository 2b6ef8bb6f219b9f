"""merit diagnose: the landscape math on problems with known answers, then the command on a tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from merit.cli import main
from merit.diagnose import landscape as L

# ------------------------------------------------------------------------------------------ pure math


def _linear_problem(n: int = 40, p: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)

    def loss(w: torch.Tensor) -> torch.Tensor:  # (1 / 2n) ‖Xw − y‖²: H = XᵀX / n exactly, everywhere
        return (X @ w - y).pow(2).sum() / (2 * n)

    return X, y, loss


def test_hvp_equals_explicit_hessian_product_for_squared_loss():
    X, _, loss = _linear_problem()
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, dtype=torch.float64)
    (hv,) = L.hessian_vector_product(lambda: loss(w), [w], [v])
    torch.testing.assert_close(hv, X.T @ X @ v / len(X), rtol=1e-12, atol=1e-12)


def test_predicted_gain_equals_measured_gain_on_a_quadratic():
    X, _, loss = _linear_problem()
    g = torch.Generator().manual_seed(1)
    branches = [torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = sum(w * b for w, b in zip(weights, branches))
    measured = L.measured_gain(weights, [float(loss(b)) for b in branches], float(loss(merged)))
    at = merged.clone().requires_grad_(True)
    curvatures = []
    for b in branches:
        d = b - merged  # δ_k − δ̄
        (hv,) = L.hessian_vector_product(lambda: loss(at), [at], [d])
        curvatures.append(L.quadratic_form([d], [hv]))
    predicted = L.predicted_gain(weights, curvatures)
    assert measured > 0.01  # a strictly convex loss: averaging helps, by a visible amount
    assert predicted == pytest.approx(measured, abs=1e-6, rel=0)
    assert L.gain_ratio(measured, predicted) == pytest.approx(1.0, abs=1e-6)


def test_second_difference_curvature_is_exact_on_a_quadratic():
    rng = np.random.default_rng(0)
    m = rng.standard_normal((6, 6))
    a, b = m @ m.T + np.eye(6), rng.standard_normal(6)
    theta, v = rng.standard_normal(6), rng.standard_normal(6)

    def loss(x):
        return 0.5 * x @ a @ x + b @ x + 3.0

    for eps in (0.01, 0.1, 1.0):  # a quadratic has no fourth-order term: exact whatever ε
        got = L.second_difference_curvature(loss(theta + eps * v), loss(theta), loss(theta - eps * v), eps)
        assert got == pytest.approx(float(v @ a @ v), rel=1e-6)
    with pytest.raises(ValueError):
        L.second_difference_curvature(1.0, 1.0, 1.0, 0.0)


def test_hvp_of_a_parameter_outside_the_loss_is_zero():
    a = torch.ones(3, requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    hv = L.hessian_vector_product(lambda: (a ** 3).sum(), [a, unused], [torch.ones(3), torch.ones(2)])
    torch.testing.assert_close(hv[0], 6 * torch.ones(3))  # d²/da² a³ = 6a
    torch.testing.assert_close(hv[1], torch.zeros(2))


def test_barrier_of_a_bump_between_two_minima_is_its_height():
    # Double well L(θ) = (θ² − 1)², minima at ±1 (loss 0), the bump at θ = 0 has height 1; the path
    # θ(α) = (1 − α)(−1) + α(+1) crosses it at α = 0.5, which the 21-point grid contains.
    alphas = L.alpha_grid(21)
    a, b = torch.tensor([-1.0]), torch.tensor([1.0])
    losses = [float((L.interpolate(a, b, t) ** 2 - 1).pow(2).sum()) for t in alphas]
    bar = L.barrier(alphas, losses)
    assert bar.height == pytest.approx(1.0, abs=1e-6) and bar.alpha == pytest.approx(0.5)
    assert bar.min_loss == pytest.approx(0.0, abs=1e-12)


def test_barrier_of_a_flat_or_convex_path_is_zero():
    alphas = L.alpha_grid(21)
    a, b = torch.randn(7), torch.randn(7)
    linear = [float(L.interpolate(a, b, t).sum()) for t in alphas]  # L(α) is the chord itself
    assert abs(L.barrier(alphas, linear).height) <= 1e-6
    convex = [float(L.interpolate(a, b, t).pow(2).sum()) for t in alphas]  # under the chord: barrier 0
    bar = L.barrier(alphas, convex)
    assert bar.height == 0.0 and bar.min_loss < min(convex[0], convex[-1]) + 1e-9


def test_interpolation_ends_are_the_checkpoints_exactly():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert torch.equal(L.interpolate(a, b, 0.0), a) and torch.equal(L.interpolate(a, b, 1.0), b)
    assert L.interpolate(a.bfloat16(), b.bfloat16(), 0.5).dtype == torch.bfloat16


def test_alpha_grid_needs_three_points():
    assert L.alpha_grid(3) == [0.0, 0.5, 1.0] and len(L.alpha_grid(21)) == 21
    with pytest.raises(ValueError):
        L.alpha_grid(2)


def test_parallel_axis_identity_tensor_by_tensor():
    g = torch.Generator().manual_seed(3)
    weights = [0.1, 0.6, 0.3]
    shapes = [(4, 5), (7,), (2, 3, 2)]
    deltas = {s: [torch.randn(s, generator=g) for _ in weights] for s in shapes}
    pa = L.ParallelAxis()
    for s in shapes:
        mean = pa.add(deltas[s], weights)
        torch.testing.assert_close(mean, sum(w * d.double() for w, d in zip(weights, deltas[s])))
    flat = [torch.cat([deltas[s][k].double().flatten() for s in shapes]) for k in range(3)]
    mean = sum(w * d for w, d in zip(weights, flat))
    assert pa.weighted_sq_norms == pytest.approx(float(sum(w * d.pow(2).sum() for w, d in zip(weights, flat))))
    assert pa.mean_sq_norm == pytest.approx(float(mean.pow(2).sum()))
    assert pa.spread > 0 and pa.relative_error < 1e-12
    # Weights that do not sum to 1 break the identity: the check can fail.
    broken = L.ParallelAxis()
    broken.add(deltas[shapes[0]], [0.5, 0.5, 0.5])
    assert broken.relative_error > 1e-3


def test_task_vector_gram_and_what_the_merge_keeps():
    g = torch.Generator().manual_seed(3)
    weights = [0.2, 0.3, 0.5]
    shapes = [(6, 4), (9,), (3, 2, 2)]
    taus = {s: [torch.randn(s, generator=g) for _ in weights] for s in shapes}
    gram = L.TaskVectorGram(len(weights) + 2)
    for s in shapes:
        merged = sum(w * t for w, t in zip(weights, taus[s]))
        gram.add(taus[s] + [merged, 2.0 * merged])  # a "joint" along the merge, twice as far
    flat = torch.stack([torch.cat([taus[s][k].flatten() for s in shapes]) for k in range(3)]).double()
    # Accumulated tensor by tensor = the Gram of the whole flattened vectors.
    np.testing.assert_allclose(gram.gram[:3, :3], (flat @ flat.T).numpy(), rtol=1e-12)
    geo = L.task_vector_geometry(gram.gram, weights, joint=True)
    tau_bar = sum(w * t for w, t in zip(weights, flat))
    assert geo["retention"] == pytest.approx([float(tau_bar @ t / (t @ t)) for t in flat])
    assert geo["merged_vs_weighted_sum"] < 1e-6  # float32 rounding of the merge built above
    assert geo["cos_merged_joint"] == pytest.approx(1.0) and geo["merged_over_joint_norm"] == pytest.approx(0.5)
    assert np.allclose(np.diag(geo["pair_cosines"]), 1.0)

    # Orthogonal updates: the merge keeps exactly w_k of each branch's own update; equal updates: all of it.
    eye = np.eye(3) * np.array([4.0, 1.0, 9.0])
    w = np.array(weights)
    ortho = np.zeros((4, 4))
    ortho[:3, :3] = eye
    ortho[3, :3] = ortho[:3, 3] = w * np.diag(eye)
    ortho[3, 3] = float(w @ eye @ w)
    geo = L.task_vector_geometry(ortho, weights, joint=False)
    assert geo["retention"] == pytest.approx(weights) and geo["mean_pair_cos"] == pytest.approx(0.0)
    same = np.ones((4, 4))
    geo = L.task_vector_geometry(same, weights, joint=False)
    assert geo["retention"] == pytest.approx([1.0] * 3) and geo["mean_pair_cos"] == pytest.approx(1.0)
    # A merge file that is not Σ w_k θ_k shows in the identity.
    wrong = ortho.copy()
    wrong[3, 3] *= 1.5
    assert L.task_vector_geometry(wrong, weights, joint=False)["merged_vs_weighted_sum"] > 0.1


def test_relative_noise_scales_with_each_tensors_rms_and_auc():
    g = torch.Generator().manual_seed(0)
    big, small = torch.full((200, 200), 3.0), torch.full((200, 200), 0.01)
    rms_ratio = (L.relative_gaussian_noise(big, 0.1, g).std() / L.relative_gaussian_noise(small, 0.1, g).std())
    assert float(rms_ratio) == pytest.approx(300.0, rel=0.02)
    assert float(L.relative_gaussian_noise(torch.zeros(5), 0.1, g).abs().sum()) == 0.0
    # Trapezoid from the origin: ΔL = σ² at σ ∈ {0.01, 0.05, 0.1}.
    s = [0.01, 0.05, 0.1]
    expected = 0.01 * 1e-4 / 2 + 0.04 * (1e-4 + 25e-4) / 2 + 0.05 * (25e-4 + 1e-2) / 2
    assert L.flatness_auc(s, [x * x for x in s]) == pytest.approx(expected)


def test_math_module_imports_no_stage_code():
    import ast

    tree = ast.parse(Path(L.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m.split(".")[0] for m in imported if m} <= {"__future__", "collections", "dataclasses", "numpy", "torch"}


# ------------------------------------------------------------------------------------- on a tiny run

FAST = {
    "grads": {"calibration_size": 8, "batch_size": 8},
    "train": {"batch_size": 8, "learning_rate": 1e-3},
    "eval": {"max_per_source": 3, "batch_size": 16, "max_new_tokens": 4},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The embedded tiny preset on four built-in tasks, r = 1 (two branches), with joint and random-k2."""
    root = tmp_path_factory.mktemp("diag")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-diagnose", "model": {"preset": "tiny"},
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse"], "train_per_task": 16,
                                "eval_per_task": 3}, "max_length": 48},
        "prepare": {"examples_per_task": 8, "epochs": 1, "batch_size": 16},
        "split": {"r": 1}, **FAST,
    }))
    out = root / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    return out


def _weight_hashes(run: Path) -> dict[str, str]:
    from merit.artifacts import file_sha256

    return {str(p.relative_to(run)): file_sha256(p) for p in sorted(run.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def diagnosed(tiny_run) -> dict:
    before = _weight_hashes(tiny_run)
    assert main(["diagnose", str(tiny_run), "--alphas", "5", "--draws", "2"]) == 0
    # Weights are set in place in a loaded model: no checkpoint on disk may change (e.g. through a mapping).
    assert _weight_hashes(tiny_run) == before and len(before) >= 7
    return json.loads((tiny_run / "diagnose/diagnose.json").read_text())


def test_diagnose_json_has_every_number(tiny_run, diagnosed):
    d = diagnosed
    plan = json.loads((tiny_run / "split/plan.json").read_text())
    k = len(plan["groups"])
    paths = d["lmc"]["paths"]
    assert len(paths) == k * (k - 1) // 2 + k  # every branch pair, and each branch to the merge
    assert {(p["from"], p["to"]) for p in paths} == {("branch 0", "branch 1"), ("branch 0", "merged"),
                                                     ("branch 1", "merged")}
    for p in paths:
        assert len(p["losses"]) == 5 and p["barrier"] >= 0.0
    # The ends of the branch → merge path are the branch's and the merge's own losses.
    to_merge = next(p for p in paths if p["to"] == "merged")
    assert to_merge["losses"][-1] == pytest.approx(d["losses"]["merged"], abs=1e-9)
    assert to_merge["losses"][0] == pytest.approx(d["losses"]["branches"][to_merge["from"]], abs=1e-9)

    disp = d["displacement"]
    assert set(disp["branches"]) == {"branch 0", "branch 1"} and disp["merged"] > 0 and disp["joint"] > 0
    assert disp["joint_over_merged"] == pytest.approx(disp["joint"] / disp["merged"])
    assert disp["parallel_axis"]["holds"] and disp["parallel_axis"]["spread"] > 0
    # ‖δ̄‖ of the identity is the merge file's displacement (the merge is Σ_k w_k θ_k).
    assert disp["parallel_axis"]["mean_sq_norm"] ** 0.5 == pytest.approx(disp["merged"], rel=1e-5)
    # The merge is inside the branches' convex hull, so it moved less than their weighted mean.
    assert disp["merged"] ** 2 <= disp["parallel_axis"]["weighted_sq_norms"]
    # Task-vector geometry from the same pass: norms match the displacements, ‖τ̄‖² = Σ_k w_k retention_k ‖τ_k‖².
    tv = disp["task_vectors"]
    assert tv["branch_norms"] == pytest.approx(list(disp["branches"].values()), rel=1e-9)
    assert tv["merged_norm"] == pytest.approx(disp["merged"], rel=1e-9)
    assert tv["merged_norm"] ** 2 == pytest.approx(
        sum(w * r * n ** 2 for w, r, n in zip(tv["weights"], tv["retention"], tv["branch_norms"])), rel=1e-9)
    assert tv["merged_vs_weighted_sum"] < 1e-6 and -1.0 <= tv["cos_merged_joint"] <= 1.0
    assert tv["merged_over_joint_norm"] == pytest.approx(1 / disp["joint_over_merged"], rel=1e-9)
    # The random split's merge, by its own pass: its weights, the same identity, the same joint.
    rv = disp["task_vectors_random"]
    random_weights = d["merge_gain"]["random-k2"]["weights"]
    assert rv["merge"] == "random-k2" and rv["weights"] == pytest.approx(random_weights)
    assert rv["merged_norm"] ** 2 == pytest.approx(
        sum(w * r * n ** 2 for w, r, n in zip(rv["weights"], rv["retention"], rv["branch_norms"])), rel=1e-9)
    assert rv["merged_over_joint_norm"] * disp["joint"] == pytest.approx(rv["merged_norm"], rel=1e-9)

    assert set(d["loss_gap"]) == {"merged", "joint"}
    for row in d["loss_gap"].values():
        assert row["heldout_minus_train"] == pytest.approx(row["heldout"] - row["train"])

    assert set(d["merge_gain"]) == {"merit-r1", "random-k2"}
    for g in d["merge_gain"].values():
        assert g["measured"] == pytest.approx(sum(w * x for w, x in zip(g["weights"], g["branch_losses"]))
                                              - g["merged_loss"])
        assert g["predicted"] == pytest.approx(0.5 * sum(w * c for w, c in zip(g["weights"], g["curvatures"])))
        assert g["ratio"] is not None

    table = d["perturbation"]
    assert table["sigmas"] == [0.01, 0.05, 0.1] and set(table["models"]) == {"theta0", "merged", "joint"}
    for row in table["models"].values():
        assert len(row["delta_loss"]) == 3 and all(len(r) == 2 for r in row["delta_loss"])
        assert row["auc"] == pytest.approx(L.flatness_auc(table["sigmas"], row["mean"]))
    assert table["antithetic"] is True  # the default: ± pairs
    verdict = {c["check"]: c for c in d["checks"]}
    assert verdict["parallel_axis_relative_error"]["passed"] is True
    assert verdict["merged_loss_vs_results_json"]["passed"] is True
    assert {"lmc_barrier_relative", "displacement_joint_over_merged", "gain_measured_over_predicted[merit-r1]",
            "gain_measured_over_predicted[random-k2]", "flatness_auc_merged_minus_joint"} <= set(verdict)
    assert (tiny_run / "diagnose/lmc.png").stat().st_size > 0
    assert (tiny_run / "diagnose/perturbation.png").stat().st_size > 0


def test_merged_loss_equals_results_json(tiny_run, diagnosed):
    results = json.loads((tiny_run / "results.json").read_text())["methods"]
    assert diagnosed["losses"]["merged"] == pytest.approx(results["merit-r1"]["loss"], abs=1e-5)
    assert diagnosed["losses"]["joint"] == pytest.approx(results["joint"]["loss"], abs=1e-5)
    assert diagnosed["losses"]["theta0"] == pytest.approx(results["base"]["loss"], abs=1e-5)
    assert diagnosed["merge_gain"]["random-k2"]["merged_loss"] == pytest.approx(results["random-k2"]["loss"], abs=1e-5)


def test_model_curvature_matches_the_second_difference_of_the_loss(tiny_run):
    """(θ_k − θ̄)ᵀ H (θ_k − θ̄) by double backward, batch by batch, equals the finite second difference of
    the no-grad results.json loss along θ_k − θ̄: the HVP differentiates the loss that is measured."""
    from merit.diagnose.evaluator import Evaluator
    from merit.diagnose.inputs import LazyCheckpoint, inspect_run

    folder = inspect_run(tiny_run)
    ev = Evaluator(folder)
    merged, branch = LazyCheckpoint(folder.main.merged), LazyCheckpoint(folder.main.branches[0])
    d = {n: branch[n].float() - merged[n].float() for n in ev.floating}
    ev.load(merged)
    curvature, center = ev.curvature(d), ev.loss()
    eps = 0.1
    ev.set_weights(lambda n: merged[n] + eps * d[n] if n in d else merged[n])
    plus = ev.loss()
    ev.set_weights(lambda n: merged[n] - eps * d[n] if n in d else merged[n])
    minus = ev.loss()
    assert curvature > 0
    assert curvature == pytest.approx((plus - 2 * center + minus) / eps ** 2, rel=0.03)


def test_second_difference_gain_agrees_with_the_hvp_gain(tiny_run, diagnosed, tmp_path):
    """--curvature second-difference: the same measured gain (same losses), a prediction from two losses
    per branch that agrees with the double-backward one."""
    from merit.diagnose.cli import Settings, settings_key

    copy = _copy(tiny_run, tmp_path)
    assert main(["diagnose", str(copy), "--alphas", "5", "--draws", "1", "--curvature", "second-difference"]) == 0
    report = json.loads((copy / "diagnose/diagnose.json").read_text())
    for name, hvp in diagnosed["merge_gain"].items():
        sd = report["merge_gain"][name]
        assert hvp["curvature"] == "hvp" and sd["curvature"] == "second-difference" and sd["curvature_epsilon"] == 0.1
        assert sd["measured"] == pytest.approx(hvp["measured"], abs=1e-9)
        assert sd["curvatures"] == pytest.approx(hvp["curvatures"], rel=0.05)
        assert sd["predicted"] == pytest.approx(hvp["predicted"], rel=0.05)
    # Stored diagnoses keep their stage keys: an added setting enters the key only when changed.
    default = Settings([0.0, 1.0], None, None, [0.1], 1, None)
    assert "curvature" not in settings_key(default)
    assert settings_key(Settings([0.0, 1.0], None, None, [0.1], 1, None, curvature="second-difference"))["curvature"]


# ------------------------------------------------------------------------------------------ bad input


def _refused(capsys, run: Path, *extra: str) -> str:
    capsys.readouterr()
    assert main(["diagnose", str(run), *extra]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[merit]")]
    assert len(err) == 1 and err[0].startswith("merit: error: "), err
    assert not (run / "diagnose").exists()
    return err[0]


def _copy(tiny_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("diagnose"))
    return copy


def test_alpha_grid_of_two_points_is_refused(tiny_run, tmp_path, capsys):
    msg = _refused(capsys, _copy(tiny_run, tmp_path), "--alphas", "2")
    assert "--alphas 2" in msg and "at least 3" in msg


@pytest.mark.parametrize("eps", ["0", "1.5", "-0.1"])
def test_curvature_epsilon_outside_zero_one_is_refused(tiny_run, tmp_path, capsys, eps):
    msg = _refused(capsys, _copy(tiny_run, tmp_path), "--curvature", "second-difference", "--curvature-epsilon", eps)
    assert "--curvature-epsilon" in msg


def test_second_difference_on_a_bfloat16_run_is_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["dtype"] = "bfloat16"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    msg = _refused(capsys, run, "--curvature", "second-difference")
    assert "model.dtype=bfloat16" in msg and "--curvature hvp" in msg
    # In the pipeline the same pairing is refused before any work.
    out = tmp_path / "pipeline"
    assert main(["run", str(run / "config.yaml"), "--out", str(out), "--set", "diagnose.enabled=true",
                 "--set", "diagnose.curvature=second-difference"]) == 2
    assert "diagnose.curvature=second-difference" in capsys.readouterr().err and not out.exists()


def test_run_without_branches_is_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    shutil.rmtree(run / "branches")
    assert "no finished branch" in _refused(capsys, run)


def test_run_without_merge_is_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    shutil.rmtree(run / "merged")
    assert "no finished token-weighted merge" in _refused(capsys, run)


def test_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "not a merit run folder" in _refused(capsys, tmp_path / "empty")


def test_branches_from_different_theta0_are_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    manifest = run / "branches/1/manifest.json"
    m = json.loads(manifest.read_text())
    m["theta0_hash"] = "0" * 64
    manifest.write_text(json.dumps(m))
    msg = _refused(capsys, run)
    assert "branches/1/manifest.json" in msg and "must share θ(0)" in msg


def test_joint_from_another_theta0_is_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    manifest = run / "joint/manifest.json"
    m = json.loads(manifest.read_text())
    m["theta0_hash"] = "f" * 64
    manifest.write_text(json.dumps(m))
    assert "joint/manifest.json" in _refused(capsys, run)


# ------------------------------------------------------------------------------------------ merit probe


def test_probe_trains_two_random_halves_and_gives_a_verdict(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-probe", "model": {"preset": "tiny"},
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse"], "train_per_task": 16,
                                "eval_per_task": 3}, "max_length": 48},
        "prepare": {"examples_per_task": 8, "epochs": 1, "batch_size": 16},
        "split": {"r": 2}, "merge": {"operators": ["token-weighted", "uniform"]}, **FAST,
    }))
    out = tmp_path / "probe"
    assert main(["probe", str(cfg), "--out", str(out), "--fraction", "0.5", "--alphas", "3", "--draws", "1"]) == 0
    probe = json.loads((out / "probe.json").read_text())
    report = json.loads((out / "diagnose/diagnose.json").read_text())
    # Two random halves at half an epoch, one merge: the run's own r = 2 and second operator are overridden.
    branches = sorted(p.name for p in (out / "branches").iterdir() if p.is_dir())
    assert len(branches) == 2, branches
    assert isinstance(probe["merge_ready"], bool) and report["lmc"]["alphas"] == [0.0, 0.5, 1.0]
    assert probe["fraction"] == 0.5 and probe["thresholds"]["barrier_relative"] == 0.01
    assert any("LMC barrier" in r for r in probe["reasons"]) and any("merge gain" in r for r in probe["reasons"])
    # The verdict is the thresholds applied to the numbers in diagnose.json, not a constant.
    worst = max(report["lmc"]["paths"], key=lambda p: p["barrier"])
    scale = (worst["losses"][0] + worst["losses"][-1]) / 2
    gain = report["merge_gain"][report["main"]]["measured"]
    assert probe["merge_ready"] == (worst["barrier"] <= 0.01 * scale and gain >= 0)
    assert "verdict: θ(0) is" in capsys.readouterr().out
    # A run the diagnosis cannot read is refused before any training (the diagnose stage's checks).
    out2 = tmp_path / "probe-lora"
    assert main(["probe", str(cfg), "--out", str(out2), "--set", "train.lora.r=4"]) == 2
    assert "diagnose.enabled" in capsys.readouterr().err and not out2.exists()


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.25"])
def test_probe_fraction_outside_zero_one_is_refused(tmp_path, capsys, fraction):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "p", "model": {"preset": "tiny"},
                                   "mixture": {"builtin": {"tasks": ["to_upper", "add"]}}}))
    out = tmp_path / "probe"
    assert main(["probe", str(cfg), "--out", str(out), "--fraction", fraction]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fraction" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------- the diagnose stage


def test_diagnose_stage_in_the_pipeline_writes_checks_and_resumes(tiny_run, tmp_path, capsys):
    copy = _copy(tiny_run, tmp_path)
    flags = ["--set", "diagnose.enabled=true", "--set", "diagnose.alphas=3", "--set", "diagnose.draws=1"]
    assert main(["run", str(copy / "config.yaml"), "--out", str(copy), *flags]) == 0
    report = json.loads((copy / "diagnose/diagnose.json").read_text())
    results = json.loads((copy / "results.json").read_text())["methods"]
    assert report["lmc"]["alphas"] == [0.0, 0.5, 1.0] and report["key"]
    assert report["losses"]["merged"] == pytest.approx(results["merit-r1"]["loss"], abs=1e-5)
    assert "Merge-readiness checks" in (copy / "report.md").read_text()
    assert "lmc_barrier_relative" in (copy / "report.html").read_text()
    # Nothing changed: the stage is skipped; a changed setting redoes it.
    stamp = (copy / "diagnose/diagnose.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", str(copy / "config.yaml"), "--out", str(copy), *flags]) == 0
    assert "diagnose: up to date" in capsys.readouterr().err
    assert (copy / "diagnose/diagnose.json").stat().st_mtime_ns == stamp
    assert main(["run", str(copy / "config.yaml"), "--out", str(copy), *flags[:4], "--set", "diagnose.draws=2"]) == 0
    assert json.loads((copy / "diagnose/diagnose.json").read_text())["perturbation"]["draws"] == 2


def test_a_stopped_diagnose_stage_resumes_from_what_it_computed(tiny_run, tmp_path, monkeypatch):
    """Stopped after 7 losses, the stage's rerun computes only the rest and writes the numbers of an
    uninterrupted diagnosis; the memo is gone once diagnose.json is written."""
    from merit.diagnose.evaluator import Evaluator

    flags = ["--set", "diagnose.enabled=true", "--set", "diagnose.alphas=3", "--set", "diagnose.draws=1"]
    real, calls = Evaluator.loss, []

    def counted(self, examples=None):
        calls.append(1)
        return real(self, examples)

    def stopping(self, examples=None):
        if len(calls) == 7:
            raise RuntimeError("stopped")
        return counted(self, examples)

    monkeypatch.setattr(Evaluator, "loss", counted)
    whole = _copy(tiny_run, tmp_path / "whole")
    assert main(["run", str(whole / "config.yaml"), "--out", str(whole), *flags]) == 0
    expected, total = json.loads((whole / "diagnose/diagnose.json").read_text()), len(calls)

    stopped = _copy(tiny_run, tmp_path / "stopped")
    calls.clear()
    monkeypatch.setattr(Evaluator, "loss", stopping)
    assert main(["run", str(stopped / "config.yaml"), "--out", str(stopped), *flags]) == 1
    memo = stopped / ".diagnose-memo.json"
    assert len(json.loads(memo.read_text())["values"]) == 7 and not (stopped / "diagnose").exists()

    calls.clear()
    monkeypatch.setattr(Evaluator, "loss", counted)
    assert main(["run", str(stopped / "config.yaml"), "--out", str(stopped), *flags]) == 0
    assert len(calls) == total - 7 and not memo.exists()
    got = json.loads((stopped / "diagnose/diagnose.json").read_text())
    assert [x for p in got["lmc"]["paths"] for x in p["losses"]] == pytest.approx(
        [x for p in expected["lmc"]["paths"] for x in p["losses"]], rel=1e-12)
    for name, g in expected["merge_gain"].items():
        assert got["merge_gain"][name]["measured"] == pytest.approx(g["measured"], rel=1e-12)
        assert got["merge_gain"][name]["curvatures"] == pytest.approx(g["curvatures"], rel=1e-9)
    for label, row in expected["perturbation"]["models"].items():
        assert got["perturbation"]["models"][label]["mean"] == pytest.approx(row["mean"], rel=1e-9, abs=1e-12)
    # A memo of other settings (another key) is never read.
    (stopped / ".diagnose-memo.json").write_text(json.dumps({"key": "other", "values": {"heldout/merged": 0.0}}))
    assert main(["run", str(stopped / "config.yaml"), "--out", str(stopped), *flags[:4], "--set", "diagnose.draws=2"]) == 0
    assert json.loads((stopped / "diagnose/diagnose.json").read_text())["losses"]["merged"] == pytest.approx(
        expected["losses"]["merged"], rel=1e-12)


@pytest.mark.parametrize("setting, key", [("diagnose.alphas=2", "diagnose.alphas"),
                                          ("diagnose.sigmas=[0.0]", "diagnose.sigmas"),
                                          ("merge.operators=[uniform]", "diagnose.enabled")])
def test_diagnose_stage_settings_are_checked_before_any_work(tmp_path, capsys, setting, key):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "d", "model": {"preset": "tiny"}, "diagnose": {"enabled": True},
                                   "mixture": {"builtin": {"tasks": ["to_upper", "add"]}}}))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--set", setting]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[merit]")]
    assert len(err) == 1 and key in err[0], err
    assert not out.exists()
