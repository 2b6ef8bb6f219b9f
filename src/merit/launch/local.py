"""The local launcher: branch jobs on this machine, one after another or N at once.

- ``launch.workers: 1`` (default, no ``devices``): jobs run one after another in this process, with the
  Trainer's progress bar.
- ``launch.workers: N``: N worker processes at a time (``python -m merit.launch.worker``), each with
  ``launch.cpus_per_branch`` torch threads (default: cores // N, so workers do not oversubscribe the
  CPU) and, with ``launch.devices``, its own ``CUDA_VISIBLE_DEVICES`` entry. A worker's output goes to
  the job's log file; this process shows one progress bar per job from the jobs' status files.

A job that fails (exception, NaN loss, killed by the out-of-memory killer) is reported and the others
carry on.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from merit import artifacts
from merit.launch import status as st
from merit.launch.base import Monitor, Outcome, cpus_per_branch, execute, outcome_of
from merit.registry import register


@register("launcher", "local")
def run_local(jobs: Sequence, cfg) -> list[Outcome]:
    """Run every job on this machine; see the module docstring for sequential vs parallel."""
    jobs = [j for j in jobs if not artifacts.is_done(j.out, j.key)]
    slots = _slots(cfg)
    if len(slots) == 1 and slots[0] is None:
        return [_in_process(job, cfg) for job in jobs]
    return _processes(jobs, cfg, slots)


def _slots(cfg) -> list[str | None]:
    """One entry per concurrent worker: the CUDA_VISIBLE_DEVICES value it gets, or None (inherit)."""
    if cfg.devices:
        return list(cfg.devices[: cfg.workers or len(cfg.devices)])
    if cfg.gpus_per_branch:
        import torch

        n, g = torch.cuda.device_count(), int(cfg.gpus_per_branch)
        groups = [",".join(str(d) for d in range(i, i + g)) for i in range(0, n - g + 1, g)]
        if not groups:
            from merit.errors import ConfigError

            raise ConfigError(f"launch.gpus_per_branch={g}: this machine has {n} GPU(s)")
        return groups[: cfg.workers or len(groups)]
    return [None] * (cfg.workers or 1)


def _in_process(job, cfg) -> Outcome:
    import torch

    before = torch.get_num_threads()
    try:
        ok, error = execute(job, threads=cfg.cpus_per_branch, launcher="local", progress=True)
    finally:
        torch.set_num_threads(before)
    return outcome_of(job, ok, error)


def _job_file_path(job) -> Path:
    return job.out.parent / f".{job.out.name}.job.pkl"


def _job_file(job) -> Path:
    path = _job_file_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(job, f)
    return path


def _processes(jobs: list, cfg, slots: list[str | None]) -> list[Outcome]:
    threads = cpus_per_branch(cfg, default=max(1, (os.cpu_count() or 1) // len(slots)))
    pending = list(jobs)
    running: dict[str | None | int, tuple[subprocess.Popen, object]] = {}
    outcomes: dict[Path, Outcome] = {}
    monitor = Monitor(jobs)
    free = list(range(len(slots)))
    try:
        while pending or running:
            while pending and free:
                i = free.pop(0)
                job = pending.pop(0)
                running[i] = (_start(job, threads, slots[i]), job)
            for i, (proc, job) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del running[i]
                free.append(i)
                outcomes[job.out] = outcome_of(job, rc == 0, None if rc == 0 else _exit_reason(rc))
                if outcomes[job.out].ok:
                    _job_file_path(job).unlink(missing_ok=True)
            monitor.poll()
            time.sleep(0.2)
    finally:
        for proc, _ in running.values():  # interrupted: do not leave orphans training in the background
            proc.terminate()
        for proc, _ in running.values():
            proc.wait()
        monitor.close()
    return [outcomes[j.out] for j in jobs]


def _start(job, threads: int, devices: str | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false")
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    log = st.log_path(job.out)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "merit.launch.worker", str(_job_file(job)),
                                 "--threads", str(threads), "--launcher", "local"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _exit_reason(rc: int) -> str:
    if rc < 0:
        import signal

        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"worker exited with code {rc}"
