"""Per-job status files and the run-folder overview behind ``merit status``.

Every branch job (and the joint baseline) has, beside its checkpoint folder ``<parent>/<name>/``:

- ``<parent>/<name>.log``          one log file, whatever launcher ran it
- ``<parent>/<name>.status.json``  ``{"state": "running" | "done" | "failed", "pid", "host", "step", ...}``
- ``<parent>/.<name>.work/``       Trainer checkpoints for resume (removed once the job is done)

The status file is a hint for people; the manifest inside the checkpoint folder stays the only proof
that a job finished. A "running" job whose process is gone (killed, out of memory, machine reboot) is
shown as failed when the status is read on the host that ran it.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from merit import artifacts

STATES = ("pending", "running", "done", "failed")


def log_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.log"


def rank_log_path(out: Path, rank: int) -> Path:
    """The log of a non-zero rank of a multi-process branch: ``branches/<k>.rank<r>.log``."""
    out = Path(out)
    return out.parent / f"{out.name}.rank{rank}.log"


def status_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.status.json"


def work_path(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.work"


def read_status(out: Path) -> dict | None:
    p = status_path(out)
    try:
        return artifacts.read_json(p) if p.exists() else None
    except ValueError:  # torn by a crash mid-write on a filesystem without atomic rename
        return None


def write_status(out: Path, **fields: Any) -> dict:
    """Merge ``fields`` into the job's status file (atomically) and stamp it with the time."""
    status = read_status(out) or {}
    status.update(fields, updated=time.time())
    artifacts.write_json(status_path(out), status)
    return status


def mark_started(out: Path, name: str, launcher: str | None = None) -> dict:
    return write_status(out, name=name, state="running", pid=os.getpid(), host=socket.gethostname(),
                        started=time.time(), finished=None, error=None, log=str(log_path(out)),
                        **({"launcher": launcher} if launcher else {}))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def job_state(out: Path) -> tuple[str, dict]:
    """(state, status dict) of one job folder; the manifest wins over whatever the status file says."""
    status = read_status(out) or {}
    if artifacts.read_manifest(out) is not None:
        return "done", status
    state = status.get("state", "pending")
    if state == "done":  # status says done but no manifest: the folder was removed or never renamed
        return "failed", {**status, "error": "status says done but the checkpoint folder has no manifest"}
    if state == "running" and status.get("host") == socket.gethostname() and status.get("pid"):
        if not _alive(int(status["pid"])):
            return "failed", {**status, "error": f"process {status['pid']} is gone (killed or out of memory?)"}
    return state, status


# ------------------------------------------------------------------------------------------ run overview


def _job_line(label: str, out: Path, root: Path, indent: int = 2) -> tuple[str, str]:
    state, st = job_state(out)
    parts = []
    if state == "running":
        if st.get("max_steps"):
            parts.append(f"step {st.get('step', 0)}/{st['max_steps']}")
        parts.append(f"pid {st.get('pid')} on {st.get('host')}")
    elif state == "failed" and st.get("error"):
        parts.append(st["error"])
    elif state == "done":
        m = artifacts.read_manifest(out) or {}
        if m.get("seconds") is not None:
            parts.append(f"{m.get('steps', '?')} steps, {m['seconds']} s")
        if m.get("resumed_from_step"):
            parts.append(f"resumed at step {m['resumed_from_step']}")
    log = log_path(out)
    if log.exists():
        parts.append(f"log: {log.relative_to(root) if log.is_relative_to(root) else log}")
    return state, f"{' ' * indent}{label:<{24 - indent}} {state:<8} {'  '.join(parts)}".rstrip()


def _stage(folder: Path) -> str:
    return "done" if artifacts.read_manifest(folder) is not None else "pending"


def overview(run_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Lines describing every stage and job of a run folder, and a count of jobs per state."""
    run_dir = Path(run_dir)
    lines, counts = [], {s: 0 for s in STATES}
    for stage in ("theta0", "mixture", "grads"):
        lines.append(f"{stage:<24} {_stage(run_dir / stage)}")
    roots = [run_dir] + sorted(p for p in (run_dir / "baselines").glob("[!.]*") if p.is_dir())
    for root in roots:
        tag = "" if root == run_dir else f" ({root.name})"
        plan_file = root / "split" / "plan.json"
        lines.append(f"{'split' + tag:<24} {_stage(root / 'split')}")
        if not plan_file.exists():
            continue
        try:
            groups = artifacts.read_json(plan_file)["groups"]
            if not isinstance(groups, list):
                raise ValueError("no groups list")
        except (OSError, ValueError, KeyError, TypeError):
            lines.append(f"{'branches' + tag:<24} unknown: {plan_file} is damaged (a rerun of merit run redoes the split)")
            continue
        block, done = [], 0
        for k in range(len(groups)):
            state, line = _job_line(f"branch {k}", root / "branches" / str(k), run_dir)
            counts[state] += 1
            done += state == "done"
            block.append(line)
        lines.append(f"{'branches' + tag:<24} {done}/{len(groups)} done")
        lines += block
        for merged in sorted(p for p in (root / "merged").glob("[!.]*") if p.is_dir()):
            m = artifacts.read_manifest(merged)
            note = f" (partial: missing branches {m.get('missing', [])})" if m and m.get("partial") else ""
            lines.append(f"{'merged/' + merged.name + tag:<24} {'done' if m else 'pending'}{note}")
    if (run_dir / "joint").exists() or status_path(run_dir / "joint").exists():
        state, line = _job_line("joint", run_dir / "joint", run_dir, indent=0)
        counts[state] += 1
        lines.append(line)
    evals = sorted(p.stem for p in (run_dir / "eval").glob("*.json"))
    lines.append(f"{'eval':<24} {', '.join(evals) if evals else 'pending'}")
    lines.append(f"{'report':<24} {'done' if (run_dir / 'report.md').exists() else 'pending'}")
    return lines, counts
