"""Decentralized execution: launchers (local, ray, slurm) give the same merge; a branch is a standalone
job; a killed branch resumes to bitwise the same weights; failures are reported and partial merges marked.

One tiny run (4 sources, r = 1, 2 branches) is taken to its plan once; each test trains and merges a
copy of it. Every launcher uses one torch thread per branch, so all of them compute bitwise the same
thing on CPU and merged weights can be compared exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merit.cli import main

from conftest import make_mixture_dir

SOURCES = ["upper_copy", "upper_rev", "lower_copy", "lower_rev"]


def config(tiny_checkpoint: Path, mix: Path, **launch) -> dict:
    return {
        "model": {"path": str(tiny_checkpoint)},
        "mixture": {"dir": str(mix)},
        "split": {"r": 1},
        "grads": {"calibration_size": 8, "batch_size": 8},
        # batch 2: 24 optimizer steps per branch, long enough to kill one mid-training
        "train": {"batch_size": 2, "learning_rate": 1e-3},
        "baselines": {"joint": False, "random": False},
        "merge": {"operators": ["token-weighted"]},
        "launch": {"cpus_per_branch": 1, "save_steps": 4, **launch},
    }


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_checkpoint) -> Path:
    """A run folder taken to its plan (θ(0), mixture, gradients, split), to be copied by each test."""
    root = tmp_path_factory.mktemp("launch")
    mix = make_mixture_dir(root / "mix", n_train=24, n_eval=2, names=SOURCES)
    cfg = root / "run.yaml"
    cfg.write_text(yaml.safe_dump(config(tiny_checkpoint, mix)))
    assert main(["run", str(cfg), "--out", str(root / "run"), "--until", "split"]) == 0
    return root / "run"


def copy_run(planned: Path, dest: Path) -> Path:
    shutil.copytree(planned, dest)
    return dest


def run_until_merge(run_dir: Path, *sets: str) -> int:
    args = ["run", str(run_dir / "config.yaml"), "--out", str(run_dir), "--until", "merge"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(folder).glob("*.safetensors"))))


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def local_run(planned, tmp_path_factory) -> Path:
    """The reference: the local launcher, branches one after another in the test process."""
    run = copy_run(planned, tmp_path_factory.mktemp("local") / "run")
    assert run_until_merge(run) == 0
    return run


def test_local_run_writes_logs_status_and_manifests(local_run):
    plan = json.loads((local_run / "split/plan.json").read_text())
    theta0_hash = json.loads((local_run / "theta0/manifest.json").read_text())["hash"]
    for k, group in enumerate(plan["groups"]):
        m = json.loads((local_run / f"branches/{k}/manifest.json").read_text())
        assert m["theta0_hash"] == theta0_hash and m["sources"] == group and m["steps"] == 24
        assert m["hardware"]["torch_threads"] == 1 and m["duration_s"] > 0 and m["seed"] == 0
        assert m["hyperparameters"]["batch_size"] == 2 and m["tokens_seen"] > 0 and len(m["data_hash"]) == 64
        status = json.loads((local_run / f"branches/{k}.status.json").read_text())
        assert status["state"] == "done" and status["step"] == status["max_steps"] == 24
        log = (local_run / f"branches/{k}.log").read_text()
        assert "step 24/24" in log and "done in" in log
        assert not (local_run / f"branches/.{k}.work").exists(), "checkpoints are removed once a branch is done"
    merged = json.loads((local_run / "merged/token-weighted/manifest.json").read_text())
    assert merged["partial"] is False and merged["weights"] == plan["weights"]


@pytest.mark.ray
def test_ray_launcher_matches_local(planned, local_run, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run = copy_run(planned, tmp_path / "run")
    assert run_until_merge(run, "launch.kind=ray") == 0
    assert (run / "split/plan.json").read_text() == (local_run / "split/plan.json").read_text()
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "merged/token-weighted"))
    for k in range(2):
        assert json.loads((run / f"branches/{k}.status.json").read_text())["launcher"] == "ray"
        assert "done in" in (run / f"branches/{k}.log").read_text()


@pytest.mark.slurm
def test_slurm_launcher_matches_local(planned, local_run, tmp_path):
    pytest.importorskip("submitit")
    run = copy_run(planned, tmp_path / "run")
    # cluster: local -> submitit's LocalExecutor; partition is a Slurm option it ignores.
    assert run_until_merge(run, "launch.kind=slurm", "launch.slurm={cluster: local, partition: gpu, time: '0:30:00'}") == 0
    assert (run / "split/plan.json").read_text() == (local_run / "split/plan.json").read_text()
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "merged/token-weighted"))
    assert json.loads((run / "branches/1.status.json").read_text())["launcher"] == "slurm"
    assert list((run / "branches/.submitit").rglob("*_log.out")), "submitit kept its own job logs"


def test_killed_branch_is_reported_and_resumes_to_identical_weights(planned, local_run, tmp_path, capsys):
    """Two parallel local workers; branch 0's process is SIGKILLed mid-training (as the out-of-memory
    killer would). Branch 1 still finishes, the run exits 2 naming branch 0 and its log; a rerun resumes
    branch 0 from its last checkpoint and the merged weights equal the uninterrupted run's bitwise."""
    run = copy_run(planned, tmp_path / "run")
    # The pipeline runs in a thread of this process (saves a process start); its workers are processes.
    rc = []
    pipeline = threading.Thread(target=lambda: rc.append(run_until_merge(run, "launch.workers=2")))
    pipeline.start()
    work = run / "branches/.0.work"
    deadline = time.time() + 120
    while not any((c / "trainer_state.json").exists() for c in work.glob("checkpoint-*")):
        assert pipeline.is_alive(), "the run ended before branch 0 saved a checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    os.kill(json.loads((run / "branches/0.status.json").read_text())["pid"], signal.SIGKILL)
    pipeline.join(timeout=120)
    assert not (run / "branches/0/manifest.json").exists(), "branch 0 finished before the kill; test is void"
    assert rc == [2]
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("merit: error: 1 job(s) failed: merit-r1 branch 1/2 (killed by SIGKILL"), last
    assert str(run / "branches/0.log") in last
    assert (run / "branches/1/manifest.json").exists(), "the other branch carried on"
    assert not (run / "merged").exists(), "no merge while a branch is missing"

    assert main(["status", str(run)]) == 0
    status = capsys.readouterr().out
    assert "branches                 1/2 done" in status
    assert "branch 0               failed" in status and "log: branches/0.log" in status

    assert run_until_merge(run) == 0  # the rerun: branch 1 is kept, branch 0 resumes
    log = (run / "branches/0.log").read_text()
    assert "resuming from the checkpoint at step" in log
    assert json.loads((run / "branches/0/manifest.json").read_text())["resumed_from_step"] >= 4
    for k in range(2):
        assert_bitwise_equal(weights(run / f"branches/{k}"), weights(local_run / f"branches/{k}"))
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "merged/token-weighted"))


def test_nan_branch_fails_others_continue_then_allow_partial(planned, local_run, tmp_path, capsys, monkeypatch):
    import merit.train.branch as branch

    real = branch.load_for_training
    group1 = json.loads((planned / "split/plan.json").read_text())["groups"][1]

    def poisoned(*args, **kwargs):  # branch 1's model gets a NaN weight: its first loss is NaN
        model = real(*args, **kwargs)
        if poisoned.job_sources == group1:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")
        return model

    real_run = branch.run_branch

    def run_branch(job, **kw):
        poisoned.job_sources = list(job.sources)
        return real_run(job, **kw)

    monkeypatch.setattr(branch, "load_for_training", poisoned)
    monkeypatch.setattr(branch, "run_branch", run_branch)
    run = copy_run(planned, tmp_path / "run")

    assert run_until_merge(run) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "merit-r1 branch 2/2 (NonFiniteLoss: loss is nan at step 1/24" in err and "branches/1.log" in err
    assert "--allow-partial" in err and not (run / "merged").exists()
    assert (run / "branches/0/manifest.json").exists()
    assert json.loads((run / "branches/1.status.json").read_text())["state"] == "failed"
    assert "NonFiniteLoss" in (run / "branches/1.log").read_text()

    assert main(["run", str(run / "config.yaml"), "--out", str(run), "--until", "merge", "--allow-partial"]) == 2
    assert "partial" in capsys.readouterr().err.strip().splitlines()[-1]
    m = json.loads((run / "merged/token-weighted/manifest.json").read_text())
    assert m["partial"] is True and m["missing"] == [1] and m["weights"] == [1.0]
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "branches/0"))

    monkeypatch.setattr(branch, "load_for_training", real)  # the cause is fixed: the rerun completes the merge
    assert run_until_merge(run) == 0
    assert json.loads((run / "merged/token-weighted/manifest.json").read_text())["partial"] is False
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "merged/token-weighted"))


def test_train_branch_standalone_forms(planned, local_run, tmp_path, capsys):
    """--run DIR and the explicit form (plan, θ(0), mixture manifest, config, remapped data root) train
    the same weights under the same key as the pipeline, so a copied-in branch is accepted as done."""
    run = copy_run(planned, tmp_path / "run")
    assert main(["train-branch", "--run", str(run), "--branch", "1"]) == 0
    assert_bitwise_equal(weights(run / "branches/1"), weights(local_run / "branches/1"))

    # Another machine: only the files, the data under another root.
    data = tmp_path / "elsewhere" / "data"
    shutil.copytree(Path(json.loads((run / "mixture/manifest.json").read_text())["sources"][0]["train"]).parents[1],
                    data)
    explicit = ["train-branch", "--plan", str(run / "split/plan.json"), "--branch", "0",
                "--theta0", str(json.loads((run / "theta0/manifest.json").read_text())["path"]),
                "--mixture-manifest", str(run / "mixture/manifest.json"), "--config", str(run / "config.yaml"),
                "--out", str(tmp_path / "b0"), "--data-root", str(data)]
    assert main(explicit) == 0
    assert_bitwise_equal(weights(tmp_path / "b0"), weights(local_run / "branches/0"))
    ref = json.loads((local_run / "branches/0/manifest.json").read_text())
    assert json.loads((tmp_path / "b0/manifest.json").read_text())["key"] == ref["key"]

    shutil.copytree(tmp_path / "b0", run / "branches/0")  # brought back: the pipeline only merges
    assert run_until_merge(run) == 0
    assert_bitwise_equal(weights(run / "merged/token-weighted"), weights(local_run / "merged/token-weighted"))

    (data / "train" / "upper_copy.jsonl").write_text("{}\n")
    explicit[explicit.index("--out") + 1] = str(tmp_path / "b0-bad")
    assert main(explicit) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("content differs from the mixture manifest's train file (sha256)"), err


def test_merge_refuses_a_branch_of_another_theta0(planned, local_run, tmp_path, capsys):
    run = copy_run(local_run, tmp_path / "run")
    shutil.rmtree(run / "merged")
    m = json.loads((run / "branches/1/manifest.json").read_text())
    (run / "branches/1/manifest.json").write_text(json.dumps({**m, "theta0_hash": "0" * 64}))
    assert run_until_merge(run) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "branches/1/manifest.json: trained from θ(0) 000000000000" in err and not (run / "merged").exists()


# ---------------------------------------------------------------------------------------------- units


def test_slurm_parameters_pass_through():
    from merit.config import LaunchConfig
    from merit.launch.slurm import minutes, parameters

    assert [minutes(x) for x in (90, "90", "1:30:00", "2-00:00:00", "0:30", "0:00:30")] == [90, 90, 90, 2880, 1, 1]
    cfg = LaunchConfig(kind="slurm", workers=3, cpus_per_branch=8, gpus_per_branch=2,
                       slurm={"partition": "gpu", "time": "4:00:00", "mem_gb": 64, "slurm_qos": "high"})
    cluster, folder, params = parameters(cfg)
    assert cluster is None and folder is None
    assert params == {"name": "merit", "timeout_min": 240, "cpus_per_task": 8, "gpus_per_node": 2,
                      "slurm_array_parallelism": 3, "slurm_partition": "gpu", "mem_gb": 64, "slurm_qos": "high"}


def test_missing_optional_dependency_is_one_line(monkeypatch):
    import builtins

    from merit.errors import ConfigError
    from merit.launch.base import require

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    with pytest.raises(ConfigError, match=r"^launch.kind=ray needs the 'ray' package: pip install 'merit-tune\[ray\]'$"):
        require("ray", "ray", "ray")


def test_status_of_a_job_whose_process_is_gone(tmp_path):
    from merit.launch import status as st

    out = tmp_path / "branches" / "0"
    st.mark_started(out, "branch 1/2")
    assert st.job_state(out)[0] == "running"  # this process is alive
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    st.write_status(out, pid=dead.pid)
    state, status = st.job_state(out)
    assert state == "failed" and "is gone" in status["error"]


def test_local_workers_get_their_devices_and_a_share_of_the_cores(monkeypatch):
    import merit.launch.local as local
    from merit.config import LaunchConfig

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local._slots(LaunchConfig(gpus_per_branch=2)) == ["0,1", "2,3"]
    assert local._slots(LaunchConfig(gpus_per_branch=0.5, workers=3)) == ["0", "0", "1"]
    assert local._slots(LaunchConfig(devices=["0", "1,2"])) == ["0", "1,2"]
    assert local._slots(LaunchConfig(workers=2)) == [None, None] and local._slots(LaunchConfig()) == [None]

    seen = {}
    monkeypatch.setattr(local.subprocess, "Popen", lambda cmd, **kw: seen.update(cmd=cmd, env=kw["env"]))
    local._start_worker(threads=1, devices="1,2")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "1,2" and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert seen["cmd"][1:4] == ["-m", "merit.launch.worker", "--serve"]
