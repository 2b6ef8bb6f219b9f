"""The paper's whole comparison grid on the embedded demo, each row from one ``--set`` line (docs/demo.md).

    python experiments/demo_grid.py [--runs runs] [--out docs/demo-grid.md]

One run folder holds every row that shares the main split (joint budgets, soups, random at several K,
merge operators on MERIT's branches: Table 2 and Table 12); a split of another shape or method (MERIT
1D / 3D, the conflict-induced split, raw-Gram PCA) needs its own folder, where only its branches train.
Rows from the other folders are compared with the main folder's joint on the same items (the same
mixture, eval sets and seed). Resumable: rerun to continue; finished stages are skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "src" / "merit" / "configs" / "demo.yaml"

# folder -> the --set lines that make it (each documented in docs/demo.md)
GRID = {
    "demo-grid": ["baselines.joint_epochs=[0.5,1,2]", "baselines.soups=[2,3]", "baselines.random_k=[2,4,8]",
                  "merge.operators=[token-weighted,uniform,ties,star,tsv,iso-c,iso-cts,model-stock]"],
    "demo-grid-r1": ["split.r=1", "baselines.joint=false", "baselines.random=false"],
    "demo-grid-r3": ["split.r=3", "baselines.joint=false", "baselines.random=false"],
    "demo-grid-greedy": ["split.method=conflict-greedy", "split.r=1", "baselines.joint=false", "baselines.random=false"],
    "demo-grid-raw": ["split.method=pca-median-raw", "baselines.joint=false", "baselines.random=false"],
}
# One thread per process: the tiny model's 2-thread teams wait on each other on a busy 2-core machine.
THREADS = ["launch.threads=1", "launch.cpus_per_branch=1"]


def run_all(runs: Path) -> None:
    from merit.cli import main

    for folder, sets in GRID.items():
        args = ["run", str(DEMO), "--out", str(runs / folder)]
        for s in sets + THREADS:
            args += ["--set", s]
        if main(args) != 0:
            raise SystemExit(f"demo grid: {folder} failed")


def _items(run: Path, row: str, part: str = "") -> dict:
    path = run / "eval" / (f"{row}.{part}.json" if part else f"{row}.json")
    return json.loads(path.read_text())["result"]["items"]


def table(runs: Path) -> str:
    from merit.evaluate.stats import macro_interval, paired_difference

    main = runs / "demo-grid"
    rows = []
    for folder in GRID:
        for name in json.loads((runs / folder / "results.json").read_text())["methods"]:
            if folder != "demo-grid" and name == "base":
                continue  # the same θ(0) in every folder
            rows.append((folder, name))
    lines = ["| row | folder | macro (95% CI) | Δ vs joint | transfer (95% CI) | transfer Δ vs joint |",
             "|---|---|---:|---:|---:|---:|"]
    for folder, name in rows:
        cells = []
        for part in ("", "transfer"):
            mine, joint = _items(runs / folder, name, part), _items(main, "joint", part)
            iv = macro_interval(mine)
            cells.append(f"{iv.estimate:.4f} [{iv.low:.3f}, {iv.high:.3f}]")
            if name == "joint":
                cells.append("—")
            else:
                d = paired_difference(mine, joint)
                cells.append(f"{d.estimate:+.4f} [{d.low:+.3f}, {d.high:+.3f}]" + ("" if d.resolved else " n.r."))
        lines.append(f"| {name} | {folder} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, help="write the table here (default: print it)")
    ap.add_argument("--table-only", action="store_true", help="do not run; tabulate the finished folders")
    args = ap.parse_args()
    if not args.table_only:
        run_all(args.runs)
    text = table(args.runs)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
