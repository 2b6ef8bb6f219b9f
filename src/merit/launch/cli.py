"""``merit status`` and ``merit train-branch``: watch a run, and train one branch as a standalone job.

``merit train-branch`` is what makes a branch runnable on any machine that has the files:

    merit train-branch --run runs/demo --branch 2                       # inside a run folder
    merit train-branch --plan plan.json --branch 2 --theta0 ckpt/ \\
        --mixture-manifest mixture/manifest.json --config config.yaml --out branch-2/ [--data-root DATA]

The second form needs only the plan, θ(0), the mixture manifest (with the data files) and the config;
``--data-root`` remaps the manifest's absolute data paths (their common parent folder is replaced) and
every remapped file is checked against the manifest's sha256. Copy the result into the run folder as
``branches/<k>/`` and ``merit run`` uses it: its key is computed exactly as the pipeline computes it
(keep the ``manifest.json`` next to ``plan.json`` so the plan's key travels with it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from merit.argtypes import positive_int
from merit import artifacts
from merit.errors import ConfigError, DataError, MeritError

COMMANDS = ("status", "train-branch")


def add_parser(subparsers) -> None:
    """Add ``status`` and ``train-branch`` to the ``merit`` command."""
    status = subparsers.add_parser("status", help="show each stage and branch of a run folder: done / running / "
                                   "failed, with log paths")
    status.add_argument("run_dir", type=Path, metavar="DIR")

    tb = subparsers.add_parser("train-branch", help="train one branch of a plan as a standalone job (resumable)")
    tb.add_argument("--branch", required=True, metavar="K", help="group index in the plan (0-based), or 'joint' "
                    "(with --run) for the joint baseline")
    # --run-dir: the same option under a name torchrun's own parser does not find ambiguous (with --run,
    # `torchrun ... -m merit.cli train-branch --run DIR` stops at "ambiguous option: --run").
    tb.add_argument("--run", "--run-dir", dest="run", type=Path, metavar="DIR", help="a run folder: its config.yaml, "
                    "split/plan.json, θ(0) and mixture manifest")
    tb.add_argument("--variant", metavar="NAME", help="with --run: a baseline split under DIR/baselines/, e.g. random-k4")
    tb.add_argument("--plan", type=Path, help="plan.json (explicit form)")
    tb.add_argument("--theta0", type=Path, help="θ(0) checkpoint folder (explicit form; with --run: where θ(0) "
                    "lies on this machine)")
    tb.add_argument("--mixture-manifest", type=Path, help="mixture/manifest.json (explicit form)")
    tb.add_argument("--config", type=Path, help="the run's config.yaml (explicit form)")
    tb.add_argument("--out", type=Path, help="checkpoint folder to create (default with --run: DIR/branches/K)")
    tb.add_argument("--data-root", type=Path, help="folder that replaces the common parent of the mixture "
                    "manifest's data paths")
    tb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set launch.save_steps=50 (what changes the result "
                    "changes the branch key too)")
    tb.add_argument("--threads", type=positive_int, help="torch CPU threads (default: launch.cpus_per_branch, else torch's)")


def run(args: argparse.Namespace) -> int:
    if args.command == "status":
        return _status(args.run_dir)
    return _train_branch(args)


# ---------------------------------------------------------------------------------------------- status


def _status(run_dir: Path) -> int:
    from merit.launch.status import overview

    if not (run_dir / "config.yaml").exists():
        raise MeritError(f"{run_dir}: not a merit run folder (no config.yaml)")
    lines, counts = overview(run_dir)
    print("\n".join(lines))
    jobs = {k: v for k, v in counts.items() if v}
    if jobs:
        print("jobs: " + ", ".join(f"{v} {k}" for k, v in jobs.items()))
    return 0


# ---------------------------------------------------------------------------------------- train-branch


def _train_branch(args: argparse.Namespace) -> int:
    import torch

    from merit.launch.base import one_line
    from merit.train.branch import run_branch

    from merit.models.vlm import is_vlm
    from merit.train.options import check_train_options, explain_precision

    from merit.train.branch import distributed

    job, cfg = job_from_args(args)
    check_train_options(cfg.train, cfg.model, is_vlm=is_vlm(job.theta0))  # one line, before the log exists
    lead = distributed()[0] == 0  # under a hand-started torchrun, rank 0 alone talks
    if lead:
        explain_precision(cfg.train, cfg.model)
    threads = args.threads or cfg.launch.cpus_per_branch
    if threads:
        torch.set_num_threads(threads)
    if lead:
        print(f"[merit] {job.name}: training into {job.out} (log: {job.log})", file=sys.stderr, flush=True)
    try:
        manifest = run_branch(job, progress=True, launcher="train-branch")
    except (Exception, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        # The traceback is in the log; the user gets one line that says where.
        raise MeritError(f"{job.name} failed ({one_line(e)}); log: {job.log}; rerun to resume") from None
    if lead:
        print(f"{job.name}: done, {manifest['steps']} steps, {manifest['tokens_seen']} tokens -> {job.out}")
    return 0


def _variant_name(plan: dict) -> str:
    k = len(plan["groups"])
    if plan.get("method") == "pca-median" and "r" in plan:
        return f"merit-r{plan['r']}"
    return f"{plan.get('method', 'plan')}-k{k}"


def job_from_args(args: argparse.Namespace):
    """(BranchJob, RunConfig) of ``merit train-branch``: the job built exactly as the pipeline builds it."""
    from merit.config import load_config
    from merit.models.loading import check_checkpoint, checkpoint_hash
    from merit.pipeline import branch_job, branch_key, joint_key

    if args.run is not None:
        run_dir = args.run
        for name in ("plan", "mixture_manifest", "config"):
            if getattr(args, name) is not None:
                raise ConfigError(f"--{name.replace('_', '-')} is for the explicit form; with --run the run folder "
                                  "provides it")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        t0 = artifacts.read_manifest(run_dir / "theta0")
        mixture = artifacts.read_manifest(run_dir / "mixture")
        if t0 is None or mixture is None:
            raise MeritError(f"{run_dir}: θ(0) and mixture stages are not done; run `merit run ... --until split` first")
        theta0 = Path(t0.get("path", run_dir / "theta0"))
        theta0_hash = t0["hash"]
        if args.theta0 is not None:
            theta0 = args.theta0
            if checkpoint_hash(check_checkpoint(theta0)) != theta0_hash:
                raise MeritError(f"{theta0}: its weights differ from the run's θ(0) (hash {theta0_hash[:12]}…)")
        mixture = remap_mixture(mixture, args.data_root)
        if args.branch == "joint":
            out = args.out or run_dir / "joint"
            names = [e["name"] for e in mixture["sources"]]
            key = joint_key(cfg, t0["key"], mixture)
            return branch_job(cfg, out, "joint", names, mixture, theta0, theta0_hash, key), cfg
        root = run_dir / "baselines" / args.variant if args.variant else run_dir
        plan_file = root / "split" / "plan.json"
        if not plan_file.exists():
            raise MeritError(f"{plan_file}: no plan; run `merit run ... --until split` first")
        plan = _read_plan(plan_file)
        split_manifest = artifacts.read_manifest(root / "split")
        if split_manifest is None:
            raise MeritError(f"{root / 'split'}: the split stage is not done (no readable manifest); run "
                             "`merit run ... --until split` first")
        split_key = split_manifest["key"]
        k = _group_index(args.branch, plan, plan_file)
        out = args.out or root / "branches" / str(k)
    else:
        missing = [f"--{n.replace('_', '-')}" for n in ("plan", "theta0", "mixture_manifest", "config", "out")
                   if getattr(args, n) is None]
        if missing:
            raise ConfigError("train-branch: give --run DIR, or --plan, --theta0, --mixture-manifest, --config and "
                              f"--out (missing: {', '.join(missing)})")
        if args.variant:
            raise ConfigError("--variant goes with --run")
        cfg = load_config(args.config, args.overrides)
        plan = _read_plan(args.plan)
        split_manifest = artifacts.read_manifest(args.plan.parent)
        # The key of a plan that travelled without its manifest is that of its content: such a branch
        # is still checked against the plan, but the pipeline will not recognise it as its own.
        split_key = split_manifest["key"] if split_manifest else artifacts.fingerprint("plan", plan)
        theta0 = args.theta0
        theta0_hash = checkpoint_hash(check_checkpoint(theta0))
        mixture = _read(args.mixture_manifest)
        if not isinstance(mixture, dict) or not isinstance(mixture.get("sources"), list):
            raise DataError(f"{args.mixture_manifest}: not a mixture manifest (no 'sources' list); give "
                            "RUN/mixture/manifest.json")
        mixture = remap_mixture(mixture, args.data_root)
        k = _group_index(args.branch, plan, args.plan)
        out = args.out
    artifacts.check_output_dir(out)
    group = plan["groups"][k]
    known = {e["name"] for e in mixture["sources"]}
    if not set(group) <= known:
        raise DataError(f"plan group {k} names sources {sorted(set(group) - known)} that the mixture manifest lacks")
    name = f"{_variant_name(plan)} branch {k + 1}/{len(plan['groups'])}"
    return branch_job(cfg, out, name, group, mixture, theta0, theta0_hash, branch_key(cfg, split_key, k, theta0_hash)), cfg


def _read(path: Path) -> dict:
    if not path.is_file():
        raise MeritError(f"{path}: file not found")
    try:
        return artifacts.read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise MeritError(f"{path}: not valid JSON ({e})") from None


def _read_plan(path: Path) -> dict:
    """A plan file, checked to be one: an object whose ``groups`` is a non-empty list of lists of names."""
    plan = _read(path)
    groups = plan.get("groups") if isinstance(plan, dict) else None
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, list) and g and all(isinstance(n, str) for n in g) for g in groups):
        raise DataError(f"{path}: not a merit plan (expected an object whose 'groups' is a list of lists of source "
                        "names); give RUN/split/plan.json")
    return plan


def _group_index(text: str, plan: dict, where: Path) -> int:
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--branch {text!r}: expected a group index 0..{len(plan['groups']) - 1}") from None
    if not 0 <= k < len(plan["groups"]):
        raise ConfigError(f"--branch {k}: {where} has groups 0..{len(plan['groups']) - 1}")
    return k


def remap_mixture(mixture: dict, data_root: Path | None) -> dict:
    """The mixture manifest with its data paths under ``data_root`` (common parent replaced), each file
    checked against its recorded sha256; without ``data_root``, a check that the files exist."""
    from merit.data import formats

    entries = mixture["sources"]
    paths = [p for e in entries for p in (e["train"], e.get("eval")) if p]
    if data_root is None:
        lost = [p for e in entries for p in [e["train"]] if not Path(p).exists()]
        if lost:
            raise DataError(f"{lost[0]}: not found; pass --data-root to say where the mixture's data lies here")
        return mixture
    common = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    out = []
    for e in entries:
        moved = dict(e)
        for field, sha in (("train", "train_sha256"), ("eval", "eval_sha256")):
            if not e.get(field):
                continue
            new = Path(data_root) / Path(e[field]).relative_to(common)
            if not new.exists():
                raise DataError(f"{new}: not found (--data-root {data_root} replaces {common} in {e[field]})")
            if e.get(sha) and formats.content_sha256(new) != e[sha]:
                raise DataError(f"{new}: content differs from the mixture manifest's {field} file (sha256)")
            moved[field] = str(new)
        out.append(moved)
    return {**mixture, "sources": out}
