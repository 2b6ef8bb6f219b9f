"""The grads and split stages in the pipeline: per-source reuse when sources are added, a changed setting
recomputes, plots and proxy right after the split stage (tiny model, built in the test session)."""

from __future__ import annotations

import json

import numpy as np
import yaml

from merit.cli import main
from merit.conflict import store
from merit.conflict.cosine import cosine_matrix

from conftest import FAMILIES, make_mixture_dir


def _mtimes(folder, names):
    return {n: (folder / f"{n}.safetensors").stat().st_mtime_ns for n in names}


def test_adding_sources_reuses_stored_gradients_and_a_new_setting_recomputes(tmp_path, tiny_checkpoint):
    names = list(FAMILIES)
    mix = make_mixture_dir(tmp_path / "mix", n_train=12, n_eval=2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_checkpoint)},
        "mixture": {"dir": str(mix), "include": names[:4], "max_length": 48},
        "grads": {"calibration_size": 6, "batch_size": 6, "sketch_dim": 4096},
        "split": {"r": 1},
    }))
    out = tmp_path / "run"
    grads = out / "grads"
    assert main(["run", str(cfg), "--out", str(out), "--until", "split"]) == 0
    # plots and the proxy come with the split stage, before any report
    assert (out / "split/conflict.png").exists() and (out / "split/pca.png").exists()
    plan = json.loads((out / "split/plan.json").read_text())
    assert {"method", "r", "sources", "groups", "samples", "tokens", "weights", "proxy"} <= set(plan)
    assert plan["proxy"] > 0
    first = _mtimes(grads, names[:4])

    include = "[" + ",".join(names) + "]"
    assert main(["run", str(cfg), "--out", str(out), "--until", "split", "--set", f"mixture.include={include}"]) == 0
    manifest = json.loads((grads / "manifest.json").read_text())
    assert [e["name"] for e in manifest["sources"]] == names
    assert sorted(manifest["computed"]) == sorted(names[4:])  # only the two new sources
    assert _mtimes(grads, names[:4]) == first  # the old files were not rewritten
    conflict = json.loads((out / "split/conflict.json").read_text())
    expected = cosine_matrix(store.load_vectors(grads, names))
    np.testing.assert_allclose(np.array(conflict["matrix"]), expected, atol=1e-12)

    # another compression setting: every source's key changes, nothing is reused
    assert main(["run", str(cfg), "--out", str(out), "--until", "grads", "--set", f"mixture.include={include}",
                 "--set", "grads.sketch_dim=512"]) == 0
    manifest = json.loads((grads / "manifest.json").read_text())
    assert sorted(manifest["computed"]) == sorted(names) and manifest["dim"] == 512
