"""The local launcher: branch jobs on this machine, one after another or N at once.

- ``launch.workers: 1`` (default, no ``devices``): jobs run one after another in this process, with the
  Trainer's progress bar.
- ``launch.workers: N``: N worker processes (``python -m merit.launch.worker``), each taking the next
  job when it finishes one, with ``launch.cpus_per_branch`` torch threads (default: cores // N, so
  workers do not oversubscribe the CPU) and, with ``launch.devices``, its own ``CUDA_VISIBLE_DEVICES``
  entry. A job's output goes to its log file; this process shows one progress bar per job from the
  jobs' status files.

- ``launch.processes_per_branch: N > 1``: each job is one ``torchrun --standalone --nproc-per-node N``
  (PyTorch's launcher: rendezvous, one process per rank, all ranks stopped when one dies), ``workers``
  jobs at once, each with its ``launch.devices`` entry (N GPUs) or, without GPUs, N CPU processes
  (gloo) sharing ``cpus_per_branch`` threads.

A job that fails (exception, NaN loss, killed by the out-of-memory killer) is reported and the others
carry on.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from pathlib import Path

from merit import artifacts
from merit.launch.base import (Monitor, Outcome, check_processes, cpus_per_branch, execute, outcome_of, pooled,
                               rank_threads)
from merit.launch.worker import MARK
from merit.registry import register

if TYPE_CHECKING:
    from merit.config import LaunchConfig
    from merit.train.branch import BranchJob


@register("launcher", "local")
def run_local(jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]:
    """Run every job on this machine: one after another in this process, or in launch.workers processes."""
    done = {j.out: Outcome(j.name, j.out, True) for j in jobs if artifacts.is_done(j.out, j.key)}
    todo = [j for j in jobs if j.out not in done]
    check_processes(cfg)
    slots = _slots(cfg)
    if cfg.processes_per_branch > 1:
        outcomes = _torchrun_jobs(todo, cfg, slots) if todo else []
    elif len(slots) == 1 and slots[0] is None:
        outcomes = [_in_process(job, cfg) for job in todo]
    else:
        outcomes = _processes(todo, cfg, slots) if todo else []
    done.update({o.out: o for o in outcomes})
    return [done[j.out] for j in jobs]


def _slots(cfg) -> list[str | None]:
    """One entry per concurrent worker: the CUDA_VISIBLE_DEVICES value it gets, or None (inherit)."""
    if cfg.devices:
        return list(cfg.devices[: cfg.workers or len(cfg.devices)])
    if cfg.gpus_per_branch:
        import torch

        n, g = torch.cuda.device_count(), cfg.gpus_per_branch
        if g >= 1:  # consecutive GPUs per worker
            g = int(g)
            groups = [",".join(str(d) for d in range(i, i + g)) for i in range(0, n - g + 1, g)]
        else:  # a fraction: round(1/g) workers share each GPU
            groups = [str(d) for d in range(n) for _ in range(round(1 / g))]
        if not groups:
            from merit.errors import ConfigError

            raise ConfigError(f"launch.gpus_per_branch={cfg.gpus_per_branch}: this machine has {n} GPU(s)")
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
    """One thread per slot keeps one worker process busy with jobs from a shared queue; a worker that
    dies (killed, out of memory, crash) fails only its current job and is replaced for the next."""
    threads = cpus_per_branch(cfg, default=max(1, (os.cpu_count() or 1) // len(slots)))
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for job in jobs:
        todo.put(job)
    outcomes: dict[Path, Outcome] = {}
    procs: dict[int, subprocess.Popen] = {}
    drivers = [threading.Thread(target=_drive, args=(i, slots[i], threads, todo, outcomes, procs), daemon=True)
               for i in range(min(len(slots), len(jobs)))]
    monitor = Monitor(jobs)
    try:
        for d in drivers:
            d.start()
        while any(d.is_alive() for d in drivers):
            monitor.poll()
            time.sleep(0.2)
    finally:
        for proc in list(procs.values()):  # interrupted: do not leave orphans training in the background
            if proc.poll() is None:
                proc.terminate()
        for d in drivers:
            d.join(timeout=30)
        monitor.close()
    return [outcomes[j.out] for j in jobs]


def _drive(i: int, devices: str | None, threads: int, todo: queue.SimpleQueue, outcomes: dict, procs: dict) -> None:
    proc = None
    while True:
        try:
            job = todo.get_nowait()
        except queue.Empty:
            break
        if proc is None:
            proc = procs[i] = _start_worker(threads, devices)
        answer = None
        try:
            proc.stdin.write(f"{_job_file(job)}\n")
            proc.stdin.flush()
            for line in proc.stdout:  # skips anything that is not an answer
                if line.startswith(MARK):
                    answer = json.loads(line[len(MARK):])
                    break
        except (BrokenPipeError, OSError):
            pass
        if answer is None:  # the worker died during this job
            outcomes[job.out] = outcome_of(job, False, _exit_reason(proc.wait()))
            proc = None
            continue
        outcomes[job.out] = outcome_of(job, answer["ok"], answer["error"])
        if outcomes[job.out].ok:
            _job_file_path(job).unlink(missing_ok=True)
    if proc is not None:
        proc.stdin.close()
        proc.wait()


def _start_worker(threads: int, devices: str | None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # its output goes to a log file
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return subprocess.Popen([sys.executable, "-m", "merit.launch.worker", "--serve", "--threads", str(threads),
                             "--launcher", "local"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)


def _torchrun_jobs(jobs: list, cfg, slots: list[str | None]) -> list[Outcome]:
    """Every job as one torchrun of ``launch.processes_per_branch`` ranks, ``len(slots)`` at once."""
    threads = rank_threads(cfg, default=max(1, (os.cpu_count() or 1) // len(slots)))
    free: queue.SimpleQueue = queue.SimpleQueue()
    for slot in slots:
        free.put(slot)
    procs: dict[Path, subprocess.Popen] = {}

    def one(job) -> Outcome:
        slot = free.get()
        try:
            rc = _torchrun(job, cfg.processes_per_branch, threads, slot, procs)
        finally:
            free.put(slot)
        ok = rc == 0
        if ok:
            _job_file_path(job).unlink(missing_ok=True)
        return outcome_of(job, ok, None if ok else f"torchrun: {_exit_reason(rc)}")

    def stop() -> None:  # interrupted: stop every rank (torchrun forwards the signal to them)
        for proc in list(procs.values()):
            if proc.poll() is None:
                proc.terminate()

    return pooled(jobs, one, len(slots), on_exit=stop)


def _torchrun(job, n: int, threads: int, devices: str | None, procs: dict) -> int:
    """Run ``job`` as ``torchrun --standalone --nproc-per-node n``; its exit code. torchrun's own
    messages go to the job's log, each rank's output to its rank log (merit.launch.worker). On CPU the
    ranks form a gloo group: ``training_arguments`` asks for CPU training when WORLD_SIZE > 1."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_DISABLE_PROGRESS_BARS="1")  # its output goes to a log file
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--max-restarts=0", "-m", "merit.launch.worker", "--threads", str(threads), "--launcher", "local",
           str(_job_file(job))]
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        proc = procs[job.out] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            return proc.wait()
        finally:
            procs.pop(job.out, None)


def _exit_reason(rc: int) -> str:
    if rc < 0:
        import signal

        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"worker exited with code {rc}"
