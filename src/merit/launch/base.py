"""The launcher interface, shared by ``local``, ``ray`` and ``slurm``.

A launcher is a function registered as ``@register("launcher", name)`` with the signature
``(jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]``. It runs every job (in any order,
any number at once), never raises for a job that failed, and returns one Outcome per job. Each job
writes its own log, status file and manifest (``merit.train.branch.run_branch``), so what a user sees
in the run folder is the same whichever launcher ran it.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from merit import artifacts
from merit.errors import ConfigError, MeritError
from merit.launch import status as st

if TYPE_CHECKING:
    from merit.config import LaunchConfig
    from merit.train.branch import BranchJob


@dataclass
class Outcome:
    """What became of one job."""

    name: str
    out: Path
    ok: bool
    error: str | None = None

    @property
    def log(self) -> Path:
        return st.log_path(self.out)


class Launcher(Protocol):
    def __call__(self, jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]: ...


class BranchFailed(MeritError):
    """One or more branch jobs failed; the message names each with its error and log file."""

    def __init__(self, failed: Sequence[Outcome], partial: bool = False):
        self.failed = list(failed)
        what = "; ".join(f"{o.name} ({o.error or 'failed'}; log: {o.log})" for o in self.failed)
        tail = ("the run went on without them (--allow-partial: merges are marked partial); rerun the same "
                "command to retrain them"
                if partial else "fix the cause and rerun the same command to resume, or pass --allow-partial to "
                "merge the branches that finished")
        super().__init__(f"{len(self.failed)} job(s) failed: {what}; {tail}")


def require(module: str, kind: str, extra: str):
    """Import an optional dependency of a launcher, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"launch.kind={kind} needs the {module!r} package: "
                          f"pip install 'merit-tune[{extra}]'") from None


def launch(jobs: Sequence[BranchJob], cfg: LaunchConfig) -> list[Outcome]:
    """Run ``jobs`` with the launcher named by ``cfg.kind``; the outcomes of the jobs that failed."""
    from merit import plugins

    launcher = plugins.get("launcher", cfg.kind, field="launch.kind")
    outcomes = launcher(list(jobs), cfg)
    return [o for o in outcomes if not o.ok]


def check_processes(cfg: LaunchConfig) -> None:
    """``launch.processes_per_branch`` against the GPUs the config gives each branch (one process per GPU)."""
    n = cfg.processes_per_branch
    if n == 1:
        return
    for i, entry in enumerate(cfg.devices or []):
        count = len([d for d in str(entry).split(",") if d.strip()])
        if count < n:
            raise ConfigError(f"launch.processes_per_branch={n}: launch.devices[{i}] = {entry!r} names {count} GPU(s); "
                              f"a branch of {n} processes needs {n} (e.g. \"{','.join(str(d) for d in range(n))}\")")
    if cfg.kind == "slurm":
        ranks_per_node(cfg)
    if 0 < cfg.gpus_per_branch < n:
        raise ConfigError(f"launch.processes_per_branch={n}: launch.gpus_per_branch={cfg.gpus_per_branch:g} gives "
                          f"fewer GPUs than processes; set gpus_per_branch to {n} (one per process) or 0 (CPU)")


def ranks_per_node(cfg: LaunchConfig) -> int:
    """Slurm tasks per node of a multi-process branch: its processes spread over ``launch.slurm.nodes``."""
    nodes = int((cfg.slurm or {}).get("nodes", 1))
    if cfg.processes_per_branch % nodes:
        raise ConfigError(f"launch.processes_per_branch={cfg.processes_per_branch} does not divide over "
                          f"launch.slurm.nodes={nodes}")
    return cfg.processes_per_branch // nodes


def rank_threads(cfg: LaunchConfig, default: int) -> int:
    """Torch threads of each process of a branch: the branch's CPUs split over its processes."""
    return max(1, cpus_per_branch(cfg, default=default) // cfg.processes_per_branch)


def cpus_per_branch(cfg: LaunchConfig, default: int | None = None) -> int:
    """CPU threads for one branch: ``launch.cpus_per_branch``, else this machine's cores split over workers
    (so that two workers on two cores do not each start two threads and fight over the cores)."""
    if cfg.cpus_per_branch is not None:
        return cfg.cpus_per_branch
    if default is not None:
        return default
    return max(1, (os.cpu_count() or 1) // (cfg.workers or 1))


def execute(job: BranchJob, threads: int | None = None, launcher: str | None = None,
            progress: bool = False) -> tuple[bool, str | None]:
    """Run one job where this function is called (a worker process, a Ray task, a Slurm task): a
    branch job, or a share of the gradient stage (``merit.conflict.job.GradJob``), both with ``run``.

    Returns (ok, one-line error) instead of raising, so a launcher can collect every failure; the
    traceback is in the job's log file.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not sys.stderr.isatty():  # a worker whose output is a log file: no weight loading/saving bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        job.run(progress=progress, launcher=launcher)  # a branch (merit.train.branch) or gradient job
        return True, None
    except Exception as e:  # noqa: BLE001 - reported, with its traceback in the log
        return False, one_line(e)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def outcome_of(job: BranchJob, ok: bool, error: str | None) -> Outcome:
    """The outcome of a job whose process ended; records a failure the job could not record itself
    (killed by a signal, out of memory, lost node) in its status file."""
    done = artifacts.is_done(job.out, job.key)
    if ok and done:
        return Outcome(job.name, job.out, True)
    error = error or "ended without writing its checkpoint"
    state = (st.read_status(job.out) or {}).get("state")
    if state != "failed":
        st.write_status(job.out, name=job.name, state="failed", error=error, finished=time.time())
    else:
        error = (st.read_status(job.out) or {}).get("error") or error
    return Outcome(job.name, job.out, False, error)


def check_branches(folders: Sequence[Path], groups: Sequence[Sequence[str]], theta0_hash: str,
                   mixture: dict | None = None) -> None:
    """Before a merge: every branch manifest names the same θ(0) and exactly its plan group's sources.

    Branches trained elsewhere and copied into the run folder are checked the same way, so a branch
    from another plan, another θ(0) or other data files cannot slip into the merge.
    """
    from merit.train.branch import data_hash

    for folder, group in zip(folders, groups):
        m = artifacts.read_manifest(folder)
        if m is None:
            raise MeritError(f"{folder}: no manifest.json; the branch did not finish")
        if m.get("theta0_hash") != theta0_hash:
            raise MeritError(f"{folder}/manifest.json: trained from θ(0) {str(m.get('theta0_hash'))[:12]}…, "
                             f"not this run's {theta0_hash[:12]}…; retrain it from this run's θ(0)")
        if sorted(m.get("sources", [])) != sorted(group):
            raise MeritError(f"{folder}/manifest.json: sources {sorted(m.get('sources', []))} differ from the "
                             f"plan's group {sorted(group)}; it belongs to another plan")
        if mixture is not None and m.get("data_hash") not in (None, data_hash(mixture, tuple(group))):
            raise MeritError(f"{folder}/manifest.json: data hash differs from this run's mixture files; "
                             "it was trained on other data")


def pooled(jobs: Sequence[BranchJob], one, workers: int, on_exit=None) -> list[Outcome]:
    """``one(job) -> Outcome`` for every job, ``workers`` at once in threads (each thread waits on a job
    that runs elsewhere: a torchrun, a Ray Train run), with the progress bars of their status files;
    ``on_exit`` runs last however this ends (stop what is still running when interrupted)."""
    from concurrent.futures import ThreadPoolExecutor

    monitor = Monitor(jobs)
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))))
    try:
        futures = [pool.submit(one, job) for job in jobs]
        while not all(f.done() for f in futures):
            monitor.poll()
            time.sleep(0.2)
        return [f.result() for f in futures]
    finally:
        if on_exit is not None:
            on_exit()
        pool.shutdown(wait=True, cancel_futures=True)
        monitor.close()


class Monitor:
    """Progress bars for jobs running in other processes, fed by their status files (one bar per job)."""

    def __init__(self, jobs: Sequence[BranchJob], enabled: bool | None = None):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.jobs = list(jobs)
        # tqdm's disable=None turns bars off when stderr is not a terminal (logs, CI).
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bars: dict[Path, Any] = {}
        self.last = 0.0
        self.since = time.time() - 1.0  # status files older than this are from an earlier attempt

    def poll(self, force: bool = False) -> None:
        if not self.enabled or (not force and time.time() - self.last < 0.5):
            return
        self.last = time.time()
        for i, job in enumerate(self.jobs):
            status = st.read_status(job.out) or {}
            if not status.get("max_steps") or status.get("started", 0) < self.since:
                continue
            bar = self.bars.get(job.out)
            if bar is None:
                bar = self.bars[job.out] = self._tqdm(total=status["max_steps"], desc=job.name, position=i,
                                                      leave=True, dynamic_ncols=True)
            bar.n = int(status.get("step", 0))
            if status.get("loss") is not None:
                bar.set_postfix(loss=f"{status['loss']:.4g}", refresh=False)
            bar.refresh()

    def close(self) -> None:
        self.poll(force=True)
        for bar in self.bars.values():
            bar.close()
