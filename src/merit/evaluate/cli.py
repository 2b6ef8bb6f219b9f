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
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--out", type=Path, help="write the scores as JSON here")


def run(args: argparse.Namespace) -> int:
    from merit import artifacts
    from merit.evaluate.runner import EvalSettings, evaluate_model, load_eval_model
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
    tokenizer = load_tokenizer(tok_dir)
    model = load_eval_model(args.checkpoint, args.dtype)
    settings = EvalSettings(args.max_length, args.batch_size, args.max_new_tokens, args.normalize,
                            args.length_normalized)
    result = evaluate_model(model, tokenizer, sources, settings, desc=f"eval {args.checkpoint.name}")
    width = max(len(n) for n in names)
    for n in names:
        print(f"{n:<{width}}  {result['metrics'][n]:<11}  {result['per_source'][n]:.4f}  loss {result['per_source_loss'][n]:.4f}")
    print(f"{'macro':<{width}}  {'':<11}  {result['macro']:.4f}  loss {result['loss']:.4f}")
    if args.out:
        artifacts.write_json(args.out, {"checkpoint": str(args.checkpoint), "result": result})
    return 0
