"""Split methods (kmeans, manual, pca-median-tokens, ...), the merge-gain proxy, and `merit split --compare`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from merit import plugins
from merit.config import load_config
from merit.conflict.cosine import cosine_matrix
from merit.errors import ConfigError
from merit.split.partition import (SplitInputs, kmeans_labels, kmeans_split, manual_split, pca_median,
                                   pca_median_tokens, validate_manual_groups)
from merit.split.proxy import compare, merge_gain_proxy, proxy_share, total_dispersion


def _clusters(sizes: list[int], dim: int = 30, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Cosine matrix of sources drawn around ``len(sizes)`` orthogonal directions, and each one's cluster."""
    rng = np.random.default_rng(seed)
    rows, label = [], []
    for k, n in enumerate(sizes):
        centre = np.zeros(dim)
        centre[k] = 1.0
        for _ in range(n):
            rows.append(centre + noise * rng.standard_normal(dim))
            label.append(k)
    return cosine_matrix(np.array(rows)), label


def _inputs(c: np.ndarray, r: int = 1, samples=None, tokens=None, seed: int = 0, names=None,
            groups=None) -> SplitInputs:
    t = len(c)
    samples = np.ones(t, int) if samples is None else np.asarray(samples)
    tokens = samples * 10 if tokens is None else np.asarray(tokens)
    return SplitInputs(c, samples, tokens, r, seed, names or [f"s{i}" for i in range(t)], groups)


def test_kmeans_separates_two_obvious_clusters_even_when_unbalanced():
    c, label = _clusters([7, 3])
    groups = kmeans_split(_inputs(c, r=1))
    assert groups == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]  # unbalanced: k-means does not balance
    c4, label4 = _clusters([3, 4, 2, 5], seed=1)
    groups4 = kmeans_split(_inputs(c4, r=2))
    assert sorted(sorted({label4[i] for i in g}) for g in groups4) == [[0], [1], [2], [3]]


def test_kmeans_is_seeded_and_never_leaves_a_group_empty():
    c, _ = _clusters([5, 5], seed=3)
    a = kmeans_labels(c, 4, seed=11)
    assert np.array_equal(a, kmeans_labels(c, 4, seed=11))
    same = np.ones((6, 6))  # every source identical: still K non-empty groups
    groups = kmeans_split(_inputs(same, r=2))
    assert len(groups) == 4 and all(groups) and sorted(i for g in groups for i in g) == list(range(6))
    with pytest.raises(ValueError, match="cannot form 8"):
        kmeans_labels(np.eye(5), 8, seed=0)


def test_pca_median_tokens_balances_tokens_not_samples():
    # one axis: sources ordered along it; equal sample counts, but the first source holds most tokens
    angles = np.linspace(0, np.pi / 2, 6)
    c = cosine_matrix(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    samples = np.ones(6, int)
    tokens = np.array([1000, 10, 10, 10, 10, 10])
    by_samples = pca_median(_inputs(c, samples=samples, tokens=tokens))
    by_tokens = pca_median_tokens(_inputs(c, samples=samples, tokens=tokens))
    assert sorted(len(g) for g in by_samples) == [3, 3]
    assert sorted(len(g) for g in by_tokens) == [1, 5] and [0] in by_tokens


def test_manual_groups_map_names_and_report_every_problem():
    names = ["a", "b", "c", "d"]
    assert validate_manual_groups([["c", "a"], ["b", "d"]], names) == [[0, 2], [1, 3]]
    x = _inputs(np.eye(4), names=names, groups=[["a"], ["b", "c", "d"]])
    assert manual_split(x) == [[0], [1, 2, 3]]
    with pytest.raises(ConfigError) as e:
        validate_manual_groups([["a", "zz"], ["b", "a"]], names)
    msg = str(e.value)
    assert "unknown source(s) zz" in msg and "listed more than once: a" in msg
    assert "missing from every group: c, d" in msg
    with pytest.raises(ConfigError, match="needs the groups"):
        validate_manual_groups(None, names)
    with pytest.raises(ConfigError, match="at least one source"):
        validate_manual_groups([["a", "b", "c", "d"], []], names)


def test_manual_config_validation():
    base = {"model": {"path": "m"}, "mixture": {"dir": "d"}}
    with pytest.raises(ConfigError, match="split.method=manual needs split.groups"):
        load_config({**base, "split": {"method": "manual"}})
    with pytest.raises(ConfigError, match="used only with split.method=manual"):
        load_config({**base, "split": {"groups": [["a"], ["b"]]}})
    with pytest.raises(ConfigError, match="more than once: a"):
        load_config({**base, "split": {"method": "manual", "groups": [["a"], ["a", "b"]]}})
    cfg = load_config({**base, "split": {"method": "manual", "groups": [["a"], ["b"]]}})
    assert cfg.split.groups == [["a"], ["b"]]
    cfg = load_config(base)
    assert cfg.grads.compression == "countsketch" and cfg.grads.sketch_dim == 65536 and cfg.grads.stride == 5


@pytest.mark.parametrize("method", ["pca-median", "pca-median-tokens", "kmeans", "random", "manual"])
def test_same_seed_same_plan(method):
    c, _ = _clusters([4, 4, 4], seed=5)
    names = [f"s{i}" for i in range(12)]
    manual = [names[:6], names[6:]]
    x = _inputs(c, r=2, samples=np.arange(1, 13), tokens=np.arange(12, 0, -1) * 7, seed=4, names=names, groups=manual)
    fn = plugins.get("split", method)
    first = fn(x)
    assert fn(replace(x, conflict=c.copy())) == first
    assert sorted(i for g in first for i in g) == list(range(12)) and all(first)


# ---------------------------------------------------------------------------------------------- proxy


def test_proxy_reduces_to_sign_vector_form_for_two_balanced_groups():
    rng = np.random.default_rng(0)
    t = 8
    c = cosine_matrix(rng.standard_normal((t, 20)))
    groups = [[0, 2, 5, 7], [1, 3, 4, 6]]
    s = np.array([1 if i in groups[0] else -1 for i in range(t)])
    assert merge_gain_proxy(c, groups, np.ones(t)) == pytest.approx(s @ c @ s / t**2, rel=1e-12)


def test_proxy_equals_between_group_dispersion_of_unit_gradients():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((7, 12))
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    n = rng.integers(10, 100, 7).astype(float)
    groups = [[0, 1], [2, 3, 4], [5, 6]]
    mean = n @ u / n.sum()
    expected = sum(n[gr].sum() / n.sum() * np.sum((n[gr] @ u[gr] / n[gr].sum() - mean) ** 2) for gr in groups)
    c = cosine_matrix(g)
    assert merge_gain_proxy(c, groups, n) == pytest.approx(expected, rel=1e-10)
    assert proxy_share(c, [[i] for i in range(7)], n) == pytest.approx(1.0)
    assert merge_gain_proxy(c, [list(range(7))], n) == pytest.approx(0.0, abs=1e-12)
    assert total_dispersion(c, n) == pytest.approx(np.sum(n / n.sum() * np.sum((u - mean) ** 2, axis=1)))


def test_pca_median_beats_random_on_planted_conflict():
    c, _ = _clusters([6, 6], noise=0.3, seed=2)
    x = _inputs(c, r=1)
    rows = compare(c, x.tokens, {"pca-median": lambda: pca_median(x), "broken": lambda: 1 / 0},
                   random_draws=lambda s: plugins.get("split", "random")(replace(x, seed=s)), n_random=16)
    by = {r["method"]: r for r in rows}
    assert by["pca-median"]["vs_random"] > 1.5
    assert "division by zero" in by["broken"]["error"]
    assert any(m.startswith("random (mean of 16") for m in by)


# --------------------------------------------------------------------------------------- split --compare


def test_split_compare_prints_every_method_from_a_run_folder(tmp_path, capsys):
    from merit import artifacts
    from merit.cli import main
    from merit.config import dump_config
    from merit.conflict import store

    rng = np.random.default_rng(4)
    names = [f"t{i}" for i in range(8)]
    run = tmp_path / "run"
    keys = {n: f"k{n}" for n in names}
    for i, n in enumerate(names):
        vec = torch.from_numpy((rng.standard_normal(64) + 3 * (i % 2)).astype(np.float32))
        store.save_vector(run / "grads", n, vec, keys[n], calibration=4, tokens=40, norm=1.0)
    store.write_store_manifest(run / "grads", "stage-key", names, keys, {"method": "countsketch"})
    sources = [{"name": n, "samples": 10 + i, "tokens": 100 * (i + 1)} for i, n in enumerate(names)]
    artifacts.write_manifest(run / "mixture", "mix-key", sources=sources)
    cfg = load_config({"model": {"path": "m"}, "mixture": {"dir": "d"},
                       "split": {"r": 1, "method": "manual", "groups": [names[:3], names[3:]]}})
    (run / "config.yaml").write_text(dump_config(cfg))
    assert main(["split", "--compare", "--run", str(run), "--random-seeds", "8"]) == 0
    out = capsys.readouterr().out
    for m in ["pca-median", "pca-median-tokens", "kmeans", "manual", "random (mean of 8 seeds)"]:
        assert m in out
    assert main(["split", "--compare", "--run", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err

