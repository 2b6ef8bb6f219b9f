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


def _grads_run(tmp_path, tiny_checkpoint, mix, name: str, **grads) -> tuple:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_checkpoint)},
        "mixture": {"dir": str(mix), "max_length": 48},
        "grads": {"calibration_size": 6, "batch_size": 3, "sketch_dim": 1024, **grads},
        "split": {"r": 1},
        # one torch thread in every process, so the float sums run in one order everywhere
        "launch": {"threads": 1, "cpus_per_branch": 1},
    }))
    out = tmp_path / name
    assert main(["run", str(cfg), "--out", str(out), "--until", "grads"]) == 0
    return out / "grads", json.loads((out / "grads" / "manifest.json").read_text())


def test_gradient_workers_store_bitwise_the_vectors_of_one_process(tmp_path, tiny_checkpoint):
    from safetensors.numpy import load_file

    names = list(FAMILIES)
    mix = make_mixture_dir(tmp_path / "mix", n_train=12, n_eval=2)
    one, m1 = _grads_run(tmp_path, tiny_checkpoint, mix, "one")
    two, m2 = _grads_run(tmp_path, tiny_checkpoint, mix, "two", workers=2)
    assert sorted(m2["computed"]) == sorted(names)  # every source computed, by the two worker processes
    logs = sorted(p.name for p in (two / ".workers").glob("*.log"))
    assert logs == ["0.log", "1.log"]
    for n in names:
        a, b = load_file(str(one / f"{n}.safetensors"))["g"], load_file(str(two / f"{n}.safetensors"))["g"]
        assert a.tobytes() == b.tobytes(), n
    assert [e["key"] for e in m1["sources"]] == [e["key"] for e in m2["sources"]]


def test_bf16_gradients_are_close_to_fp32_and_keyed_apart(tmp_path, tiny_checkpoint):
    from safetensors.numpy import load_file

    mix = make_mixture_dir(tmp_path / "mix", n_train=12, n_eval=2)
    fp32, m32 = _grads_run(tmp_path, tiny_checkpoint, mix, "fp32")
    bf16, m16 = _grads_run(tmp_path, tiny_checkpoint, mix, "bf16", precision="bf16")
    assert all(a["key"] != b["key"] for a, b in zip(m32["sources"], m16["sources"]))
    for n in FAMILIES:
        a, b = load_file(str(fp32 / f"{n}.safetensors"))["g"], load_file(str(bf16 / f"{n}.safetensors"))["g"]
        assert a.tobytes() != b.tobytes()  # bf16 matmuls did run
        assert float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) > 0.99
