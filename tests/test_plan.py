"""``merit plan``, the summary ``merit run`` starts with, --strict, library defaults and quiet logs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from merit.cli import main

from conftest import make_mixture_dir

SOURCES = ["upper_copy", "upper_rev", "lower_copy", "lower_rev"]


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_config(root: Path, n_train: int = 24, n_eval: int = 6, **train) -> dict:
    mix = make_mixture_dir(root / "mix", n_train=n_train, n_eval=n_eval, names=SOURCES)
    return {"name": "p", "model": {"preset": "tiny"}, "mixture": {"dir": str(mix), "max_length": 64},
            "prepare": {"examples_per_task": 16, "epochs": 1, "batch_size": 16}, "split": {"r": 1},
            "train": {"learning_rate": 1e-3, "batch_size": 4, **train}}


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, tiny_checkpoint):
    """A >100M-parameter Llama as merit plan sees it: config.json, tokenizer and a (tiny) safetensors
    file; plan builds the architecture on the meta device and never reads the weights."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    import torch

    folder = tmp_path_factory.mktemp("big") / "theta0"
    folder.mkdir()
    LlamaConfig(vocab_size=300, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                num_attention_heads=16, num_key_value_heads=4).save_pretrained(folder)
    for f in tiny_checkpoint.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (folder / f.name).write_bytes(f.read_bytes())
    save_file({"placeholder": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


def test_plan_prints_groups_steps_estimates_and_warns_about_short_branches(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", tiny_config(tmp_path, n_train=24))  # 96 examples / 2 groups / 4 = 12 steps
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.001" in out  # the resolved config
    assert "K = 2 groups of ≈ 48 examples" in out
    assert "12 optimizer steps per branch, 24 for joint (global batch 4)" in out
    assert "plan: branch (each): ≈ " in out and "plan: grads: ≈ " in out and "disk: gradient store" in out
    assert "warning: 12 optimizer steps per branch" in out
    assert "learning_rate" not in "".join(line for line in out.splitlines() if line.startswith("warning"))
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("p*"))  # nothing written


def test_plan_warns_about_a_high_learning_rate_on_a_large_model(tmp_path, capsys, big_checkpoint):
    cfg = tiny_config(tmp_path)
    cfg["model"] = {"path": str(big_checkpoint)}
    assert main(["plan", str(write(tmp_path / "run.yaml", cfg)), "--quiet-config"]) == 0
    out = capsys.readouterr().out
    assert "θ(0) 152.7M parameters (152.7M trained)" in out
    assert "warning: train.learning_rate 0.001 is high for a" in out
    cfg["train"]["learning_rate"] = 2e-5
    assert main(["plan", str(write(tmp_path / "run.yaml", cfg)), "--quiet-config"]) == 0
    assert "learning_rate" not in capsys.readouterr().out


def test_demo_config_does_not_warn_about_its_learning_rate(capsys):
    from merit.cli import DEMO_CONFIG

    assert main(["plan", str(DEMO_CONFIG), "--quiet-config"]) == 0
    out = capsys.readouterr().out
    assert "K = 4 groups" in out
    assert not [line for line in out.splitlines() if line.startswith("warning") and "learning_rate" in line]


def test_strict_refuses_a_run_with_warnings_before_writing(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", tiny_config(tmp_path))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "merit: error: --strict: " in err and "optimizer steps per branch" in err
    assert not out.exists()
    assert main(["plan", str(cfg), "--strict", "--quiet-config"]) == 2


def test_plan_eval_resolution_and_unknown_gpu(tmp_path, capsys):
    from merit.plan.estimate import min_detectable_difference

    # 4 sources × 1000 items near 50%: SE of the macro mean 0.79 points, 95% for a difference ±2.2 points
    assert min_detectable_difference([1000] * 4) == pytest.approx(2.19, abs=0.01)
    assert min_detectable_difference([25] * 48) < min_detectable_difference([25] * 4)
    cfg = write(tmp_path / "run.yaml", tiny_config(tmp_path))
    assert main(["plan", str(cfg), "--gpu", "tpu-v9"]) == 2
    assert "--gpu: unknown 'tpu-v9'; known: cpu, a100-80gb" in capsys.readouterr().err


def test_plan_memory_warning_names_the_hardware(tmp_path, capsys, big_checkpoint):
    cfg = tiny_config(tmp_path)
    cfg["model"] = {"path": str(big_checkpoint)}
    cfg["train"].update(learning_rate=2e-5, batch_size=64)
    cfg["mixture"]["max_length"] = 4096
    assert main(["plan", str(write(tmp_path / "run.yaml", cfg)), "--gpu", "v100-16gb", "--quiet-config"]) == 0
    out = capsys.readouterr().out
    assert "warning: a branch needs ≈" in out and "V100-16GB" in out


def test_run_starts_with_the_plan_summary(tmp_path, capsys):
    cfg = write(tmp_path / "run.yaml", tiny_config(tmp_path))
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--until", "theta0"]) == 0
    err = capsys.readouterr().err
    assert "[merit] plan: 4 sources, 96 examples" in err and "[merit] plan: K = 2 groups" in err
    assert "merit: warning: 12 optimizer steps per branch" in err  # merit's usual warning line


def test_library_defaults_are_for_pretrained_checkpoints_and_the_demo_keeps_its_own():
    from merit.cli import DEMO_CONFIG, DEMO_VLM_CONFIG
    from merit.config import TrainConfig, load_config

    t = TrainConfig()
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (2e-5, "cosine", 0.03, 0.0)
    # The demo trains as before the defaults changed (same values, hence the same keys and table).
    demo = load_config(DEMO_CONFIG).train
    assert (demo.learning_rate, demo.warmup_ratio, demo.batch_size, demo.lr_scheduler) == (1e-3, 0.05, 16, "cosine")
    vlm = load_config(DEMO_VLM_CONFIG).train
    assert (vlm.learning_rate, vlm.warmup_ratio) == (2e-3, 0.05)
    # ... so the demo's branch identity (what its keys hash) is the one the old defaults gave.
    from merit.pipeline import training_identity

    old_defaults = {"learning_rate": 1e-3, "batch_size": 16, "gradient_accumulation_steps": 1, "epochs": 1.0,
                    "lr_scheduler": "cosine", "warmup_ratio": 0.05, "weight_decay": 0.0, "max_grad_norm": 1.0,
                    "lora": None}
    assert training_identity(load_config(DEMO_CONFIG))[0] == old_defaults
    # θ(0)'s warm-up pins its own schedule too.
    from merit.config import PrepareConfig
    from merit.models.presets import warmup_hyperparameters

    assert warmup_hyperparameters(PrepareConfig()).model_dump() == {**old_defaults, "learning_rate": 3e-3,
                                                                     "batch_size": 32, "epochs": 2.0,
                                                                     **{k: v for k, v in TrainConfig().model_dump().items()
                                                                        if k not in old_defaults}}


def test_non_tty_run_has_no_weight_loading_or_saving_bars(tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path)
    cfg["model"] = {"path": str(tiny_checkpoint)}
    cfg.update(grads={"calibration_size": 8, "batch_size": 8}, baselines={"joint": False, "random": False},
               merge={"operators": ["token-weighted"]})
    path = write(tmp_path / "run.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "merit.cli", "run", str(path), "--out", str(tmp_path / "run"),
                           "--until", "merge"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for bar in ("Loading weights", "Writing model shards", "it/s]"):
        assert bar not in proc.stderr, bar
    assert "[merit] branches: finished in" in proc.stderr  # one line per stage end, with its duration
    log = (tmp_path / "run/branches/0.log").read_text()
    assert "Loading weights" not in log and "step 1/" in log and "loss" in log
    assert json.loads((tmp_path / "run/branches/0/manifest.json").read_text())["steps"] >= 1


def test_plan_before_the_checkpoint_and_data_exist(tmp_path, capsys):
    """--assume-model / --assume-data: the paper's 7B setting planned from numbers; the config's own paths
    need not exist."""
    cfg = {"model": {"path": str(tmp_path / "absent-model"), "dtype": "bfloat16"},
           "mixture": {"dir": str(tmp_path / "absent-data"), "max_length": 2048}, "split": {"r": 2},
           "train": {"batch_size": 2, "gradient_accumulation_steps": 8, "learning_rate": 2e-5},
           "launch": {"processes_per_branch": 8, "gpus_per_branch": 8}}
    path = write(tmp_path / "run.yaml", cfg)
    assert main(["plan", str(path), "--quiet-config", "--gpu", "a100-80gb", "--assume-model", "qwen2.5-vl-7b",
                 "--assume-data", "176:1.6e6:600"]) == 0
    out = capsys.readouterr().out
    assert "θ(0) 8.29B parameters (7.62B trained); precision bf16" in out
    assert "3125 optimizer steps per branch" in out  # 1.6M / 4 groups / (2 × 8 × 8)
    assert "warning: a branch needs ≈" in out  # 7.6B in mixed precision without sharding: ~160 GB per GPU
    assert main(["plan", str(path), "--assume-data", "176:lots:600"]) == 2
    assert "--assume-data '176:lots:600': expected SOURCES:EXAMPLES:TOKENS_PER_EXAMPLE" in capsys.readouterr().err
