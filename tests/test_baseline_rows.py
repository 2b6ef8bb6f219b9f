"""The paper's comparison grid as rows: joint at several budgets, uniform soups, random at several K,
the conflict-induced greedy split and raw-Gram PCA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from merit.cli import main
from merit.split.partition import SplitInputs, conflict_greedy_groups, pca_median, pca_median_raw

from conftest import make_mixture_dir

NAMES = ["upper_copy", "upper_rev", "lower_copy", "lower_rev"]


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("grid")
    mix = make_mixture_dir(root / "mix", names=NAMES, n_train=16, n_eval=4)
    cfg = {
        "model": {"path": str(tiny_checkpoint)},
        "mixture": {"dir": str(mix), "max_length": 48},
        "grads": {"calibration_size": 8, "batch_size": 8},
        "split": {"r": 1},
        "train": {"batch_size": 8, "learning_rate": 1e-3},
        "baselines": {"joint_epochs": [0.5, 1, 2], "soups": [2], "random_k": [2, 4]},
        "eval": {"max_per_source": 4, "batch_size": 16, "max_new_tokens": 6, "bootstrap": 100},
        "launch": {"save_steps": None},
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    return out


def test_grid_rows_in_the_papers_order(grid_run):
    methods = json.loads((grid_run / "results.json").read_text())["methods"]
    assert list(methods) == ["base", "joint-0.5ep", "joint", "joint-2ep", "soup-2", "merit-r1", "merit-r1-uniform",
                             "random-k2", "random-k4"]
    report = (grid_run / "report.md").read_text()
    assert "the paper's Table 2" in report and "the paper's Table 12" in report


def test_joint_budgets_train_in_proportion(grid_run):
    steps = {row: json.loads((grid_run / folder / "manifest.json").read_text())["steps"]
             for row, folder in (("0.5", "baselines/joint-0.5ep"), ("1", "joint"), ("2", "baselines/joint-2ep"))}
    assert steps["2"] == 2 * steps["1"] and steps["0.5"] == pytest.approx(steps["1"] / 2, abs=1)


def test_soup_is_the_uniform_average_of_runs_with_different_data_orders(grid_run):
    joint = load_file(grid_run / "joint" / "model.safetensors")
    other = load_file(grid_run / "baselines" / "soups" / "1" / "model.safetensors")
    soup = load_file(grid_run / "baselines" / "soup-2" / "model.safetensors")
    assert any(not (joint[k] == other[k]).all() for k in joint)  # another data order, other weights
    for k in joint:
        expected = (joint[k].double() + other[k].double()) / 2
        assert (soup[k].double() - expected).abs().max() < 1e-6, k
    assert json.loads((grid_run / "baselines/soups/1/manifest.json").read_text())["seed"] == 1


def test_random_splits_at_each_k(grid_run):
    for k in (2, 4):
        plan = json.loads((grid_run / "baselines" / f"random-k{k}" / "split" / "plan.json").read_text())
        assert len(plan["groups"]) == k and sorted(s for g in plan["groups"] for s in g) == sorted(NAMES)


def test_conflict_greedy_separates_a_planted_conflict():
    # two families: +0.6 within, -0.5 across; the most conflicting pair is (0, 3)
    fam = np.array([0, 0, 1, 1, 0, 1])
    c = np.where(fam[:, None] == fam[None, :], 0.6, -0.5)
    c[0, 3] = c[3, 0] = -0.9
    np.fill_diagonal(c, 1.0)
    groups = conflict_greedy_groups(c, "separate")
    assert groups == [[0, 1, 4], [2, 3, 5]]
    literal = conflict_greedy_groups(c, "literal")  # the sentence read verbatim mixes the families
    assert all(len(set(fam[g])) == 2 for g in literal if len(g) > 1)


def test_raw_gram_pca_on_planted_families_and_the_gram_the_pipeline_builds(grid_run):
    fam = np.array([0, 0, 0, 1, 1, 1])
    c = np.where(fam[:, None] == fam[None, :], 0.8, -0.2)
    np.fill_diagonal(c, 1.0)
    samples = np.ones(6)
    norms = np.array([3.0, 1, 2, 1, 5, 1])
    x = SplitInputs(c, samples, samples, 1, 0, gram=np.outer(norms, norms) * c)
    assert sorted(pca_median(x)) == sorted(pca_median_raw(x)) == [[0, 1, 2], [3, 4, 5]]
    # the Gram matrix the split stage hands over (stored norms × C) is G Gᵀ of the stored vectors
    from merit.conflict.store import load_conflict, load_vectors

    names, conflict = load_conflict(grid_run / "grads")
    g = load_vectors(grid_run / "grads", names).astype(np.float64)
    manifest = json.loads((grid_run / "grads" / "manifest.json").read_text())
    stored = np.array([e["norm"] for e in manifest["sources"]])
    np.testing.assert_allclose(np.outer(stored, stored) * conflict, g @ g.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("baselines, needle", [
    ({"joint_epochs": [0, 1]}, "baselines.joint_epochs"),
    ({"joint_epochs": [-1]}, "must be > 0"),
    ({"soups": [1]}, "a soup needs at least 2 runs"),
    ({"random_k": [3]}, "power of 2"),
    ({"random_k": [8]}, "baselines.random_k[0]: K = 8 random groups need at least 8 sources"),
    ({"joint": False, "soups": [2]}, "baselines.soups: needs baselines.joint: true"),
])
def test_bad_grid_settings_fail_before_any_work(tmp_path, capsys, tiny_checkpoint, baselines, needle):
    mix = make_mixture_dir(tmp_path / "mix", names=NAMES, n_train=8, n_eval=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix)},
                                    "split": {"r": 1}, "baselines": baselines}))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("merit: error: ") and needle in err[-1], err
    assert not out.exists()


def test_conflict_greedy_needs_r1(tmp_path, capsys, tiny_checkpoint):
    mix = make_mixture_dir(tmp_path / "mix", names=NAMES, n_train=8, n_eval=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix)},
                                    "split": {"method": "conflict-greedy", "r": 2}}))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "set split.r: 1" in capsys.readouterr().err


# ------------------------------------------------------------------ residual conflicts (a research row)


def test_residual_gram_and_cosines_equal_those_of_explicit_residual_vectors():
    from merit.conflict.cosine import cosine_from_gram, cosine_matrix, residual_gram

    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 40))
    w = np.array([1.0, 2.0, 3.0, 1.0, 5.0])
    mean = (w / w.sum()) @ g
    np.testing.assert_allclose(residual_gram(g @ g.T, w), (g - mean) @ (g - mean).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cosine_from_gram(g @ g.T), cosine_matrix(g), rtol=1e-10, atol=1e-12)
    # Weighted residuals sum to zero: Σ_i w_i ⟨r_i, r_j⟩ = 0 for every j.
    np.testing.assert_allclose(w @ residual_gram(g @ g.T, w), np.zeros(5), atol=1e-10)


def test_residuals_expose_conflicts_that_a_shared_direction_hides():
    from merit.conflict.cosine import cosine_from_gram, residual_gram

    # Four sources = a large shared direction (a common prompt format) ± a family direction: every
    # cosine is positive, the residuals are the families' ± directions (cosine −1 across families).
    common, fam = np.eye(3)[0] * 10, np.eye(3)[1]
    g = np.stack([common + fam, common + fam, common - fam, common - fam])
    cos = cosine_from_gram(g @ g.T)
    assert (cos > 0.95).all()
    res = cosine_from_gram(residual_gram(g @ g.T, np.ones(4)))
    np.testing.assert_allclose(res, [[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]], atol=1e-12)
    x = SplitInputs(res, np.ones(4), np.ones(4), 1, 0)
    assert sorted(pca_median(x)) == [[0, 1], [2, 3]]


def test_residual_split_in_the_pipeline(grid_run, tmp_path, capsys):
    import shutil

    from merit.conflict.cosine import cosine_matrix
    from merit.conflict.store import load_vectors

    copy = tmp_path / "run"
    shutil.copytree(grid_run / "grads", copy / "grads")
    shutil.copytree(grid_run / "theta0", copy / "theta0") if (grid_run / "theta0").exists() else None
    cfg = yaml.safe_load((grid_run / "config.yaml").read_text())
    cfg["split"]["conflict"] = "residual"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", str(path), "--out", str(copy), "--until", "split"]) == 0
    assert "split: merit-r1-residual:" in capsys.readouterr().err
    names = json.loads((copy / "split/conflict.json").read_text())["sources"]
    g = load_vectors(copy / "grads", names).astype(np.float64)
    samples = {e["name"]: e["samples"] for e in json.loads((copy / "mixture/manifest.json").read_text())["sources"]}
    w = np.array([samples[n] for n in names], dtype=np.float64)
    residual = g - (w / w.sum()) @ g
    np.testing.assert_allclose(json.loads((copy / "split/conflict.json").read_text())["matrix"],
                               cosine_matrix(residual), rtol=1e-4, atol=1e-5)
