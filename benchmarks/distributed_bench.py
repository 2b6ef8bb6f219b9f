"""A multi-process branch against a one-process branch on this CPU: the same global batch, tokens/s.

    .venv/bin/python benchmarks/distributed_bench.py --model ~/.cache/merit/smollm2-135m-instruct \\
        [--data ../shared/data/bigbench-mix] [--steps 6]

Both sides run merit's ``train()`` (transformers' Trainer) on the same examples with a global batch of 8:
one process with all the cores as torch threads and batch 8, and ``torchrun --nproc-per-node 2`` (DDP over
gloo, the path ``launch.processes_per_branch: 2`` takes) with one thread per rank and batch 4 per rank.
Each side warms up with one step first. Results and the machine are recorded in distributed_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

GLOBAL_BATCH = 8


def child(args) -> None:
    import torch

    from common import machine
    from train_bench import TASKS, examples, train_once  # the same data and train() call as train_bench

    from merit.models.loading import load_tokenizer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    exs = examples(tok, args.data, TASKS, args.steps * GLOBAL_BATCH, max_length=192)
    train_once(args.model, exs[:GLOBAL_BATCH], "bf16", lr=1e-4, bs=GLOBAL_BATCH // world)  # warm-up
    _, _, stats, times = train_once(args.model, exs, "bf16", lr=1e-4, bs=GLOBAL_BATCH // world)
    if int(os.environ.get("RANK", "0")) == 0:
        seconds = times[-1][1] - times[0][1]
        tokens = sum(len(t.input_ids) for t in exs)
        print("RESULT " + json.dumps({"processes": world, "threads_per_process": args.threads,
                                      "steps": stats["steps"], "seconds": seconds, "tokens_per_s": tokens / seconds,
                                      "train_loss": stats["train_loss"], "distributed": stats["distributed"],
                                      "machine": machine()}), flush=True)


def run(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "bigbench-mix")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model.expanduser()
    if args.child:
        child(args)
        return
    cores = os.cpu_count() or 1
    base = [str(Path(__file__)), "--child", "--model", str(args.model), "--data", str(args.data), "--steps",
            str(args.steps)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    rows = [run([sys.executable, *base, "--threads", str(cores)], dict(env, OMP_NUM_THREADS=str(cores)))]
    per = max(1, cores // 2)
    rows.append(run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *base,
                     "--threads", str(per)], dict(env, OMP_NUM_THREADS=str(per), ACCELERATE_USE_CPU="true")))
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}\n# {rows[0]['machine']}\n")
    print("| processes × threads | batch per process | steps | tokens/s | × 1 process | train loss | distributed |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} × {r['threads_per_process']} | {GLOBAL_BATCH // r['processes']} | {r['steps']} | "
              f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} | {r['train_loss']:.4f} | "
              f"{r['distributed']} |")


if __name__ == "__main__":
    main()
