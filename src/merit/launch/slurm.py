"""The Slurm launcher: the branches as one submitit job array.

``launch.slurm`` is passed to submitit: its shared names (``timeout_min``, ``mem_gb``, ``cpus_per_task``,
``gpus_per_node``, ``nodes``, ``tasks_per_node``) as they are, ``time`` as minutes or ``[D-]HH:MM:SS``,
and every other key as a Slurm option (``partition: gpu`` -> ``--partition=gpu``, ``account``, ``qos``,
``constraint``, ``additional_parameters``, ...). ``cluster: local`` runs the array with submitit's
LocalExecutor on this machine (tests, a workstation); ``folder`` sets where submitit keeps its pickles
and logs (default: ``<run>/branches/.submitit``). Defaults: ``cpus_per_task`` from
``launch.cpus_per_branch``, ``gpus_per_node`` from ``launch.gpus_per_branch``, ``array_parallelism``
from ``launch.workers`` when that is set. The run folder, θ(0) and the data must be on a filesystem the
compute nodes see. submitit is an optional extra: ``pip install 'merit-tune[slurm]'``.

With ``launch.processes_per_branch: N > 1`` each array element is one branch of N Slurm tasks
(``tasks_per_node`` N, or N / ``nodes`` with ``launch.slurm.nodes`` for a multi-node branch); each task
takes its rank, world size and rendezvous address from Slurm (submitit's ``TorchDistributedEnvironment``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from pathlib import Path

from merit.errors import ConfigError
from merit.launch.base import Monitor, Outcome, execute, one_line, outcome_of, ranks_per_node, require
from merit.registry import register

if TYPE_CHECKING:
    from merit.config import LaunchConfig
    from merit.train.branch import BranchJob

_GENERIC = {"timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node", "tasks_per_node", "name",
            "stderr_to_stdout"}
_EXECUTORS = ("slurm_", "local_", "debug_")


def _task(job, threads: int | None, processes: int = 1) -> tuple[bool, str | None]:
    # Runs on the compute node. Slurm tells how many CPUs the task got; use them all for torch threads.
    threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or None
    if processes > 1:  # one rank of a multi-task branch: RANK, WORLD_SIZE, MASTER_ADDR/PORT from Slurm
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export()
    return execute(job, threads=threads, launcher="slurm")


def minutes(value: int | float | str) -> int:
    """Slurm time (``90``, ``"90"``, ``"1:30:00"``, ``"2-00:00:00"``) in whole minutes."""
    if isinstance(value, (int, float)):
        return int(value)
    days, _, clock = value.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:  # "MM"
        total = parts[0]
    else:
        parts = [0] * (3 - len(parts)) + parts  # "MM:SS" -> [0, MM, SS]
        total = parts[0] * 60 + parts[1] + (parts[2] > 0)
    return total + int(days or 0) * 24 * 60


def parameters(cfg) -> tuple[str | None, Path | None, dict]:
    """(cluster, folder, submitit parameters) from ``launch.*``."""
    given = dict(cfg.slurm or {})
    cluster = given.pop("cluster", None)
    folder = given.pop("folder", None)
    params: dict = {"name": "merit", "timeout_min": 3 * 24 * 60}  # submitit's local default would kill at 2 min
    if cfg.cpus_per_branch:
        params["cpus_per_task"] = cfg.cpus_per_branch
    if cfg.gpus_per_branch:
        params["gpus_per_node"] = int(cfg.gpus_per_branch)
    if cfg.workers:
        params["slurm_array_parallelism"] = cfg.workers
    if cfg.processes_per_branch > 1:  # one task per rank, spread over launch.slurm.nodes nodes
        params["tasks_per_node"] = ranks_per_node(cfg)
        if cfg.gpus_per_branch:
            params["gpus_per_node"] = int(cfg.gpus_per_branch) * params["tasks_per_node"] // cfg.processes_per_branch
    for key, value in given.items():
        if key == "time":
            params["timeout_min"] = minutes(value)
        elif key in _GENERIC or key.startswith(_EXECUTORS):
            params[key] = value
        else:
            params[f"slurm_{key}"] = value
    return cluster, Path(folder) if folder else None, params


@register("launcher", "slurm")
def run_slurm(jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]:
    """Submit the jobs as one array and wait for all of them; failures are collected, not raised."""
    submitit = require("submitit", "slurm", "slurm")
    if not jobs:
        return []
    cluster, folder, params = parameters(cfg)
    folder = folder or jobs[0].out.parent / ".submitit"
    try:
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=cluster)
        executor.update_parameters(**params)
    except (NameError, ValueError, AssertionError) as e:
        raise ConfigError(f"launch.slurm: {str(e).splitlines()[0]}") from None
    threads = cfg.cpus_per_branch
    n = cfg.processes_per_branch
    with executor.batch():  # one sbatch call: a job array
        futures = [executor.submit(_task, job, threads, n) for job in jobs]
    waiting, outcomes = dict(zip(futures, jobs)), {}
    monitor = Monitor(jobs)
    try:
        while waiting:
            for fut, job in list(waiting.items()):
                if not fut.done():
                    continue
                del waiting[fut]
                try:
                    answers = fut.results()  # one per task (rank) of the branch
                    ok = all(a[0] for a in answers)
                    error = next((a[1] for a in answers if not a[0]), None)
                except Exception as e:  # noqa: BLE001 - the Slurm task died (timeout, OOM, node failure)
                    ok, error = False, f"slurm job {fut.job_id}: {one_line(e)}"
                outcomes[job.out] = outcome_of(job, ok, error)
            monitor.poll()
            time.sleep(0.5)
    finally:
        for fut in waiting:
            fut.cancel(check=False)
        monitor.close()
    return [outcomes[j.out] for j in jobs]
