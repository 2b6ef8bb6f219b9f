"""The Ray launcher: each branch is a Ray task that asks for its CPUs and GPUs.

``launch.address`` connects to an existing cluster (e.g. ``ray://head:10001`` or ``auto``); without it a
local Ray instance is started for the run and shut down after it. Tasks read and write the run folder
directly, so on a cluster the run folder must be on a filesystem every node sees (the same is true of
θ(0) and the data). Ray is an optional extra: ``pip install 'merit-tune[ray]'``.

With ``launch.processes_per_branch: N > 1`` each branch is one Ray Train run (``TorchTrainer`` with
``ScalingConfig(num_workers=N)``): Ray places the N workers, sets up their torch process group and the
``RANK`` / ``WORLD_SIZE`` environment the Trainer reads; ``launch.workers`` such runs at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from merit.errors import ConfigError
from merit.launch.base import Monitor, Outcome, cpus_per_branch, execute, one_line, outcome_of, pooled, require
from merit.registry import register

if TYPE_CHECKING:
    from merit.config import LaunchConfig
    from merit.train.branch import BranchJob


def _task(job, threads: int) -> tuple[bool, str | None]:
    # Runs in a Ray worker process: the job's log, status and checkpoint go to the run folder as usual.
    return execute(job, threads=threads, launcher="ray")


def _train_loop(config: dict) -> None:
    # One Ray Train worker = one rank of the branch; run_branch saves from rank 0 after the gathering.
    ok, error = execute(config["job"], threads=config["threads"], launcher="ray")
    if not ok:
        raise RuntimeError(error)


def _ray_train(ray, jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]:
    """Each job as one Ray Train run of ``launch.processes_per_branch`` workers, ``launch.workers`` at once."""
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise ConfigError("launch.processes_per_branch with launch.kind=ray needs Ray Train: "
                          "pip install 'merit-tune[ray]' (ray[train])") from None
    n = cfg.processes_per_branch
    threads = max(1, cpus_per_branch(cfg, default=1))
    gpus = cfg.gpus_per_branch / n if cfg.gpus_per_branch else 0

    def one(job) -> Outcome:
        trainer = TorchTrainer(
            _train_loop, train_loop_config={"job": job, "threads": threads},
            scaling_config=ScalingConfig(num_workers=n, use_gpu=gpus > 0,
                                         resources_per_worker={"CPU": threads, **({"GPU": gpus} if gpus else {})}),
            run_config=RunConfig(name=f"{job.out.name}", storage_path=str(job.out.parent.absolute() / ".ray")))
        try:
            result = trainer.fit()
            error = one_line(result.error) if getattr(result, "error", None) else None
        except Exception as e:  # noqa: BLE001 - a worker failed or died: reported, the others go on
            error = one_line(e)
        return outcome_of(job, error is None, error)

    return pooled(jobs, one, cfg.workers or len(jobs))


@register("launcher", "ray")
def run_ray(jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]:
    """Submit every job as a Ray task (at most ``launch.workers`` at once when that is set) and wait."""
    ray = require("ray", "ray", "ray")
    started = False
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=False)
        else:
            # A local instance for this run only: no dashboard, no auth token written under $HOME.
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            # Logical CPUs: at least what one multi-process branch asks for (its workers + Ray Train's controller).
            need = cfg.processes_per_branch * max(1, cfg.cpus_per_branch or 1) + 1 if cfg.processes_per_branch > 1 else 0
            ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=False)
        started = True
    if cfg.processes_per_branch > 1:
        try:
            return _ray_train(ray, jobs, cfg)
        finally:
            if started:
                ray.shutdown()
    threads = cpus_per_branch(cfg, default=1)
    # max_retries=0: a failed branch is reported, not silently retried; a rerun resumes from its checkpoint.
    task = ray.remote(num_cpus=threads, num_gpus=cfg.gpus_per_branch, max_retries=0)(_task)
    limit = cfg.workers or len(jobs)
    pending, refs, outcomes = list(jobs), {}, {}
    monitor = Monitor(jobs)
    try:
        while pending or refs:
            while pending and len(refs) < limit:
                job = pending.pop(0)
                refs[task.remote(job, threads)] = job
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in ready:
                job = refs.pop(ref)
                try:
                    ok, error = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the worker died (OOM killer, lost node): report it
                    ok, error = False, one_line(e)
                outcomes[job.out] = outcome_of(job, ok, error)
            monitor.poll()
    finally:
        for ref in refs:
            ray.cancel(ref, force=True)
        monitor.close()
        if started:
            ray.shutdown()
    return [outcomes[j.out] for j in jobs]
