"""How much of each branch's update survives the merge: task-vector geometry of finished run folders.

    python experiments/task_vectors.py runs/smollm2-bigbench-s0-r2 runs/smollm2-bigbench-s0-r1 [--out FILE]

For every merged variant of a run folder (MERIT's branches and the random baseline's) it reads θ(0), the
branches and the merge tensor by tensor (bounded memory) and reports, with τ_k = θ_k − θ(0) and
τ̄ = θ̄ − θ(0) = Σ_k w_k τ_k:

- the mean pairwise cosine of the branches' task vectors (0: orthogonal updates, 1: the same update);
- retention: for each branch, the share of its own update the merge keeps, (τ̄ · τ_k) / |τ_k|² (the
  mean over branches). With equal weights 1/K and orthogonal τ_k it is 1/K: a branch's tasks then see
  a K-times smaller update than the branch learned;
- |τ̄| / |τ_joint| and cos(τ̄, τ_joint) when the folder (or a sibling of the same seed) has the joint run.

Only the folder's own files are read; nothing is written but the optional Markdown table. `merit diagnose`
reports the same numbers (``displacement.task_vectors``) for the run it diagnoses.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from merit.diagnose.cli import task_vector_geometry_of
from merit.diagnose.inputs import LazyCheckpoint
from merit.merge import safetensors_io as st


def theta0_folder(run: Path) -> Path:
    manifest = json.loads((run / "theta0" / "manifest.json").read_text())
    return Path(manifest.get("path") or run / "theta0")


def geometry(theta0: Path, branches: list[Path], weights: list[float], merged: Path, joint: Path | None) -> dict:
    """The task-vector geometry `merit diagnose` reports (merit.diagnose.landscape), for any run folder."""
    base = LazyCheckpoint(theta0)
    floating = [n for n, e in base.entries.items() if e.dtype in st.FLOAT_NAMES]
    return task_vector_geometry_of(base, [LazyCheckpoint(b) for b in branches], LazyCheckpoint(merged), weights,
                                   LazyCheckpoint(joint) if joint else None, floating)


def variants(run: Path) -> list[tuple[str, list[Path], list[float], Path]]:
    """(row name, branch folders, weights, merged folder) for MERIT and the random baseline of a run."""
    rows = []
    plan = json.loads((run / "split" / "plan.json").read_text())
    k = len(plan["groups"])
    rows.append((f"merit-r{plan['r']}", [run / "branches" / str(i) for i in range(k)], plan["weights"],
                 run / "merged" / "token-weighted"))
    for rb in sorted((run / "baselines").glob("random-k*")):
        rplan = json.loads((rb / "split" / "plan.json").read_text())
        rows.append((rb.name, [rb / "branches" / str(i) for i in range(len(rplan["groups"]))], rplan["weights"],
                     rb / "merged" / "token-weighted"))
    return rows


def find_joint(run: Path) -> Path | None:
    """The joint run of this folder, or of a sibling folder with the same name up to the r suffix."""
    for cand in [run, *sorted(run.parent.glob(run.name.rsplit("-r", 1)[0] + "-r*"))]:
        if (cand / "joint" / "model.safetensors").exists():
            return cand / "joint"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = ap.parse_args()
    lines = ["| run | variant | K | mean cos(τ_i, τ_j) | retention (τ̄·τ_k)/|τ_k|² | |τ̄| / |τ_joint| | "
             "cos(τ̄, τ_joint) | mean cos(τ_k, τ_joint) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in args.runs:
        joint = find_joint(run)
        for name, branches, weights, merged in variants(run):
            g = geometry(theta0_folder(run), branches, weights, merged, joint)
            j = (f"{g['merged_over_joint_norm']:.2f} | {g['cos_merged_joint']:.2f} | {g['mean_cos_branch_joint']:.2f}"
                 if joint else "– | – | –")
            lines.append(f"| {run.name} | {name} | {g['branches']} | {g['mean_pair_cos']:.2f} | "
                         f"{g['mean_retention']:.2f} (1/K = {1 / g['branches']:.2f}) | {j} |")
            print(lines[-1], flush=True)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
