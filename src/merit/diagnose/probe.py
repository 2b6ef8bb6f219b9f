"""``merit probe CONFIG``: is θ(0) merge-ready for this mixture, before the full budget is spent?

Trains two short branches from θ(0) on two random, sample-balanced halves of the mixture (a fraction of
an epoch, ``--fraction``), the joint run at the same fraction, merges the halves by their token weights,
and reads the diagnostics of :mod:`merit.diagnose.cli` on that small run folder: the LMC barrier
between the halves and to the merge, the joint/merged displacement ratio, and the measured against the
Hessian-predicted merge gain. It is the pipeline itself with these settings and its diagnose stage
(``--set`` applies to it as to ``merit run``), in its own folder (default ``runs/<name>-probe``), so it
resumes like a run and refuses, before any training, a run the diagnosis cannot read.

Verdict: **merge-ready** when the largest barrier is within ``BARRIER_TOLERANCE`` of the paths' end
losses (the paper's Table 5 barriers are all 0.0) and merging does not lose against its branches
(measured gain ≥ 0: L(θ̄) ≤ Σ w_k L(θ_k), Thm 3.1's sign in a convex basin). Otherwise not, with the
number that failed. A merge-ready probe is necessary, not sufficient: the full branches travel further.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from merit.argtypes import positive_int
from merit.diagnose.cli import BARRIER_TOLERANCE, largest_barrier, summary

PROBE_FRACTION = 0.25


def add_parser(sub) -> None:
    p = sub.add_parser("probe", help="before the full budget: train two short random halves from θ(0), merge "
                       "them and say whether θ(0) is merge-ready")
    p.add_argument("config", type=Path)
    p.add_argument("--out", type=Path, help="probe folder (default: runs/<name>-probe)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
    p.add_argument("--fraction", type=float, default=PROBE_FRACTION,
                   help=f"epochs of each probe branch and of the probe's joint run (default {PROBE_FRACTION})")
    p.add_argument("--alphas", type=int, default=11, help="points per interpolation path (default 11; ≥ 3)")
    p.add_argument("--draws", type=positive_int, default=2, help="perturbation draws per σ (default 2)")


def probe_overrides(fraction: float, alphas: int, draws: int) -> list[str]:
    """What turns a run config into its probe: two random halves, the joint run, one merge, no extras,
    and the diagnose stage (so a run it cannot diagnose — a VLM, LoRA branches — is refused before any
    training, by the stage's own checks)."""
    return ["split.method=random", "split.r=1", f"train.epochs={fraction}", "baselines.joint=true",
            "baselines.random=false", "baselines.joint_epochs=null", "baselines.soups=null",
            "baselines.random_k=null", "merge.operators=[token-weighted]", "eval.transfer=null",
            "eval.lm_eval=null", "eval.lmms_eval=null", "diagnose.enabled=true", f"diagnose.alphas={alphas}",
            f"diagnose.draws={draws}", "diagnose.max_per_source=null"]


def verdict(report: dict) -> tuple[bool, list[str]]:
    """(merge-ready, the reasons: each number against its threshold)."""
    worst, relative = largest_barrier(report)
    relative = relative or 0.0
    gain = report["merge_gain"][report["main"]]["measured"]
    ok_barrier, ok_gain = relative <= BARRIER_TOLERANCE, gain >= 0
    reasons = [f"largest LMC barrier {worst['barrier']:.4g} ({relative:.2%} of the path's end losses, "
               f"{worst['from']} → {worst['to']}) {'≤' if ok_barrier else '>'} {BARRIER_TOLERANCE:.0%}: "
               + ("one basin" if ok_barrier else "the halves are in different basins"),
               f"measured merge gain Σ w_k L(θ_k) − L(θ̄) = {gain:.4g} {'≥' if ok_gain else '<'} 0: "
               + ("the merge is no worse than its branches" if ok_gain else "the merge loses against its branches")]
    g = report["merge_gain"][report["main"]]
    if g["ratio"] is not None:
        reasons.append(f"measured / Hessian-predicted gain {g['ratio']:.3f} (1: the quadratic model of Thm 3.1 "
                       "explains the gain)")
    ratio = report["displacement"]["joint_over_merged"]
    if ratio is not None:
        reasons.append(f"joint moved {ratio:.2f}× as far from θ(0) as the merge (paper: 2.4-2.9× at 1 epoch)")
    return ok_barrier and ok_gain, reasons


def run(args: argparse.Namespace) -> int:
    from merit import artifacts
    from merit.config import load_config
    from merit.diagnose.cli import parse_settings
    from merit.errors import MeritError
    from merit.pipeline import run as run_pipeline

    if not 0 < args.fraction <= 1:
        raise MeritError(f"--fraction {args.fraction}: give the probe's epochs in (0, 1], e.g. 0.25")
    ns = argparse.Namespace(alphas=args.alphas, max_per_source=None, calibration_size=None,
                            sigmas="0.01,0.05,0.1", draws=args.draws, seed=None, antithetic=True, device=None)
    parse_settings(ns)  # a bad flag is refused, in its own words, before any work
    cfg = load_config(args.config, args.overrides + probe_overrides(args.fraction, args.alphas, args.draws))
    out = args.out or Path("runs") / f"{cfg.name}-probe"
    run_pipeline(cfg, out)  # ends with its diagnose stage: out/diagnose/diagnose.json
    report = artifacts.read_json(out / "diagnose" / "diagnose.json")
    ready, reasons = verdict(report)
    probe = {"fraction": args.fraction, "merge_ready": ready, "reasons": reasons,
             "thresholds": {"barrier_relative": BARRIER_TOLERANCE, "measured_gain": 0.0}}
    artifacts.write_json(out / "probe.json", probe)
    print(summary(report))
    print(f"\nverdict: θ(0) is {'merge-ready' if ready else 'NOT merge-ready'} for this mixture "
          f"(probe: two random halves, {args.fraction:g} epoch each)")
    for r in reasons:
        print(f"  - {r}")
    print(f"probe folder: {out}  (probe.json, diagnose/)")
    return 0
