"""Wall-clock of the branch stage: K = 4 branches of the tiny default, sequential vs parallel local workers.

    .venv/bin/python benchmarks/launch_bench.py [--work /tmp/merit-launch-bench] [--modes seq,seq1,par2]
                                                [--repeats 3]

The embedded default (``merit demo``: tiny θ(0), built-in 39-task mixture, r = 2) is taken to its plan
once (random and joint baselines off); each mode then trains the same 4 branches from a fresh copy of
that folder with ``merit run ... --until branches`` in a new process, so a mode's time includes
everything a user waits for (process start, imports, data loading, training, checkpoint writing):

- ``seq``:  launch.workers=1, branches one after another in the merit process, torch's default threads
- ``seq1``: the same with launch.cpus_per_branch=1 (one thread per branch)
- ``par2``: launch.workers=2, two worker processes at a time with 1 torch thread each (cores // workers)

Modes alternate within each round and the best round counts, since on a shared machine other people's
jobs can only slow a run down. Prints one Markdown table; results and the machine are recorded in
launch_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MERIT = [sys.executable, "-m", "merit.cli"]
MODES = {
    "seq": ("sequential, in-process", ["launch.workers=1"]),
    "seq1": ("sequential, in-process, 1 thread", ["launch.workers=1", "launch.cpus_per_branch=1"]),
    "par2": ("2 parallel worker processes", ["launch.workers=2"]),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def prepare(work: Path) -> Path:
    plan = work / "plan"
    if (plan / "split" / "manifest.json").exists():
        return plan
    log("preparing the plan (tiny θ(0) warm-up, mixture, gradients, split) once")
    subprocess.run(MERIT + ["demo", "--out", str(plan), "--until", "split"]
                   + sets(["baselines.random=false", "baselines.joint=false"]), check=True)
    return plan


def run_mode(plan: Path, work: Path, mode: str) -> dict:
    out = work / mode
    # Each round overwrites the mode's folder; max_diff compares the last round's weights (all rounds are
    # the same computation, bitwise, on this machine).
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(plan, out)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(MERIT + ["run", str(out / "config.yaml"), "--out", str(out), "--until", "branches"]
                   + sets(MODES[mode][1]), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("branches/[0-9]*/manifest.json"))]
    assert len(manifests) == 4, f"{mode}: {len(manifests)} branches finished"
    return {"mode": mode, "wall": wall, "train": [m["seconds"] for m in manifests],
            "threads": manifests[0]["hardware"]["torch_threads"], "steps": sum(m["steps"] for m in manifests),
            "load": load, "out": out}


def max_diff(a: Path, b: Path) -> float:
    worst = 0.0
    for k in range(4):
        x, y = load_file(str(a / f"branches/{k}/model.safetensors")), load_file(str(b / f"branches/{k}/model.safetensors"))
        worst = max(worst, max((x[n] - y[n]).abs().max().item() for n in x))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=Path("/tmp/merit-launch-bench"))
    p.add_argument("--modes", default="seq,seq1,par2")
    p.add_argument("--repeats", type=int, default=1, help="rounds; modes alternate within a round, so a "
                   "change in the machine's load hits every mode alike")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    plan = prepare(args.work)
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for rnd in range(args.repeats):
        for mode in modes:
            log(f"round {rnd + 1}/{args.repeats}, {mode}: {MODES[mode][0]}")
            runs[mode].append(run_mode(plan, args.work, mode))
            log(f"{mode}: {runs[mode][-1]['wall']:.1f} s (load avg {runs[mode][-1]['load']:.2f})")
    best = {m: min(r, key=lambda x: x["wall"]) for m, r in runs.items()}
    base = best[modes[0]]["wall"]
    print(f"\nmachine: {platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"{platform.platform()}")
    print(f"K = 4 branches, {best[modes[0]]['steps']} optimizer steps in all, tiny default (merit demo), "
          f"{args.repeats} round(s)\n")
    print(f"| mode | torch threads / branch | wall-clock s, best | wall-clock s, all rounds | branch training s "
          f"(sum / max, best round) | speed-up vs {modes[0]} (best) | load avg at start |")
    print("|---|---|---|---|---|---|---|")
    for m in modes:
        r, walls = best[m], [x["wall"] for x in runs[m]]
        loads = [x["load"] for x in runs[m]]
        print(f"| {MODES[m][0]} (`{m}`) | {r['threads']} | {r['wall']:.1f} | {', '.join(f'{w:.1f}' for w in walls)} | "
              f"{sum(r['train']):.1f} / {max(r['train']):.1f} | {base / r['wall']:.2f}× | "
              f"{min(loads):.2f}–{max(loads):.2f} |")
    if len(modes) > 1:
        print("\nmax |Δ| of branch weights vs the first mode: "
              + ", ".join(f"{m} {max_diff(best[modes[0]]['out'], best[m]['out']):.2e}" for m in modes[1:]))


if __name__ == "__main__":
    main()
