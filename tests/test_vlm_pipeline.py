"""The pipeline end to end on a tiny vision-language model: every stage, the frozen vision tower bitwise
unchanged in every branch and in the merges, image/text token budgets, and reloadable outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit.cli import main

from conftest import write_jsonl

TASKS = ["shape_colour", "shape_colour_caps", "side", "side_compass", "colour_choice"]
FAST = {
    "grads": {"calibration_size": 8, "batch_size": 8},
    "train": {"batch_size": 8, "learning_rate": 2e-3},
    "eval": {"max_per_source": 3, "batch_size": 8, "max_new_tokens": 4},
    "split": {"r": 1},
    # One torch thread for this process's work and for each branch: tiny models on a busy 2-core machine.
    "launch": {"threads": 1, "cpus_per_branch": 1},
}


def vision_mixture(root: Path, n_train: int = 16, n_eval: int = 3, mixed_formats: bool = False) -> Path:
    """Built-in image tasks written as a mixture folder (pictures under root/images). ``mixed_formats``:
    ``shape_colour`` as The Cauldron's Parquet layout with the pictures embedded as PNG bytes, ``side``
    as LLaVA JSON (image paths relative to the mixture folder), the rest chat JSONL."""
    from merit.data.builtin_vision import write_vision_mixture

    for name, (train, ev) in write_vision_mixture(root, TASKS, n_train, n_eval, seed=0).items():
        for split, rows in (("train", train), ("eval", ev)):
            if mixed_formats and name == "shape_colour":
                _cauldron_parquet(root, root / split / f"{name}.parquet", rows)
            elif mixed_formats and name == "side":
                _llava_json(root / split / f"{name}.json", rows)
            else:
                write_jsonl(root / split / f"{name}.jsonl", rows)
    return root


def _cauldron_parquet(root: Path, path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"images": [{"bytes": (root / p).read_bytes(), "path": None} for p in r["images"]],
                "texts": [{"user": r["messages"][0]["content"][1]["text"], "assistant": r["messages"][1]["content"]}],
                "targets": r["targets"], "id": r["id"]} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=5)


def _llava_json(path: Path, rows: list[dict]) -> None:
    records = [{"id": r["id"], "image": r["images"][0], "targets": r["targets"],
                "conversations": [{"from": "human", "value": "<image>\n" + r["messages"][0]["content"][1]["text"]},
                                  {"from": "gpt", "value": r["messages"][1]["content"]}]} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def run(root: Path, cfg: dict, *extra: str) -> Path:
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "run"
    assert main(["run", str(path), "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory, tiny_vlm_checkpoint):
    root = tmp_path_factory.mktemp("vlm-e2e")
    mix = vision_mixture(root / "mix", mixed_formats=True)
    cfg = {"name": "vlm-e2e", "model": {"path": str(tiny_vlm_checkpoint)},
           "mixture": {"dir": str(mix), "max_length": 48}, **FAST}
    threads = torch.get_num_threads()
    out = run(root, cfg)
    assert torch.get_num_threads() == threads  # launch.threads applies during the run only
    return root, cfg, out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_results_and_token_budgets(vlm_run):
    _, _, out = vlm_run
    results = json.loads((out / "results.json").read_text())["methods"]
    assert list(results) == ["base", "joint", "merit-r1", "merit-r1-uniform", "random-k2"]
    for r in results.values():
        assert set(r["per_source"]) == set(TASKS) and 0.0 <= r["macro"] <= 1.0 and r["loss"] > 0
    assert results["joint"]["loss"] < results["base"]["loss"]  # training on images moved the language model
    assert json.loads((out / "eval/base.json").read_text())["result"]["metrics"]["colour_choice"] == "mc_accuracy"

    mixture = json.loads((out / "mixture/manifest.json").read_text())
    assert mixture["token_count"] == "all"
    formats = {e["name"]: e.get("format") for e in mixture["sources"]}
    assert formats["shape_colour"] == "parquet, cauldron layout" and formats["side"] == "json, llava layout"
    assert formats["colour_choice"] is None  # chat JSONL, recorded as it always was
    for e in mixture["sources"]:
        assert e["images"] == e["samples"] == 16
        assert e["image_tokens"] == 4 * e["images"]  # 56×56 pictures: 4 placeholder tokens each
        assert e["tokens"] == e["text_tokens"] + e["image_tokens"]
    plan = json.loads((out / "split/plan.json").read_text())
    budget = {e["name"]: e["tokens"] for e in mixture["sources"]}
    assert plan["tokens"] == [sum(budget[s] for s in g) for g in plan["groups"]]


def test_frozen_vision_tower_is_bitwise_theta0_everywhere(vlm_run):
    _, _, out = vlm_run
    theta0 = weights(Path(json.loads((out / "theta0/manifest.json").read_text())["path"]))
    vision = [k for k in theta0 if k.startswith("visual.")]  # saved key names of model.visual.*
    assert vision
    folders = [out / "branches/0", out / "branches/1", out / "baselines/random-k2/branches/0",
               out / "baselines/random-k2/branches/1", out / "joint", out / "merged/token-weighted",
               out / "merged/uniform", out / "baselines/random-k2/merged/token-weighted"]
    for folder in folders:
        w = weights(folder)
        assert all(torch.equal(w[k], theta0[k]) for k in vision), folder
        changed = [k for k in w if not k.startswith("visual.") and not torch.equal(w[k], theta0[k])]
        assert changed, f"{folder}: the language model did not train"
    # The merge of the language model is still the token-weighted average of the branches.
    plan = json.loads((out / "split/plan.json").read_text())
    branches = [weights(out / f"branches/{k}") for k in range(2)]
    merged = weights(out / "merged/token-weighted")
    name = "model.layers.0.mlp.up_proj.weight"
    expected = sum(w * b[name] for w, b in zip(plan["weights"], branches))
    torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)


def test_outputs_reload_as_vlm_with_processor(vlm_run):
    from transformers import AutoModelForImageTextToText

    from merit.models.loading import load_tokenizer
    from merit.models.vlm import MeritQwen2_5_VLProcessor

    _, _, out = vlm_run
    for folder in (out / "branches/0", out / "merged/token-weighted"):
        assert isinstance(load_tokenizer(folder).processor, MeritQwen2_5_VLProcessor)
        model = AutoModelForImageTextToText.from_pretrained(folder)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_rerun_is_cached_and_text_token_budgets_reweight(vlm_run, capsys):
    root, cfg, out = vlm_run
    before = {str(p): p.stat().st_mtime_ns for p in out.rglob("manifest.json")}
    run(root, cfg)
    assert {str(p): p.stat().st_mtime_ns for p in out.rglob("manifest.json")} == before
    capsys.readouterr()
    # mixture.token_count=text: budgets without image placeholders, so the plan's weights change too.
    run(root, cfg, "--until", "split", "--set", "mixture.token_count=text")
    mixture = json.loads((out / "mixture/manifest.json").read_text())
    assert mixture["token_count"] == "text"
    assert all(e["tokens"] == e["text_tokens"] for e in mixture["sources"])
    plan = json.loads((out / "split/plan.json").read_text())
    text = {e["name"]: e["text_tokens"] for e in mixture["sources"]}
    assert plan["tokens"] == [sum(text[s] for s in g) for g in plan["groups"]]


def test_lora_branches_adapt_the_language_model_only(tmp_path, tiny_vlm_checkpoint):
    mix = vision_mixture(tmp_path / "mix", n_train=8, n_eval=2)
    cfg = {"model": {"path": str(tiny_vlm_checkpoint)}, "mixture": {"dir": str(mix), "max_length": 48},
           "baselines": {"joint": False, "random": False}, "merge": {"operators": ["token-weighted"]},
           **{**FAST, "train": {"batch_size": 8, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}}}}
    out = run(tmp_path, cfg, "--until", "merge")
    adapter = load_file(str(out / "branches/0/adapter_model.safetensors"))
    assert adapter and all(".language_model." in k for k in adapter)
    theta0 = weights(tiny_vlm_checkpoint)
    merged = weights(out / "merged/token-weighted")
    assert set(merged) == set(theta0)
    assert all(torch.equal(merged[k], theta0[k]) for k in theta0 if k.startswith("visual."))
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           theta0["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.slow
def test_branch_on_two_processes_with_torchrun(vlm_run, tmp_path):
    """A branch under torchrun (DDP, here on CPU with gloo): rank 0 writes the folder, the steps halve."""
    import os
    import subprocess
    import sys

    _, _, out = vlm_run
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "merit.cli", "train-branch",
                           "--run-dir", str(out), "--branch", "0", "--out", str(tmp_path / "ddp")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single = json.loads((out / "branches/0/manifest.json").read_text())
    ddp = json.loads((tmp_path / "ddp/manifest.json").read_text())
    assert ddp["sources"] == single["sources"] and ddp["tokens_seen"] == single["tokens_seen"]
    assert ddp["steps"] == -(-single["steps"] // 2)  # two processes of batch_size each: half the steps
    theta0 = weights(Path(json.loads((out / "theta0/manifest.json").read_text())["path"]))
    w = weights(tmp_path / "ddp")
    assert all(torch.equal(w[k], theta0[k]) for k in theta0 if k.startswith("visual."))
