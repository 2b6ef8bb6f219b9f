"""``python -m merit.launch.worker``: a worker process of the local launcher.

``python -m merit.launch.worker JOB.pkl ...`` runs pickled branch jobs one after another (under
``torchrun`` each rank runs it: a multi-process branch, rank 0 logging to the job's log file and rank r
to ``<k>.rank<r>.log``). With
``--serve`` it reads job-file paths from stdin, one per line, and answers each on its original stdout
with one ``MERIT-WORKER {"ok": ..., "error": ...}`` line. The launcher keeps N such workers busy, so a
worker pays the torch/transformers import once, not once per branch. While a job runs, the process's
stdout and stderr (warnings, a traceback of a hard crash) go to that job's log file. ``OMP_NUM_THREADS``
and ``CUDA_VISIBLE_DEVICES`` are set by the launcher for the worker's share of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys

from merit.launch.base import execute

MARK = "MERIT-WORKER "


def _run_one(path: str, threads: int | None, launcher: str) -> tuple[bool, str | None]:
    with open(path, "rb") as f:
        job = pickle.load(f)
    # Send this job's output to its log file (fd level, so C-level output and crashes land there too).
    sys.stdout.flush()
    sys.stderr.flush()
    job.log.parent.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun: rank r > 0 writes its own log
    from merit.launch.status import rank_log_path

    fd = os.open(job.log if rank == 0 else rank_log_path(job.out, rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    ok, error = execute(job, threads=threads, launcher=launcher)
    if not ok:
        print(f"merit: error: {job.name} failed: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    return ok, error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merit.launch.worker")
    p.add_argument("jobs", nargs="*", help="pickled merit.train.branch.BranchJob files")
    p.add_argument("--serve", action="store_true", help="read job files from stdin, answer on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--launcher", default="local")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    control = os.fdopen(os.dup(1), "w", buffering=1)  # answers go here; fd 1 itself follows the job's log
    home = os.dup(2)
    os.dup2(home, 1)  # between jobs, stray output goes to stderr, never into the answer channel
    paths = (line.strip() for line in sys.stdin) if args.serve else iter(args.jobs)
    failed = 0
    for path in paths:
        if not path:
            continue
        ok, error = _run_one(path, args.threads, args.launcher)
        os.dup2(home, 1)
        os.dup2(home, 2)
        failed += not ok
        if args.serve:
            control.write(MARK + json.dumps({"ok": ok, "error": error}) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
