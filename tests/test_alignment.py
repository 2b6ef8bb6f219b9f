"""merit hessian-alignment: Lanczos, central differences and the alignment numbers on problems with known
answers, then the command on a tiny run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from merit.cli import main
from merit.diagnose import spectrum as S

# ------------------------------------------------------------------------------------------ pure math


def _symmetric(d: int, seed: int = 0, spectrum: np.ndarray | None = None):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    vals = np.sort(rng.uniform(-1, 1, d))[::-1] if spectrum is None else spectrum
    return (q * vals) @ q.T, vals, q


def test_lanczos_with_full_basis_gives_the_top_eigenpairs_exactly():
    a, vals, q = _symmetric(40)
    start = np.random.default_rng(1).standard_normal(40)
    lz = S.lanczos(lambda v: a @ v, start, iterations=40, top=5)
    assert np.allclose(lz.values, vals[:5], atol=1e-9)
    assert np.allclose(np.abs(np.sum(lz.vectors * q[:, :5].T, axis=1)), 1.0, atol=1e-7)
    for value, vector in zip(lz.values, lz.vectors):
        assert np.linalg.norm(a @ vector - value * vector) < 1e-7


def test_lanczos_converges_on_well_separated_top_eigenvalues_in_few_iterations():
    spectrum = np.concatenate([[10.0, 8.0, 6.0], np.linspace(1.0, -1.0, 297)])
    a, vals, q = _symmetric(300, seed=2, spectrum=spectrum)
    lz = S.lanczos(lambda v: a @ v, np.ones(300), iterations=30, top=3)
    assert np.allclose(lz.values, [10.0, 8.0, 6.0], atol=1e-6)
    assert np.all(lz.residuals < 1e-3)


def test_lanczos_chunked_float32_memmap_basis_agrees_with_in_memory(tmp_path):
    a, _, _ = _symmetric(50, seed=3)
    start = np.random.default_rng(4).standard_normal(50)
    ref = S.lanczos(lambda v: a @ v, start, iterations=20, top=4)
    basis = np.lib.format.open_memmap(tmp_path / "b.npy", mode="w+", dtype=np.float32, shape=(21, 50))
    chunked = S.lanczos(lambda v: a @ v, start, iterations=20, top=4, basis=basis, chunk=7)
    assert np.allclose(chunked.values, ref.values, atol=1e-5)
    assert chunked.vectors.dtype == np.float32
    # the stored basis is orthonormal to float32 rounding: the full reorthogonalisation at work
    b = np.asarray(basis[:20], dtype=np.float64)
    assert np.abs(b @ b.T - np.eye(20)).max() < 1e-5


def test_lanczos_stops_at_an_invariant_subspace():
    a = np.diag([3.0, 2.0, 1.0, 0.0, 0.0])
    lz = S.lanczos(lambda v: a @ v, np.array([1.0, 1.0, 0.0, 0.0, 0.0]), iterations=5, top=5)
    assert lz.iterations == 2 and np.allclose(lz.values, [3.0, 2.0])


def test_central_difference_hvp_is_exact_on_a_quadratic_and_second_order_otherwise():
    a, _, _ = _symmetric(12, seed=5)
    theta = np.random.default_rng(6).standard_normal(12)
    v = np.random.default_rng(7).standard_normal(12)
    hv = S.central_difference_hvp(lambda off: a @ (theta + off), v, epsilon=0.1)
    assert np.allclose(hv, a @ v, atol=1e-10)

    # L = Σ θ_i⁴ / 4: ∇ = θ³, H = diag(3θ²); the central difference errs by ε² v̂² · ‖v‖ (third derivative)
    def cubic(off):
        return (theta + off) ** 3

    exact = 3 * theta**2 * v
    errors = [np.abs(S.central_difference_hvp(cubic, v, eps) - exact).max() for eps in (0.1, 0.05)]
    assert errors[0] > 0 and errors[1] == pytest.approx(errors[0] / 4, rel=1e-6)


def test_quadrant_extremes_pick_the_farthest_point_of_each_quadrant():
    pts = np.array([[1.0, 1.0], [2.0, 2.0], [-1.0, 3.0], [-0.5, 0.5], [-2.0, -2.0], [0.3, -0.1]])
    assert S.quadrant_extremes(pts) == [1, 2, 4, 5]
    assert S.quadrant_extremes(pts[:2]) == [1]  # empty quadrants contribute nothing


def test_double_centred_embedding_recovers_planar_configuration():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((9, 2)) * [3.0, 1.0]
    x -= x.mean(axis=0)
    e = S.double_centred_embedding(x @ x.T, 2)
    dist = lambda p: np.linalg.norm(p[:, None] - p[None], axis=2)  # noqa: E731
    assert np.allclose(dist(e), dist(x), atol=1e-9)  # classical MDS: distances are kept exactly


def test_lifted_directions_are_orthonormal_and_span_the_gradients():
    rng = np.random.default_rng(9)
    g = rng.standard_normal((4, 30))
    raw = S.lifted_directions(g, 4)
    assert np.allclose(raw @ raw.T, np.eye(4), atol=1e-10)
    unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    assert np.allclose(unit @ raw.T @ raw, unit, atol=1e-10)  # each gradient lies in their span
    centred = S.lifted_directions(g, 4, centred=True)
    assert centred.shape == (3, 30)  # the mean is removed: rank n − 1
    assert np.allclose(centred @ centred.T, np.eye(3), atol=1e-10)
    # the centred gradients lie in their span
    assert np.allclose((unit - unit.mean(axis=0)) @ centred.T @ centred, unit - unit.mean(axis=0), atol=1e-10)


def test_alignment_of_a_contained_direction_is_perfect_and_random_is_near_zero():
    rng = np.random.default_rng(10)
    d = 4000
    eig, _ = np.linalg.qr(rng.standard_normal((d, 10)))
    eig = eig.T
    inside = S.alignment(eig[:3] + 0.0, eig, d)
    assert inside["max_abs_cos"] == pytest.approx(1.0) and inside["leading_principal_angle_deg"] == pytest.approx(0.0, abs=1e-5)
    random_dirs = rng.standard_normal((3, d))
    outside = S.alignment(random_dirs, eig, d)
    assert abs(outside["z_vs_random"]) < 5
    assert outside["mean_top1_abs_cos"] == pytest.approx(outside["random_mean_top1_abs_cos"], rel=0.6)
    assert outside["leading_principal_angle_deg"] > 80


def test_spectrum_module_imports_no_stage_code():
    import ast

    tree = ast.parse(Path(S.__file__).read_text())
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert all(not m.startswith("merit") for m in imported), imported


# ------------------------------------------------------------------------------------------ command


@pytest.fixture(scope="module")
def grads_run(tmp_path_factory) -> Path:
    """The tiny preset on five built-in tasks, stopped after grads, with uncompressed gradients."""
    root = tmp_path_factory.mktemp("align")
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny-align", "model": {"preset": "tiny"},
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse", "first_letter"], "train_per_task": 16,
                                "eval_per_task": 2}, "max_length": 48},
        "prepare": {"examples_per_task": 8, "epochs": 1, "batch_size": 16},
        "grads": {"calibration_size": 8, "batch_size": 8, "compression": "none"},
    }))
    out = root / "run"
    assert main(["run", str(cfg), "--out", str(out), "--until", "grads"]) == 0
    return out


def _align(run: Path, *extra: str) -> dict:
    assert main(["hessian-alignment", str(run), "--iterations", "6", "--eigenvectors", "3",
                 "--hessian-examples", "8", "--random-tasks", "1", *extra]) == 0
    return json.loads((run / "alignment/alignment.json").read_text())


@pytest.fixture(scope="module")
def aligned(grads_run) -> dict:
    return _align(grads_run)


def test_alignment_command_writes_every_number(grads_run, aligned):
    report = aligned
    assert not list(grads_run.glob(".alignment.tmp-*")) and not (grads_run / "alignment/krylov.npy").exists()
    assert 1 <= len(report["quadrant_tasks"]) <= 4
    vals = report["hessian"]["eigenvalues"]
    assert len(vals) == 3 and vals == sorted(vals, reverse=True) and vals[0] > 0
    assert report["hessian"]["hvps"] == report["hessian"]["iterations"] <= 6
    assert 0 <= report["hessian"]["converged"] <= 3
    for kind in ("raw", "centred"):
        a = report["alignment"][kind]
        assert 0 < a["mean_top1_abs_cos"] <= a["max_abs_cos"] <= 1
        assert 0 <= a["leading_principal_angle_deg"] <= 90
    assert len(report["baselines"]["random_task_gradient_top1_abs_cos"]) == 1
    # Uncompressed stored gradients: the recomputed ones are the same vectors (same calibration examples).
    stored = np.array(report["stored_vs_exact"]["stored"])
    assert np.allclose(stored, report["stored_vs_exact"]["exact"], atol=1e-4)


def test_central_and_exact_hvps_find_the_same_top_eigenvalue(grads_run, aligned):
    central = aligned["hessian"]["eigenvalues"][0]
    exact = _align(grads_run, "--hvp", "exact")["hessian"]["eigenvalues"][0]
    assert central == pytest.approx(exact, rel=0.05)


def test_alignment_bad_input_is_refused_and_writes_nothing(grads_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(grads_run, run, ignore=shutil.ignore_patterns("alignment"))
    for extra, expect in ((["--eigenvectors", "20", "--iterations", "5"], "--eigenvectors 20 > --iterations 5"),
                          (["--epsilon", "0"], "--epsilon 0")):
        capsys.readouterr()
        assert main(["hessian-alignment", str(run), *extra]) == 2
        assert expect in capsys.readouterr().err
    shutil.rmtree(run / "grads")
    capsys.readouterr()
    assert main(["hessian-alignment", str(run)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[merit]")]
    assert len(err) == 1 and "no finished grads stage" in err[0]
    assert not (run / "alignment").exists()
