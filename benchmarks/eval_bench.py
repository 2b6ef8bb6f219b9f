"""Evaluation throughput: batched vs one example at a time, in one process on the same examples.

    .venv/bin/python benchmarks/eval_bench.py [--model DIR] [--n 16] [--batch-size 16]

Generation (greedy, left-padded batches) and multiple-choice scoring (one forward per choice, batched
across examples and choices) on BIG-bench development tasks; checks both modes give the same answers.
Prints a table and appends it, with the command and machine, to benchmarks/eval_results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from merit.data.jsonl import read_examples
from merit.evaluate.runner import EvalSettings, choice_logprobs, generate
from merit.evaluate.scoring import pick_choice
from merit.models.loading import load_model, load_tokenizer
from merit.models.presets import cache_dir

DATA = Path(__file__).resolve().parents[2] / "shared/data/bigbench-mix/eval"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=cache_dir() / "smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gen-task", default="arithmetic")
    ap.add_argument("--mc-task", default="hyperbaton")
    args = ap.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    gen = read_examples(DATA / f"{args.gen_task}.jsonl", args.n)
    mc = read_examples(DATA / f"{args.mc_task}.jsonl", args.n)
    rows = []

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    batched = EvalSettings(max_length=256, batch_size=args.batch_size, max_new_tokens=16)
    single = EvalSettings(max_length=256, batch_size=1, max_new_tokens=16)
    g_b, t_gb = timed(lambda: generate(model, tok, gen, batched))
    g_1, t_g1 = timed(lambda: generate(model, tok, gen, single))
    m_b, t_mb = timed(lambda: choice_logprobs(model, tok, mc, batched))
    m_1, t_m1 = timed(lambda: choice_logprobs(model, tok, mc, single))
    same_gen = sum(a.strip() == b.strip() for a, b in zip(g_b, g_1))
    same_mc = sum(pick_choice(*a) == pick_choice(*b) for a, b in zip(m_b, m_1))
    rows.append(("generation", args.gen_task, t_g1, t_gb, f"{same_gen}/{len(gen)}"))
    rows.append(("multiple choice", args.mc_task, t_m1, t_mb, f"{same_mc}/{len(mc)}"))

    header = "| task type | task | examples | one at a time (ex/s) | batched (ex/s) | speed-up | same answers |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for kind, task, t1, tb, same in rows:
        lines.append(f"| {kind} | {task} | {args.n} | {args.n / t1:.2f} | {args.n / tb:.2f} | {t1 / tb:.1f}× | {same} |")
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    record = (f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n\nCommand: `{' '.join([Path(sys.executable).name] + sys.argv)}`  \n"
              f"Model: `{args.model.name}`, batch size {args.batch_size}. Machine: {machine}.\n\n{table}\n")
    with open(Path(__file__).with_name("eval_results.md"), "a") as f:
        f.write(record)


if __name__ == "__main__":
    main()
