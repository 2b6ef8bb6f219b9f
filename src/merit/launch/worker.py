"""``python -m merit.launch.worker JOB.pkl``: run one pickled branch job in this process.

The local launcher starts one of these per parallel worker, with its stdout/stderr appended to the job's
log file and ``OMP_NUM_THREADS`` / ``CUDA_VISIBLE_DEVICES`` set for its share of the machine. Exit code 0
means the job's checkpoint and manifest are written; anything else is a failure recorded in the job's
status file and log.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys

from merit.launch.base import execute


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merit.launch.worker")
    p.add_argument("job", help="a pickled merit.train.branch.BranchJob")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--launcher", default="local")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(args.job, "rb") as f:
        job = pickle.load(f)
    ok, error = execute(job, threads=args.threads, launcher=args.launcher)
    if not ok:
        print(f"merit: error: {job.name} failed: {error}", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
