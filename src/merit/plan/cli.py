"""``merit plan CONFIG``: the resolved config, the mixture, K groups and steps, estimates and warnings.

    merit plan configs/smollm2-bigbench.yaml
    merit plan configs/qwen2.5-vl-7b-mixture.yaml --gpu a100-80gb
    merit plan my.yaml --set train.learning_rate=1e-3 --strict      # exit 2 on any warning
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
    from merit.plan.summary import make_plan, render

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, gpu=args.gpu)
    if not args.quiet_config:
        print(dump_config(cfg).rstrip())
        print()
    print(render(plan))
    if args.strict and plan.warnings:
        raise strict_failure(plan.warnings)
    return 0
