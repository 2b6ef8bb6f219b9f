"""The gradient stage at scale: worker processes (grads.workers) and arithmetic (grads.precision).

1. ``workers``: `merit run --until grads` on the SmolLM2 config's 12 BIG-bench tasks with 1 and 2 local
   gradient workers (each with 1 torch thread vs 1 process with 2 threads); calibration tokens per second.
2. ``precision``: the same stage in fp32 and bf16 (autocast, fp32 accumulation); wall time, and fidelity of
   bf16's cosine matrix against fp32's (Pearson over the off-diagonal entries, mean absolute error).

    python benchmarks/grads_bench.py            # needs the SmolLM2 preset (configs/smollm2-bigbench.yaml)

Results are appended to benchmarks/scale_results.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

CONFIG = HERE.parent / "configs" / "smollm2-bigbench.yaml"


def run(out: Path, sets: list[str]) -> tuple[float, str]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "merit.cli", "run", str(CONFIG), "--out", str(out), "--until", "grads",
           "--set", "grads.calibration_size=32", "--set", "grads.batch_size=8"]
    for s in sets:
        cmd += ["--set", s]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return time.time() - start, proc.stderr


def grads_seconds(log: str) -> float:
    return float(re.search(r"grads: finished in ([\d.]+) (s|min)", log).group(1)) * (
        60 if re.search(r"grads: finished in [\d.]+ min", log) else 1)


def main() -> None:
    from merit.conflict.store import load_conflict

    work = Path("/tmp/merit-grads-bench")
    rows = []
    run(work / "warm", ["grads.calibration_size=1"])  # θ(0) converted and data tokenized once, outside the timings
    for name, sets in [("1 process × 2 threads", ["launch.threads=2"]),
                       ("2 workers × 1 thread", ["grads.workers=2", "launch.cpus_per_branch=1"]),
                       ("bf16, 1 process × 2 threads", ["launch.threads=2", "grads.precision=bf16"])]:
        out = work / re.sub(r"\W+", "-", name)
        wall, log = run(out, sets)
        tokens = sum(e["tokens"] for e in json.loads((out / "grads" / "manifest.json").read_text())["sources"])
        rows.append({"setting": name, "wall_s": round(wall, 1), "grads_s": grads_seconds(log),
                     "tokens_per_s": round(tokens / grads_seconds(log)), "out": str(out)})
        print(rows[-1], flush=True)
    _, c32 = load_conflict(Path(rows[0]["out"]) / "grads")
    _, c16 = load_conflict(Path(rows[2]["out"]) / "grads")
    off = ~np.eye(len(c32), dtype=bool)
    pearson = float(np.corrcoef(c32[off], c16[off])[0, 1])
    mae = float(np.abs(c32[off] - c16[off]).mean())
    _, c2 = load_conflict(Path(rows[1]["out"]) / "grads")
    same = bool(np.array_equal(c32, c2))
    lines = ["| setting | stage wall (s) | calibration tokens/s |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {r['grads_s']} | {r['tokens_per_s']} |" for r in rows]
    table = "\n".join(lines)
    text = (f"{table}\n\nbf16 vs fp32 cosine matrix (12 sources, off-diagonal): Pearson {pearson:.5f}, "
            f"MAE {mae:.5f}. 2 workers vs 1 process: cosine matrices identical: {same} "
            "(different thread counts per process, so equality is not expected bitwise).\n")
    print(text)
    with open(HERE / "scale_results.md", "a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `python benchmarks/grads_bench.py`\n\n"
                f"Machine: {machine()}\n\n{text}")


if __name__ == "__main__":
    main()
