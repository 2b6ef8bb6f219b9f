"""``merit plan CONFIG``: the resolved config, the mixture, K groups and steps, estimates and warnings.

    merit plan configs/smollm2-bigbench.yaml
    merit plan configs/qwen2.5-vl-7b-mixture.yaml --gpu a100-80gb
    merit plan my.yaml --set train.learning_rate=1e-3 --strict      # exit 2 on any warning
    # before the checkpoint and the data are here: the paper's 7B mixture by its numbers
    merit plan configs/qwen2.5-vl-7b-mixture.yaml --gpu a100-80gb --assume-model qwen2.5-vl-7b \
        --assume-data 176:1.6e6:600
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merit.errors import ConfigError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="what a config will run, how long, how much memory and disk, and "
                              "what is likely to go wrong (seconds; no training)")
    p.add_argument("config", type=Path)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
    add_estimate_options(p)
    from merit.plan.estimate import KNOWN_MODELS

    p.add_argument("--assume-model", metavar="NAME", help=f"plan without θ(0)'s folder, from a known architecture: "
                   f"{', '.join(KNOWN_MODELS)}")
    p.add_argument("--assume-data", metavar="T:N:L", help="plan without the data: T sources, N training examples "
                   "in all, L tokens per example (e.g. 176:1.6e6:600)")
    p.add_argument("--quiet-config", action="store_true", help="do not print the resolved config")


def add_estimate_options(p: argparse.ArgumentParser) -> None:
    from merit.plan.estimate import HARDWARE

    p.add_argument("--gpu", metavar="NAME", help=f"hardware of each branch process for the estimates: cpu, "
                   f"{', '.join(HARDWARE)} (default: this machine's)")
    p.add_argument("--strict", action="store_true", help="exit with code 2 on any plan warning, before any work")


def strict_failure(warnings: list[str]) -> ConfigError:
    return ConfigError(f"--strict: {len(warnings)} plan warning(s), first: {warnings[0]}")


def run(args: argparse.Namespace) -> int:
    from merit.config import dump_config, load_config
    from merit.plan.summary import AssumedData, make_plan, render

    cfg = load_config(args.config, args.overrides)
    data = AssumedData.parse(args.assume_data) if args.assume_data else None
    plan = make_plan(cfg, gpu=args.gpu, assume_model=args.assume_model, assume_data=data)
    if not args.quiet_config:
        print(dump_config(cfg).rstrip())
        print()
    if args.assume_model or data:
        print(f"assumed: {', '.join(x for x in (args.assume_model and f'θ(0) = {args.assume_model}', data and f'{data.sources} sources, {data.examples:,} examples, {data.tokens_per_example:g} tokens each') if x)}")
    print(render(plan))
    if args.strict and plan.warnings:
        raise strict_failure(plan.warnings)
    return 0
