"""``merit eval CHECKPOINT --mixture DIR``: score any checkpoint (or LoRA adapter) on held-out splits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from merit.argtypes import int_at_least, positive_int
from merit.errors import MeritError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on the eval splits of a mixture folder")
    p.add_argument("checkpoint", type=Path, help="HF checkpoint folder or LoRA adapter folder")
    p.add_argument("--mixture", type=Path, required=True, help="folder with eval/<source>.jsonl")
    p.add_argument("--include", nargs="+", metavar="SOURCE", help="only these sources")
    p.add_argument("--max-per-source", type=positive_int, default=None)
    p.add_argument("--max-length", type=int_at_least(8), default=256)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--normalize", choices=["whitespace", "lower"], default="whitespace")
    p.add_argument("--length-normalized", action="store_true", help="rank MC choices by mean log-prob per token")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: float32 on CPU, bfloat16 (float16 without bf16 support) on a GPU")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--lm-eval-tasks", nargs="+", metavar="TASK",
                   help="also run these lm-evaluation-harness tasks on the checkpoint (pip install 'merit-tune[lm-eval]')")
    p.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="a folder of local lm-eval task YAMLs "
                   "(e.g. from merit export-tasks)")
    p.add_argument("--lm-eval-limit", type=positive_int, metavar="N", help="lm-eval items per task")
    p.add_argument("--lm-eval-fewshot", type=int_at_least(0), metavar="N")
    p.add_argument("--lm-eval-chat-template", action=argparse.BooleanOptionalAction, default=True,
                   help="lm-eval prompts through the chat template (off for merit export-tasks tasks: their "
                        "prompts are already rendered)")
    p.add_argument("--out", type=Path, help="write the scores as JSON here")

    x = sub.add_parser("export-tasks", help="write a run's held-out files as lm-evaluation-harness task YAMLs")
    x.add_argument("run_dir", type=Path, metavar="RUN", help="a run folder (after its mixture stage)")
    x.add_argument("--out", type=Path, required=True, help="the folder to write (replaced when complete)")
    x.add_argument("--include", nargs="+", metavar="SOURCE", help="only these sources")


def run_export(args: argparse.Namespace) -> int:
    from merit import artifacts
    from merit.evaluate.export import export_tasks

    artifacts.check_output_dir(args.out)
    tasks = export_tasks(args.run_dir, args.out, args.include)
    print(f"wrote {len(tasks)} lm-eval tasks (group merit) to {args.out}; run them with\n"
          f"  lm_eval --model hf --model_args pretrained=CHECKPOINT --include_path {args.out} --tasks merit\n"
          f"or merit eval CHECKPOINT --mixture ... --lm-eval-tasks merit --lm-eval-include {args.out} "
          "--no-lm-eval-chat-template")
    return 0


def run(args: argparse.Namespace) -> int:
    from merit import artifacts
    from merit.evaluate.runner import EvalSettings, evaluate_model, load_eval_model, resolve_device, resolve_dtype
    from merit.evaluate.stats import macro_interval
    from merit.merge.lora import is_adapter
    from merit.models.loading import load_tokenizer

    if args.out is not None:
        artifacts.check_output_file(args.out, "--out")
    folder = args.mixture / "eval"
    if not folder.is_dir():
        raise MeritError(f"{args.mixture}: --mixture needs an eval/ folder of <source>.jsonl files")
    from merit.data import formats

    names = formats.source_names(folder)  # eval/<source>.jsonl (.json, .parquet, dataset folders)
    if args.include:
        missing = [n for n in args.include if n not in names]
        if missing:
            raise MeritError(f"--include: {missing} not in {folder}")
        names = args.include
    if not names:
        raise MeritError(f"{folder}: no .jsonl files")
    sources = {n: formats.read_examples(formats.open_reader(formats.ReadSpec(formats.source_path(folder, n))),
                                        args.max_per_source) for n in names}
    tok_dir = args.checkpoint
    if is_adapter(args.checkpoint):
        config = args.checkpoint / "adapter_config.json"
        try:
            tok_dir = json.loads(config.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError, TypeError):
            raise MeritError(f"{config}: not a PEFT adapter config (no base_model_name_or_path); re-save the "
                             "adapter") from None
    else:
        from merit.models.loading import check_checkpoint
        from merit.preflight import check_weights

        check_weights(check_checkpoint(args.checkpoint))
    harness_cfg = manager = None
    if args.lm_eval_tasks:  # every task checked before the model is loaded
        from merit.config import HarnessConfig
        from merit.evaluate.harness import lm_eval_task_manager

        if args.lm_eval_include is not None and not args.lm_eval_include.is_dir():
            raise MeritError(f"--lm-eval-include: {args.lm_eval_include} is not a folder of task YAMLs")
        harness_cfg = HarnessConfig(tasks=args.lm_eval_tasks, include_path=str(args.lm_eval_include)
                                    if args.lm_eval_include else None, limit=args.lm_eval_limit,
                                    num_fewshot=args.lm_eval_fewshot, apply_chat_template=args.lm_eval_chat_template,
                                    batch_size=args.batch_size)
        manager = lm_eval_task_manager(harness_cfg, key="--lm-eval-tasks")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(tok_dir)
    model = load_eval_model(args.checkpoint, resolve_dtype(args.dtype, "float32", device), device)
    settings = EvalSettings(args.max_length, args.batch_size, args.max_new_tokens, args.normalize,
                            args.length_normalized)
    result = evaluate_model(model, tokenizer, sources, settings, desc=f"eval {args.checkpoint.name}")
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {result['metrics'][n]:<11}  {result['per_source'][n]:.4f}  loss {result['per_source_loss'][n]:.4f}")
    ci = macro_interval(result["items"])
    print(f"{'macro':<{width}}  {'':<11}  {result['macro']:.4f}  loss {result['loss']:.4f}  "
          f"(95% CI {ci.low:.4f}-{ci.high:.4f}, {sum(map(len, result['items'].values()))} items)")
    result["ci"] = [ci.low, ci.high]
    if harness_cfg is not None:
        from merit.evaluate.harness import headline, run_lm_eval

        result["lm_eval"] = run_lm_eval(model, tokenizer, harness_cfg, manager, str(device))
        for task, (metric, value) in headline(result["lm_eval"]).items():
            print(f"lm-eval {task}  {metric}  {value:.4f}")
    if args.out:
        artifacts.write_json(args.out, {"checkpoint": str(args.checkpoint), "result": result})
    return 0
