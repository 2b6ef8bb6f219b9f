"""Command-line interface: ``merit demo [--vlm] | run | ls | convert | ...``.

User mistakes (bad config, bad data, bad checkpoint) print one line and exit with code 2; anything
else is a bug in merit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from merit.argtypes import Parser
from merit.data import convert
from merit.diagnose import alignment as alignment_cli
from merit.diagnose import cli as diagnose_cli
from merit.diagnose import probe as probe_cli
from merit.errors import as_user_error
from merit.evaluate import cli as eval_cli
from merit.launch import cli as launch_cli
from merit.merge import cli as merge_cli
from merit.plan import cli as plan_cli
from merit.split import cli as split_cli

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
DEMO_VLM_CONFIG = Path(__file__).parent / "configs" / "demo-vlm.yaml"


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="merit", description="Decentralized instruction tuning (MERIT): "
                                "conflict-aware splitting and weight merging.")
    sub = p.add_subparsers(dest="command", required=True)

    def run_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", type=Path, help="run folder (default: runs/<name>)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by dotted key, e.g. --set split.r=1 (repeatable)")
        q.add_argument("--until", metavar="STAGE", help="stop after this stage (theta0, mixture, grads, split, "
                       "branches, merge, joint, eval, report)")
        q.add_argument("--allow-partial", action="store_true", help="if branches fail, merge the others "
                       "(weights renormalised, marked partial); the command still exits with code 2")

    demo = sub.add_parser("demo", help="run the whole pipeline on the embedded default (tiny model, built-in tasks)")
    run_options(demo)
    demo.add_argument("--vlm", action="store_true", help="the vision-language demo: a tiny Qwen2.5-VL on built-in "
                      "image tasks, language model trained, vision tower frozen")
    run = sub.add_parser("run", help="run the pipeline on a YAML config")
    run.add_argument("config", type=Path)
    run_options(run)
    plan_cli.add_estimate_options(run)
    plan_cli.add_parser(sub)
    sub.add_parser("ls", help="list presets, split methods, merge operators, launchers and source formats")
    eval_cli.add_parser(sub)
    convert.add_parser(sub)
    merge_cli.add_parser(sub)
    split_cli.add_parser(sub)
    launch_cli.add_parser(sub)
    diagnose_cli.add_parser(sub)
    probe_cli.add_parser(sub)
    alignment_cli.add_parser(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's pre-emption), raised like Ctrl-C so that every ``finally`` runs:
    temporary folders are removed and a branch records that it was interrupted."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """The error boundary: a user's mistake is one ``merit: error:`` line and exit code 2; a bug of ours
    keeps its traceback, exit code 1."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # merit never needs the hub; fail fast instead of hanging
    if not sys.stderr.isatty():
        # Logs and CI: no "Loading weights" / "Writing model shards" bars (read by huggingface_hub, hence
        # transformers, at import: set before either is imported).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return _dispatch(args)
    except KeyboardInterrupt as e:
        if _main_thread():
            # The process is ending: a second Ctrl-C / SIGTERM must not interrupt the clean-up or the exit
            # (seen once in tests/test_bad_input.py: exit status -SIGINT after the "interrupted" line was printed).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            previous = None
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"merit: {what}; rerun the same command to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        user = as_user_error(e)
        if user is None:
            traceback.print_exc()
            print("merit: internal error: the traceback above is a bug in merit, not a problem with your input; "
                  "please report it", file=sys.stderr)
            return 1
        print(f"merit: error: {one_line(str(user))}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    """A message as one line: a multi-line one (e.g. from a library) is joined with ' / '."""
    return " / ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _list_plugins() -> int:
    """merit ls: every registered plugin with its one-line description, by kind."""
    from merit import plugins
    from merit.data.formats import FORMATS

    for kind in plugins.kinds():
        entries = plugins.names(kind)
        width = max(map(len, entries))
        print(f"{plugins.KIND_TITLES.get(kind, kind)}:")
        for name in entries:
            print(f"  {name:<{width}}  {plugins.describe(kind, name)}".rstrip())
    print(f"source formats: {', '.join(FORMATS)}")
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "eval":
        return eval_cli.run(args)
    if args.command == "export-tasks":
        return eval_cli.run_export(args)
    if args.command in ("convert", "convert-llava"):
        return convert.run(args)
    if args.command == "merge":
        return merge_cli.run(args)
    if args.command == "split":
        return split_cli.run(args)
    if args.command == "diagnose":
        return diagnose_cli.run(args)
    if args.command == "probe":
        return probe_cli.run(args)
    if args.command == "hessian-alignment":
        return alignment_cli.run(args)
    if args.command == "plan":
        return plan_cli.run(args)
    if args.command in launch_cli.COMMANDS:
        return launch_cli.run(args)
    if args.command == "ls":
        return _list_plugins()

    from merit.config import load_config
    from merit.pipeline import run
    from merit.report.table import format_table

    overrides = args.overrides + (["merge.allow_partial=true"] if args.allow_partial else [])
    demo_config = DEMO_VLM_CONFIG if getattr(args, "vlm", False) else DEMO_CONFIG
    cfg = load_config(demo_config if args.command == "demo" else args.config, overrides)
    out = args.out or Path("runs") / cfg.name
    results = run(cfg, out, until=args.until, gpu=getattr(args, "gpu", None), strict=getattr(args, "strict", False))
    if results is None:
        print(f"stopped after stage {args.until!r}; run folder: {out}")
        return 0
    print(format_table(results))
    print(f"\nrun folder: {out}  (results.json, report.md, report.html)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
