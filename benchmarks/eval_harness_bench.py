"""Evaluation cost of one SmolLM2 checkpoint: merit's scorer in fp32 (the CPU default, unchanged) and bf16
(``eval.dtype: bfloat16``), the lm-eval bridge on the same items (exported tasks), lm-eval's task index
with and without its default tasks, and the bootstrap intervals. One process, the same items for all.

    .venv/bin/python benchmarks/eval_harness_bench.py [--model DIR] [--n 16] [--tasks a b c d]

Prints a table and appends it, with the command and machine, to benchmarks/eval_results.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_record  # noqa: E402

from merit.data.jsonl import read_examples
from merit.evaluate.runner import EvalSettings, evaluate_model, load_eval_model
from merit.models.loading import load_tokenizer
from merit.models.presets import cache_dir

DATA = Path(__file__).resolve().parents[2] / "shared/data/bigbench-mix/eval"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=cache_dir() / "smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tasks", nargs="+", default=["hyperbaton", "snarks", "arithmetic", "object_counting"])
    args = ap.parse_args()
    from merit.config import HarnessConfig
    from merit.evaluate.export import write_tasks
    from merit.evaluate.harness import headline, lm_eval_task_manager, run_lm_eval
    from merit.evaluate.stats import macro_interval

    tok = load_tokenizer(args.model)
    sources = {t: read_examples(DATA / f"{t}.jsonl", args.n) for t in args.tasks}
    settings = EvalSettings(max_length=256, batch_size=32, max_new_tokens=16)
    rows = []

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    results = {}
    for dtype in ("float32", "bfloat16"):
        model = load_eval_model(args.model, dtype)
        results[dtype], seconds = timed(lambda: evaluate_model(model, tok, sources, settings, desc=dtype))
        rows.append((f"merit scorer, {dtype}", seconds, results[dtype]["macro"]))
    model = load_eval_model(args.model, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        tasks = write_tasks(sources, tok, Path(tmp) / "tasks", max_new_tokens=16)
        h = HarnessConfig(tasks=tasks, include_path=str(Path(tmp) / "tasks"), apply_chat_template=False, batch_size=32)
        manager, local_s = timed(lambda: lm_eval_task_manager(h))
        _, defaults_s = timed(lambda: lm_eval_task_manager(h.model_copy(update={"include_path": None, "tasks": ["arc_easy"]})))
        lm, lm_s = timed(lambda: run_lm_eval(model, tok, h, manager, "cpu"))
    heads = headline(lm)
    agree = sum(abs(heads[t][1] - results["float32"]["per_source"][s]) < 1e-9 for s, t in zip(sources, tasks))
    rows.append(("lm-eval on the exported tasks, float32", lm_s, sum(v for _, v in heads.values()) / len(heads)))
    _, boot_s = timed(lambda: macro_interval(results["float32"]["items"]))
    items = sum(len(v) for v in sources.values())
    lines = ["| what | seconds | macro |", "|---|---:|---:|"]
    lines += [f"| {name} | {s:.2f} | {m:.4f} |" for name, s, m in rows]
    lines += [f"| lm-eval TaskManager, local tasks only (include_defaults=False) | {local_s:.2f} | |",
              f"| lm-eval TaskManager with its default tasks | {defaults_s:.2f} | |",
              f"| bootstrap 95% interval (2,000 replicates, {items} items) | {boot_s:.3f} | |"]
    table = "\n".join(lines)
    note = (f"lm-eval and merit agree on {agree}/{len(tasks)} sources' scores (fp32). {items} items "
            f"({len(sources)} sources × {args.n}); bf16 vs fp32 macro: {results['bfloat16']['macro']:.4f} vs "
            f"{results['float32']['macro']:.4f}.")
    print(table)
    print(note)
    append_record(Path(__file__).with_name("eval_results.md"), "evaluation cost per checkpoint and the lm-eval bridge",
                  f"Model: `{args.model.name}`.", f"{table}\n\n{note}")


if __name__ == "__main__":
    main()
