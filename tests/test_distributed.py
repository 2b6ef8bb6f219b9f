"""Multi-process branches (launch.processes_per_branch) on CPU with the gloo backend: the same weights as
one process at the same global batch, on every launcher; a killed rank resumes; bad sharding input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit.cli import main

from conftest import make_mixture_dir

SOURCES = ["upper_copy", "upper_rev", "lower_copy", "lower_rev"]


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def config(root: Path, checkpoint: Path, processes: int, n_train: int = 16, **launch) -> dict:
    mix = root / "mix"
    if not mix.exists():
        make_mixture_dir(mix, n_train=n_train, n_eval=2, names=SOURCES)
    return {"model": {"path": str(checkpoint)}, "mixture": {"dir": str(mix), "max_length": 64},
            "grads": {"calibration_size": 8, "batch_size": 8}, "split": {"r": 1},
            # the same global batch of 8: one process × 8, or N processes × 8/N
            "train": {"batch_size": 8 // processes, "learning_rate": 1e-3, "warmup_ratio": 0},
            "baselines": {"joint": False, "random": False},
            "launch": {"processes_per_branch": processes, "save_steps": 2, **launch}}


def weights(run: Path, k: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / f"branches/{k}/model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("dist")
    cfg = write(root / "one.yaml", config(root, tiny_checkpoint, 1))
    assert main(["run", str(cfg), "--out", str(root / "one"), "--until", "branches"]) == 0
    return root, root / "one"


@pytest.mark.parametrize("kind", [
    "local",
    pytest.param("ray", marks=pytest.mark.ray),
    "slurm",
])
def test_two_process_branch_matches_one_process(one_process, tiny_checkpoint, kind):
    """2 ranks × batch 4 (DDP over gloo) end at the weights of 1 process × batch 8, through each launcher;
    the checkpoint is a normal one that from_pretrained loads, and the manifest says how it ran."""
    from transformers import AutoModelForCausalLM

    root, ref = one_process
    launch = {"kind": kind, **({"slurm": {"cluster": "local"}} if kind == "slurm" else {})}
    cfg = write(root / f"two-{kind}.yaml", config(root, tiny_checkpoint, 2, **launch))
    out = root / f"two-{kind}"
    assert main(["run", str(cfg), "--out", str(out), "--until", "branches"]) == 0
    for k in (0, 1):
        assert max_diff(weights(ref, k), weights(out, k)) < 1e-4
        m = json.loads((out / f"branches/{k}/manifest.json").read_text())
        assert m["processes"] == 2 and m["distributed"] == "MULTI_CPU"
        assert m["steps"] == json.loads((ref / f"branches/{k}/manifest.json").read_text())["steps"]
    model = AutoModelForCausalLM.from_pretrained(out / "branches/0")
    assert sum(p.numel() for p in model.parameters()) > 0


def _rank_pids(rank: int) -> list[int]:
    """PIDs of merit worker processes of that torch rank (read from /proc: cmdline and environment)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"merit.launch.worker" in cmd and f"RANK={rank}".encode() in env:
            found.append(int(d.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find a rank's process")
def test_sigkill_of_one_rank_then_rerun_resumes(tmp_path, tiny_checkpoint):
    """SIGKILL rank 1 of a 2-process branch mid-training: torchrun stops the branch, the run fails with a
    one-line error; the same command then resumes from the branch's last checkpoint and finishes."""
    cfg = config(tmp_path, tiny_checkpoint, 2, n_train=160)
    cfg["launch"]["save_steps"] = 1
    path = write(tmp_path / "run.yaml", cfg)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "merit.cli", "run", str(path), "--out", str(out), "--until", "branches"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    killed = False
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if not killed and list((out / "branches" / ".0.work").glob("checkpoint-*")):
            for pid in _rank_pids(1):
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    err = proc.communicate(timeout=60)[1]
    assert killed, "the branch finished before a checkpoint was seen; nothing was killed"
    assert proc.returncode == 2 and "job(s) failed" in err and "Traceback" not in err, err
    assert not (out / "branches/0/manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from the checkpoint at step" in (out / "branches/0.log").read_text()
    for k in (0, 1):
        m = json.loads((out / f"branches/{k}/manifest.json").read_text())
        assert m["processes"] == 2 and m["steps"] > 1


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="accelerate builds FSDP for GPU process groups only (on CPU the Trainer would run plain "
                           "DDP; merit refuses train.fsdp there): needs 2 CUDA GPUs")
def test_fsdp_branch_saves_full_tensors(tmp_path, tiny_checkpoint):
    cfg = config(tmp_path, tiny_checkpoint, 2, devices=["0,1"])
    cfg["train"]["fsdp"] = {"reshard_after_forward": True}
    _assert_saved_whole(tmp_path, tiny_checkpoint, cfg, "FSDP")


def _assert_saved_whole(tmp_path, tiny_checkpoint, cfg: dict, distributed: str) -> None:
    """The sharded branch trains, and saves every tensor whole (θ(0)'s names and shapes)."""
    path = write(tmp_path / "run.yaml", cfg)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--until", "branches"]) == 0
    theta0 = load_file(str(tiny_checkpoint / "model.safetensors"))
    branch = weights(tmp_path / "run", 0)
    assert {n: t.shape for n, t in branch.items()} == {n: t.shape for n, t in theta0.items()}
    assert json.loads((tmp_path / "run/branches/0/manifest.json").read_text())["distributed"] == distributed


# ---------------------------------------------------------------------------------------------- bad input


def _bad(tmp_path, tiny_checkpoint, capsys, expected: str, *, train=None, launch=None, files=None) -> None:
    cfg = config(tmp_path, tiny_checkpoint, 2)
    cfg["train"].update(train or {})
    cfg["launch"].update(launch or {})
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "run"
    rc = main(["run", str(write(tmp_path / "run.yaml", cfg)), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("merit: error:"), err
    assert expected in err[0], err[0]
    assert not out.exists()


def test_more_processes_than_devices(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "launch.processes_per_branch=2: launch.devices[1] = '1' names 1 GPU(s)",
         launch={"devices": ["0,1", "1"], "workers": 2})


def test_fewer_gpus_than_processes(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "launch.gpus_per_branch=1 gives fewer GPUs than processes",
         launch={"gpus_per_branch": 1})


def test_deepspeed_config_not_json(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "ds.json: not valid JSON", train={"deepspeed": "ds.json"},
         files={"ds.json": "{zero_optimization: {stage: 2}"})


def test_deepspeed_config_stage_four(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "zero_optimization.stage must be 0, 1, 2 or 3 (got 4)",
         train={"deepspeed": "ds.json"}, files={"ds.json": json.dumps({"zero_optimization": {"stage": 4}})})


def test_deepspeed_inline_stage_four(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "'train.deepspeed': zero_optimization.stage must be 0, 1, 2 or 3",
         train={"deepspeed": {"zero_optimization": {"stage": 4}}})


def test_deepspeed_not_installed(tmp_path, tiny_checkpoint, capsys):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    _bad(tmp_path, tiny_checkpoint, capsys, "train.deepspeed: needs the deepspeed package: pip install "
         "'merit-tune[deepspeed]'", train={"deepspeed": {"zero_optimization": {"stage": 2}}})


def test_deepspeed_without_cuda_is_refused(monkeypatch):
    """With deepspeed installed but no GPU, accelerate would ignore the DeepSpeed config and run DDP."""
    import importlib.util

    from merit.config import ModelConfig, TrainConfig
    from merit.errors import ConfigError
    from merit.train.options import check_train_options

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match="train.deepspeed: DeepSpeed runs on CUDA GPUs only"):
        check_train_options(TrainConfig(deepspeed={"zero_optimization": {"stage": 3}}), ModelConfig(preset="tiny"),
                            cuda=False)


@pytest.mark.skipif(torch.cuda.device_count() < 2 or __import__("importlib").util.find_spec("deepspeed") is None,
                    reason="DeepSpeed ZeRO-3 needs 2 CUDA GPUs and the deepspeed package (accelerate ignores it on CPU)")
def test_zero3_branch_saves_full_tensors(tmp_path, tiny_checkpoint):
    cfg = config(tmp_path, tiny_checkpoint, 2, devices=["0,1"])
    cfg["train"]["deepspeed"] = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
                                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                 "train_batch_size": "auto", "gradient_clipping": "auto"}
    _assert_saved_whole(tmp_path, tiny_checkpoint, cfg, "DEEPSPEED")


def test_fsdp_unknown_option(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "'train.fsdp': unknown option(s) shard_everything; known: ",
         train={"fsdp": {"shard_everything": True}})


def test_fsdp_without_cuda(tmp_path, tiny_checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _bad(tmp_path, tiny_checkpoint, capsys, "train.fsdp: FSDP runs on CUDA GPUs only", train={"fsdp": {}})


def test_fsdp_and_deepspeed_together(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "give at most one of train.fsdp and train.deepspeed",
         train={"fsdp": {}, "deepspeed": {"zero_optimization": {"stage": 2}}})


def test_slurm_ranks_that_do_not_divide_over_the_nodes(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "launch.processes_per_branch=2 does not divide over launch.slurm.nodes=3",
         launch={"kind": "slurm", "slurm": {"nodes": 3, "cluster": "local"}})


def test_deepspeed_value_that_is_neither_path_nor_mapping(tmp_path, tiny_checkpoint, capsys):
    _bad(tmp_path, tiny_checkpoint, capsys, "'train.deepspeed': a DeepSpeed JSON file's path or an inline config",
         train={"deepspeed": 7})
