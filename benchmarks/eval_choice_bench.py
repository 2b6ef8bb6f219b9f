"""Multiple-choice scoring: one row per choice plus a loss pass, against one pass per conversation.

    .venv/bin/python benchmarks/eval_choice_bench.py [--model DIR] [--n 16] [--batch-size 16] [--tasks ...]

Both ways run in one process on the same held-out examples of BIG-bench multiple-choice tasks (short
2-choice prompts and long many-choice ones). "By row" is merit's scorer before the one-pass change: one
prompt + choice row per choice, and a separate forward for the assistant loss. "One pass" runs each
conversation once (loss, and the choices on its prompt's cache). The table gives each one's examples per
second, the largest difference of a choice's summed log-probability and of the source's mean loss, and how
many picks agree. Appends the table,
with the command and machine, to benchmarks/eval_results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record  # noqa: E402

from merit.data.jsonl import read_examples
from merit.evaluate.runner import EvalSettings, _choice_logprobs_by_row, assistant_loss, choice_pass
from merit.evaluate.scoring import pick_choice
from merit.models.loading import load_model, load_tokenizer
from merit.models.presets import cache_dir

DATA = Path(__file__).resolve().parents[2] / "shared/data/bigbench-mix/eval"
TASKS = ["strategyqa", "hyperbaton", "ruin_names", "vitaminc_fact_verification", "logical_deduction",
         "intent_recognition"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=cache_dir() / "smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    args = ap.parse_args()
    tok, model = load_tokenizer(args.model), load_model(args.model).eval()
    settings = EvalSettings(max_length=256, batch_size=args.batch_size)
    lines = ["| task | examples | choices (mean) | by row + loss (ex/s) | one pass (ex/s) | speed-up | max abs Δ log p "
             "| abs Δ loss | same picks |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    seconds = [0.0, 0.0]
    for task in args.tasks:
        examples = read_examples(DATA / f"{task}.jsonl", args.n)
        start = time.perf_counter()
        rows = _choice_logprobs_by_row(model, tok, examples, settings)
        total, count = assistant_loss(model, tok, examples, settings)
        t_rows = time.perf_counter() - start
        start = time.perf_counter()
        passed = choice_pass(model, tok, examples, settings)
        rest = [ex for ex, loss in zip(examples, passed.losses) if loss is None]
        total_1, count_1 = assistant_loss(model, tok, rest, settings)
        total_1 += sum(loss[0] for loss in passed.losses if loss)
        count_1 += sum(loss[1] for loss in passed.losses if loss)
        t_shared = time.perf_counter() - start
        shared = passed.scores
        seconds[0] += t_rows
        seconds[1] += t_shared
        delta = max(abs(a - b) for (x, _), (y, _) in zip(rows, shared) for a, b in zip(x, y))
        same = sum(pick_choice(*a) == pick_choice(*b) for a, b in zip(rows, shared))
        mean_c = sum(len(ex["choices"]) for ex in examples) / len(examples)
        lines.append(f"| {task} | {len(examples)} | {mean_c:.1f} | {len(examples) / t_rows:.2f} | "
                     f"{len(examples) / t_shared:.2f} | {t_rows / t_shared:.1f}× | {delta:.1e} | "
                     f"{abs(total / count - total_1 / count_1):.1e} | {same}/{len(examples)} |")
        print(lines[-1], flush=True)
    lines.append(f"| all | | | {seconds[0]:.1f} s | {seconds[1]:.1f} s | {seconds[0] / seconds[1]:.1f}× | | | |")
    table = "\n".join(lines)
    print(table)
    append_record(Path(__file__).with_name("eval_results.md"), "multiple choice in one pass per conversation",
                  f"Model: `{args.model.name}`, batch size {args.batch_size} rows.", table)


if __name__ == "__main__":
    main()
