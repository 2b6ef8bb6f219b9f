"""Data at scale: `merit run --until grads` on a synthetic text mixture, before (in-memory token lists,
re-tokenized by each stage) and after (the Arrow token cache, merit.data.tokens).

For each mixture size (examples over 16 sources) and each side, two runs in a fresh run folder: the first
from nothing, the second with another gradient setting (grads.sketch_dim), which must not tokenize again.
Each run is a child process; its peak RSS is the largest resident set of it and of every process it
started (os.wait4's rusage: tokenizer workers and gradient workers count too).

    python benchmarks/data_bench.py --sizes 20000 200000 --before-src /tmp/merit-before/src

``--before-src``: a checkout of the code before the token cache (``git worktree add /tmp/merit-before
fafb8ec``). Results are appended to benchmarks/data_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine  # noqa: E402

WORDS = ("alpha beta gamma delta river stone cloud paper light green seven orange quiet market window "
         "garden silver number letter simple").split()


def write_mixture(root: Path, total: int, sources: int = 16, seed: int = 0) -> Path:
    """``total`` chat examples over ``sources`` JSONL files, ~40-80 tokens each, and a small eval split."""
    rng = random.Random(seed)
    for s in range(sources):
        for split, n in (("train", total // sources), ("eval", 4)):
            path = root / split / f"task{s:02d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                for _ in range(n):
                    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 24))]
                    answer = " ".join(sorted(words)[: 3 + s % 5])
                    f.write(json.dumps({"messages": [{"role": "user", "content": f"Task {s}: " + " ".join(words)},
                                                     {"role": "assistant", "content": answer}]}) + "\n")
    return root


def tiny_checkpoint(folder: Path) -> Path:
    from merit.models.tiny import build_model, build_tokenizer, save_checkpoint

    if not (folder / "config.json").exists():
        tok = build_tokenizer([" ".join(WORDS) * 3, "user\nassistant\nTask 0123456789"] * 20, vocab_size=400)
        save_checkpoint(build_model(tok, seed=0, hidden=64, layers=2), tok, folder)
    return folder


def run_child(src: Path, config: Path, out: Path, sets: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "merit.cli", "run", str(config), "--out", str(out), "--until", "grads"]
    for s in sets:
        cmd += ["--set", s]
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    if status != 0:
        raise SystemExit(f"run failed ({status}):\n{output[-3000:]}")
    stage = {m.group(1): float(m.group(2)) for m in re.finditer(r"\[merit\] (\w+): finished in ([\d.]+) s", output)}
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "stages": stage,
            "tokenized": "mixture: tokenizing" in output}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[20000, 200000])
    p.add_argument("--before-src", type=Path, default=None, help="src/ of the code before the token cache")
    p.add_argument("--work", type=Path, default=Path("/tmp/merit-data-bench"))
    p.add_argument("--out", type=Path, default=HERE / "data_results.md")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    theta0 = tiny_checkpoint(args.work / "theta0")
    sides = [("after", HERE.parent / "src")] + ([("before", args.before_src)] if args.before_src else [])
    rows = []
    for size in args.sizes:
        mix = write_mixture(args.work / f"mix-{size}", size)
        config = args.work / f"run-{size}.yaml"
        config.write_text(json.dumps({
            "model": {"path": str(theta0)}, "mixture": {"dir": str(mix), "max_length": 128},
            "grads": {"calibration_size": 32, "batch_size": 16, "sketch_dim": 4096}, "split": {"r": 2},
            "baselines": {"random": False}}))
        for side, src in sides:
            out = args.work / f"out-{size}-{side}"
            shutil.rmtree(out, ignore_errors=True)
            first = run_child(src, config, out, [])
            second = run_child(src, config, out, ["grads.sketch_dim=2048"])
            rows.append({"examples": size, "side": side, "first": first, "second": second})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    header = ("| examples | code | 1st run wall (s) | 1st peak RSS (MB) | mixture (s) | grads (s) | "
              "2nd run wall (s) | 2nd peak RSS (MB) | 2nd tokenizes? | 2nd grads (s) |")
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        f, s = r["first"], r["second"]
        lines.append(f"| {r['examples']:,} | {r['side']} | {f['wall_s']} | {f['peak_rss_mb']} | "
                     f"{f['stages'].get('mixture', '')} | {f['stages'].get('grads', '')} | {s['wall_s']} | "
                     f"{s['peak_rss_mb']} | {'yes' if s['tokenized'] else 'no'} | {s['stages'].get('grads', '')} |")
    table = "\n".join(lines)
    print(table)
    with open(args.out, "a") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `python benchmarks/data_bench.py "
                f"{' '.join(sys.argv[1:])}`\n\nMachine: {machine()}\n\n{table}\n\n```json\n{json.dumps(rows)}\n```\n")


if __name__ == "__main__":
    main()
