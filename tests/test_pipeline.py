"""The pipeline end to end on tiny models, its run-folder contracts, resume, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit.cli import main

from conftest import make_mixture_dir, write_jsonl


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def manifests(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("manifest.json")}


FAST = {
    "grads": {"calibration_size": 8, "batch_size": 8},
    "train": {"batch_size": 8, "learning_rate": 1e-3},
    "eval": {"max_per_source": 4, "batch_size": 16, "max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The built-in path: tiny preset (with its warm-up stage) on a few built-in tasks, r = 1."""
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_config(root / "run.yaml", {
        "name": "tiny-e2e",
        "model": {"preset": "tiny"},
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse"], "train_per_task": 24,
                                "eval_per_task": 4}, "max_length": 64},
        "prepare": {"examples_per_task": 16, "epochs": 1, "batch_size": 16},
        "split": {"r": 1},
        **FAST,
    })
    out = root / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    return cfg, out


def test_run_folder_contracts(demo_run):
    _, out = demo_run
    plan = json.loads((out / "split/plan.json").read_text())
    assert set(plan) >= {"method", "r", "sources", "groups", "samples", "tokens", "weights"}
    assert plan["method"] == "pca-median" and plan["r"] == 1 and len(plan["groups"]) == 2
    assert sorted(s for g in plan["groups"] for s in g) == sorted(plan["sources"])
    assert sum(plan["weights"]) == pytest.approx(1.0)
    mixture = json.loads((out / "mixture/manifest.json").read_text())
    budget = {e["name"]: e["tokens"] for e in mixture["sources"]}
    assert plan["tokens"] == [sum(budget[s] for s in g) for g in plan["groups"]]
    assert plan["weights"] == pytest.approx([n / sum(plan["tokens"]) for n in plan["tokens"]])

    conflict = json.loads((out / "split/conflict.json").read_text())
    m = torch.tensor(conflict["matrix"])
    assert conflict["sources"] == plan["sources"]
    torch.testing.assert_close(m, m.T)
    torch.testing.assert_close(torch.diagonal(m), torch.ones(len(m), dtype=m.dtype))

    results = json.loads((out / "results.json").read_text())["methods"]
    assert list(results) == ["base", "joint", "merit-r1", "merit-r1-uniform", "random-k2"]
    for r in results.values():
        assert 0.0 <= r["macro"] <= 1.0 and r["loss"] > 0
        assert set(r["per_source"]) == set(plan["sources"])
    # Training moved the models: the joint baseline fits the mixture better than θ(0).
    assert results["joint"]["loss"] < results["base"]["loss"]
    assert (out / "report.md").exists() and (out / "split/conflict.png").exists() and (out / "split/pca.png").exists()


def test_merged_checkpoint_is_exact_weighted_sum_and_loads(demo_run):
    from transformers import AutoModelForCausalLM

    _, out = demo_run
    plan = json.loads((out / "split/plan.json").read_text())
    branches = [load_file(str(out / f"branches/{k}/model.safetensors")) for k in range(len(plan["groups"]))]
    theta0 = load_file(str(out / "theta0/model.safetensors"))
    merged = load_file(str(out / "merged/token-weighted/model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(branches[0][name], theta0[name]), "branch did not train"
    for key, value in merged.items():
        expected = sum(w * b[key].float() for w, b in zip(plan["weights"], branches))
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=0, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out / "merged/token-weighted")
    assert torch.equal(model.state_dict()[name], merged[name])


def test_rerun_skips_finished_stages(demo_run, capsys):
    cfg, out = demo_run
    before = manifests(out)
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    assert manifests(out) == before
    assert "merit-r1" in capsys.readouterr().out


def test_until_stops_after_split_with_plan_written(tmp_path, tiny_checkpoint, mixture_dir):
    cfg = write_config(tmp_path / "c.yaml", {"model": {"path": str(tiny_checkpoint)},
                                              "mixture": {"dir": str(mixture_dir)}, **FAST})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--until", "split", "--set", "split.r=2"]) == 0
    plan = json.loads((tmp_path / "run/split/plan.json").read_text())
    assert len(plan["groups"]) == 4
    assert not (tmp_path / "run/branches").exists()


def test_planted_conflicting_families_land_in_different_groups(tmp_path, tiny_checkpoint):
    """Three "answer in capitals" tasks against three "answer in small letters" tasks over the same
    inputs: at r = 1 the conflict split must separate the two families, not the prompt formats."""
    mix = make_mixture_dir(tmp_path / "mix", n_train=32)
    cfg = write_config(tmp_path / "c.yaml", {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mix)},
                                              "split": {"r": 1}, "grads": {"calibration_size": 32}})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--until", "split"]) == 0
    groups = json.loads((tmp_path / "run/split/plan.json").read_text())["groups"]
    families = [{name.split("_")[0] for name in g} for g in groups]
    assert sorted(map(sorted, families)) == [["lower"], ["upper"]], groups


# ---------------------------------------------------------------------------------------------- bad input


def _bad_run(tmp_path, capsys, cfg: dict, *extra: str) -> str:
    path = write_config(tmp_path / "bad.yaml", cfg)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merit: error: "), err
    assert not out.exists() or not list(out.rglob("manifest.json")), "a stage was marked complete"
    return err[0]


def test_missing_file(tmp_path, capsys, tiny_checkpoint):
    msg = _bad_run(tmp_path, capsys, {"model": {"path": str(tiny_checkpoint)}, "split": {"r": 1},
                                      "mixture": {"sources": [{"name": "a", "train": "nope/a.jsonl"},
                                                              {"name": "b", "train": "nope/b.jsonl"}]}})
    assert "nope/a.jsonl: file not found" in msg


def test_malformed_line_reports_file_and_line(tmp_path, capsys, tiny_checkpoint, mixture_dir):
    bad = mixture_dir / "train" / "upper_rev.jsonl"
    bad.write_text(bad.read_text() + '{"messages": [oops\n')
    msg = _bad_run(tmp_path, capsys, {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mixture_dir)}})
    assert "upper_rev.jsonl:25: not valid JSON" in msg


def test_source_without_assistant_turn(tmp_path, capsys, tiny_checkpoint, mixture_dir):
    write_jsonl(mixture_dir / "train" / "lower_sort.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    msg = _bad_run(tmp_path, capsys, {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mixture_dir)}})
    assert "lower_sort.jsonl:1: no assistant turn" in msg


def test_fewer_sources_than_groups(tmp_path, capsys, tiny_checkpoint, mixture_dir):
    msg = _bad_run(tmp_path, capsys, {"model": {"path": str(tiny_checkpoint)}, "split": {"r": 3},
                                      "mixture": {"dir": str(mixture_dir)}})
    assert "split.r=3 needs at least 8 sources; the mixture has 6" in msg


def test_unknown_config_keys_are_all_reported(tmp_path, capsys, tiny_checkpoint, mixture_dir):
    msg = _bad_run(tmp_path, capsys, {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mixture_dir)},
                                      "split": {"r": 1, "axes": 2}, "trian": {}})
    assert "unknown key 'split.axes'" in msg and "unknown key 'trian'" in msg


def test_unknown_override_and_registry_name(tmp_path, capsys, tiny_checkpoint, mixture_dir):
    base = {"model": {"path": str(tiny_checkpoint)}, "mixture": {"dir": str(mixture_dir)}}
    msg = _bad_run(tmp_path, capsys, base, "--set", "split.method=spectral")
    assert "split.method: unknown split 'spectral'; known:" in msg and "pca-median" in msg


def test_demo_config_is_valid():
    from merit.cli import DEMO_CONFIG
    from merit.config import load_config

    cfg = load_config(DEMO_CONFIG)
    assert cfg.model.preset == "tiny" and cfg.split.r == 2 and cfg.mixture.builtin is not None


def test_minimal_config_needs_only_preset_and_dir(tmp_path, mixture_dir):
    from merit.config import load_config

    cfg = load_config(write_config(tmp_path / "m.yaml", {"model": {"preset": "tiny"}, "mixture": {"dir": str(mixture_dir)}}))
    assert cfg.split.method == "pca-median" and cfg.grads.calibration_size == 200 and cfg.grads.stride == 5
