"""The Ray launcher: each branch is a Ray task that asks for its CPUs and GPUs.

``launch.address`` connects to an existing cluster (e.g. ``ray://head:10001`` or ``auto``); without it a
local Ray instance is started for the run and shut down after it. Tasks read and write the run folder
directly, so on a cluster the run folder must be on a filesystem every node sees (the same is true of
θ(0) and the data). Ray is an optional extra: ``pip install 'merit-tune[ray]'``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from merit.launch.base import Monitor, Outcome, cpus_per_branch, execute, one_line, outcome_of, require
from merit.registry import register

if TYPE_CHECKING:
    from merit.config import LaunchConfig
    from merit.train.branch import BranchJob


def _task(job, threads: int) -> tuple[bool, str | None]:
    # Runs in a Ray worker process: the job's log, status and checkpoint go to the run folder as usual.
    return execute(job, threads=threads, launcher="ray")


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
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = True
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
