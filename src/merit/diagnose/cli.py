"""``merit diagnose RUN``: merge-readiness and merge-gain instruments on a finished run folder.

    merit diagnose RUN [--alphas 21] [--max-per-source N] [--calibration-size N]
                       [--sigmas 0.01,0.05,0.1] [--draws 3] [--seed S] [--curvature hvp|second-difference]

Reads θ(0), the main split's branches and token-weighted merge (and joint, and the random-split baseline
when present) and writes ``RUN/diagnose/`` (``diagnose.json``, ``lmc.png``, ``perturbation.png``) in one
rename at the end, so a failed or refused diagnosis leaves nothing behind. The numbers are explained in
docs/diagnostics.md; the math is in :mod:`merit.diagnose.landscape`.

Memory: one model is loaded (from the merge) and its weights are overwritten in place for every point
(an interpolation, a branch, a perturbed model); the checkpoints it reads from are opened lazily
(safetensors, memory-mapped) and read one tensor at a time. So the cost is one model plus a couple of
tensors, whatever K is — never K models. The alternative (building each interpolated checkpoint on disk
with the streaming merge engine, then loading it) would write 21 checkpoints per path for nothing.

Every loss is results.json's: the mean over sources of each source's token-mean assistant loss on the
same held-out examples the eval stage reads (:func:`merit.pipeline.eval_examples`), with the run's eval
settings and model dtype, so L(θ̄) here is the merge's ``loss`` in results.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from merit.argtypes import int_at_least, nonnegative_int, positive_int
from merit.diagnose.evaluator import Evaluator
from merit.diagnose.inputs import LazyCheckpoint, Memo, Merge, RunFolder, inspect_run, log
from merit.errors import MeritError

DEFAULT_SIGMAS = (0.01, 0.05, 0.1)

# What the checks in diagnose.json hold each number against (docs/diagnostics.md says why each is where it is).
BARRIER_TOLERANCE = 0.01  # largest barrier, relative to the mean loss of the path's ends: the paper's are 0.0
PARALLEL_AXIS_TOLERANCE = 1e-9  # relative residual of an exact identity: only rounding (float64 sums) may remain
RESULTS_TOLERANCE = 1e-5  # |L(θ̄) − results.json's loss|: the same loss on the same examples
GAIN_RATIO_RANGE = (0.5, 2.0)  # measured / predicted gain: the quadratic model explains the gain within 2×


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "diagnose", help="loss barriers, displacements, flatness and merge gain of a finished run",
        description="Merge-readiness diagnostics of a run folder (LMC barriers, displacement, train/held-out "
                    "gap, Gaussian perturbation, measured vs Hessian-predicted merge gain); writes RUN/diagnose/.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder with branches and a token-weighted merge")
    p.add_argument("--alphas", type=int, default=21, metavar="N",
                   help="points on each interpolation path, ends included (default 21: steps of 0.05; at least 3)")
    p.add_argument("--max-per-source", type=positive_int, metavar="N",
                   help="at most N held-out (and training) examples per source (default: the run's eval setting; "
                        "fewer makes it cheaper but L(θ̄) then differs from results.json)")
    p.add_argument("--calibration-size", type=positive_int, metavar="N",
                   help="held-out examples per source for the Hessian-vector products (default: the same "
                        "examples as the loss)")
    p.add_argument("--sigmas", default=",".join(map(str, DEFAULT_SIGMAS)), metavar="S1,S2,...",
                   help="Gaussian perturbation scales, relative to each tensor's RMS (default 0.01,0.05,0.1)")
    p.add_argument("--draws", type=positive_int, default=3, help="seeded noise draws per σ (default 3)")
    p.add_argument("--no-antithetic", dest="antithetic", action="store_false", default=True,
                   help="one evaluation per draw at +noise only (half the cost). By default each draw is "
                        "evaluated at +noise and −noise and averaged: the same expected ΔL, without the "
                        "first-order (gradient) term's variance, which dominates away from a minimum")
    p.add_argument("--curvature", choices=CURVATURES, default="hvp",
                   help="how the predicted gain's (θ_k − θ̄)ᵀH(θ_k − θ̄) is computed: hvp (default: double-backward "
                        "Hessian-vector products) or second-difference (losses at θ̄ ± ε(θ_k − θ̄); float32 models only)")
    p.add_argument("--curvature-epsilon", type=float, default=0.1, metavar="EPS",
                   help="ε of --curvature second-difference, as a fraction of θ_k − θ̄ (default 0.1)")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the noise draws (default: the run's seed)")
    p.add_argument("--device", help="where the model runs (default: where the eval stage ran it, the CPU; "
                   "another device can differ from results.json in the last digits)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's)")
    return p


@dataclass(frozen=True)
class Settings:
    alphas: list[float]
    max_per_source: int | None
    calibration_size: int | None
    sigmas: list[float]
    draws: int
    seed: int | None
    antithetic: bool = True
    device: str | None = None
    # How vᵀHv along each θ_k − θ̄ is computed: "hvp" (double backward, the and the paper's
    # Hessian-vector products) or "second-difference" (two losses at θ̄ ± ε(θ_k − θ̄): ~6× cheaper on
    # SmolLM2 and no double-backward graph, which at 7B is what decides whether the check fits at all).
    curvature: str = "hvp"
    curvature_epsilon: float = 0.1


CURVATURES = ("hvp", "second-difference")
# Settings added after diagnoses were stored: in a stage key only when not at their default, so a
# finished diagnosis keeps its key.
ADDED_SETTINGS = ("curvature", "curvature_epsilon")


def settings_key(settings: Settings) -> dict:
    """The settings as the diagnose stage's key reads them (added ones only when changed)."""
    from dataclasses import asdict, fields

    default = {f.name: f.default for f in fields(Settings)}
    return {k: v for k, v in asdict(settings).items() if k not in ADDED_SETTINGS or v != default[k]}


def parse_settings(args: argparse.Namespace) -> Settings:
    from merit.diagnose.landscape import alpha_grid

    try:
        alphas = alpha_grid(args.alphas)
    except ValueError:
        raise MeritError(f"--alphas {args.alphas}: an interpolation path needs at least 3 points "
                         "(its two ends and one between); the paper uses 21") from None
    try:
        sigmas = [float(s) for s in str(args.sigmas).split(",") if s.strip()]
    except ValueError:
        raise MeritError(f"--sigmas: cannot read {args.sigmas!r}; write e.g. 0.01,0.05,0.1") from None
    if not sigmas or not all(0 < s < 10 for s in sigmas):
        raise MeritError(f"--sigmas {args.sigmas}: give one or more positive scales (relative to RMS), e.g. 0.01,0.05,0.1")
    curvature = getattr(args, "curvature", "hvp")
    epsilon = float(getattr(args, "curvature_epsilon", 0.1))
    if not 0 < epsilon <= 1:
        raise MeritError(f"--curvature-epsilon {epsilon}: give a fraction of θ_k − θ̄ in (0, 1], e.g. 0.1")
    return Settings(alphas, args.max_per_source, args.calibration_size, sorted(sigmas), args.draws, args.seed,
                    bool(getattr(args, "antithetic", True)), getattr(args, "device", None), curvature, epsilon)


def run(args: argparse.Namespace) -> int:
    import torch

    settings = parse_settings(args)  # before reading anything: a bad flag is refused at once
    folder = inspect_run(Path(args.run))
    if settings.curvature == "second-difference" and folder.cfg.model.dtype != "float32":
        raise MeritError(f"--curvature second-difference: {folder.root} evaluates in model.dtype="
                         f"{folder.cfg.model.dtype}, whose loss rounding swamps a second difference; use --curvature hvp")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report, curves, perturbation = diagnose(folder, settings)
    finally:
        torch.set_num_threads(threads)
    out = write_outputs(folder.root / "diagnose", report, curves, perturbation)
    print(summary(report))
    print(f"\nwritten: {out / 'diagnose.json'}, {out / 'lmc.png'}, {out / 'perturbation.png'}")
    return 0


# ------------------------------------------------------------------------------------------- diagnose


def diagnose(folder: RunFolder, settings: Settings, memo: Memo | None = None) -> tuple[dict, list[dict], dict]:
    """Compute every number; returns (diagnose.json content, LMC curves, perturbation table).

    Every loss and curvature goes through ``memo`` under a label naming what it is, so a diagnosis that
    was stopped resumes from the ones already computed (the pipeline stage passes a persistent one)."""
    import torch

    from merit.diagnose import landscape as L

    started = time.time()
    memo = memo or Memo()
    if memo.resumed:
        log(f"resuming: {memo.resumed} losses and curvatures from the stopped try")
    ev = Evaluator(folder, settings.max_per_source, settings.calibration_size, settings.device)

    def at(label: str, place, examples=None) -> float:
        return _loss_at(ev, memo, label, place, examples)

    main = folder.main
    theta0 = LazyCheckpoint(folder.theta0)
    merged = LazyCheckpoint(main.merged)
    branches = [LazyCheckpoint(b) for b in main.branches]
    joint = LazyCheckpoint(folder.joint) if folder.joint else None
    labels = [f"branch {k}" for k in main.indices]

    # Losses of the checkpoints themselves (held-out, and the fixed training sample for the gap).
    merged_loss = at("heldout/merged", lambda: ev.load(merged))
    log(f"L(θ̄) = {merged_loss:.6f} on {sum(map(len, ev.heldout.values()))} held-out examples")
    branch_losses = [at(f"heldout/{label}", lambda: ev.load(b)) for label, b in zip(labels, branches)]

    # Linear mode connectivity: every pair of branches, and each branch to the merge.
    paths = [(i, j) for i in range(len(branches)) for j in range(i + 1, len(branches))]
    ends = [(labels[i], branches[i], labels[j], branches[j], "branch-branch") for i, j in paths]
    ends += [(labels[i], branches[i], "merged", merged, "branch-merged") for i in range(len(branches))]
    curves = []
    log(f"LMC: {len(ends)} paths × {len(settings.alphas)} points")
    for a_label, a, b_label, b, kind in ends:
        losses = []
        for alpha in settings.alphas:
            losses.append(at(f"lmc/{a_label}/{b_label}/{alpha!r}",
                             lambda: ev.set_weights(lambda n: L.interpolate(a[n], b[n], alpha))))
        bar = L.barrier(settings.alphas, losses)
        curves.append({"from": a_label, "to": b_label, "kind": kind, "losses": losses, "barrier": bar.height,
                       "barrier_alpha": bar.alpha, "min_loss": bar.min_loss, "min_alpha": bar.min_alpha})
        log(f"LMC {a_label} → {b_label}: barrier {bar.height:.4g}, min {bar.min_loss:.4f} at α = {bar.min_alpha:.2f}")

    # Displacements from θ(0) and the parallel-axis identity, one tensor name at a time.
    pa = L.ParallelAxis()
    gram = L.TaskVectorGram(len(branches) + 1 + (joint is not None))  # [τ_1 … τ_K, τ̄ (, τ_joint)]
    sq = {"branches": [0.0] * len(branches), "merged": 0.0, "joint": 0.0, "merge_vs_weighted_sum": 0.0}
    for name in ev.floating:
        base = theta0[name].to(torch.float64)
        deltas = [b[name].to(torch.float64) - base for b in branches]
        mean = pa.add(deltas, main.weights)
        for k, d in enumerate(deltas):
            sq["branches"][k] += float(d.pow(2).sum())
        m = merged[name].to(torch.float64) - base
        sq["merged"] += float(m.pow(2).sum())
        sq["merge_vs_weighted_sum"] += float((m - mean).pow(2).sum())
        taus = deltas + [m]
        if joint is not None:
            taus.append(joint[name].to(torch.float64) - base)
            sq["joint"] += float(taus[-1].pow(2).sum())
        gram.add(taus)
    displacement = {
        "branches": dict(zip(labels, [v ** 0.5 for v in sq["branches"]])),
        "merged": sq["merged"] ** 0.5,
        "joint": sq["joint"] ** 0.5 if joint is not None else None,
        "joint_over_merged": (sq["joint"] / sq["merged"]) ** 0.5 if joint is not None and sq["merged"] > 0 else None,
        # the merge file against Σ_k w_k θ_k recomputed here (≈ 0 unless a dtype cast rounded the merge)
        "merged_file_vs_weighted_sum": sq["merge_vs_weighted_sum"] ** 0.5,
        "parallel_axis": {"weighted_sq_norms": pa.weighted_sq_norms, "mean_sq_norm": pa.mean_sq_norm,
                          "spread": pa.spread, "residual": pa.residual, "relative_error": pa.relative_error,
                          "holds": pa.relative_error <= PARALLEL_AXIS_TOLERANCE},
        # what the merge keeps of each branch's update (why a merge-ready merge can still lose to joint)
        "task_vectors": L.task_vector_geometry(gram.gram, main.weights, joint is not None),
    }

    # Train vs held-out loss, joint vs merged.
    gap = {"merged": _gap(at("train/merged", lambda: ev.load(merged), ev.train), merged_loss)}
    joint_loss = None
    if joint is not None:
        joint_loss = at("heldout/joint", lambda: ev.load(joint))
        gap["joint"] = _gap(at("train/joint", lambda: ev.load(joint), ev.train), joint_loss)
    theta0_loss = at("heldout/theta0", lambda: ev.load(theta0))

    # Merge gain, measured and predicted; then the random-split baseline's.
    gains = {main.name: _gain(ev, main, branches, merged, branch_losses, merged_loss, settings, memo)}
    if folder.random is not None:
        rname = folder.random.name
        rb = [LazyCheckpoint(b) for b in folder.random.branches]
        rm = LazyCheckpoint(folder.random.merged)
        r_losses = [at(f"heldout/{rname}/{k}", lambda: ev.load(b)) for k, b in enumerate(rb)]
        r_merged = at(f"heldout/{rname}/merged", lambda: ev.load(rm))
        gains[rname] = _gain(ev, folder.random, rb, rm, r_losses, r_merged, settings, memo)
        # the same geometry for the random split: does splitting on conflicts make the branches' updates
        # more orthogonal (a larger spread to average, and less of each update kept)?
        displacement["task_vectors_random"] = {
            "merge": folder.random.name,
            **task_vector_geometry_of(theta0, rb, rm, folder.random.weights, joint, ev.floating)}

    # Gaussian perturbation: the same noise directions (one per draw) for every model and σ.
    seed = folder.cfg.seed if settings.seed is None else settings.seed
    models = {"theta0": (theta0, theta0_loss), "merged": (merged, merged_loss)}
    if joint is not None:
        models["joint"] = (joint, joint_loss)
    perturbation = {"sigmas": settings.sigmas, "draws": settings.draws, "seed": seed,
                    "relative_to": "each tensor's RMS",
                    "antithetic": settings.antithetic, "models": {}}
    log(f"perturbation: {len(models)} models × {len(settings.sigmas)} σ × {settings.draws} draws")
    for label, (ckpt, clean) in models.items():
        rows = []
        for sigma in settings.sigmas:
            increases = []
            for draw in range(settings.draws):
                signs = (1.0, -1.0) if settings.antithetic else (1.0,)
                perturbed = []
                for sign in signs:
                    def place():
                        # Reseeded per evaluation and ev.names in a fixed order: draw d's noise is the same
                        # tensor for every model, σ and sign (common random numbers: differences are not noise).
                        gen = torch.Generator().manual_seed(seed * 1000 + draw)
                        ev.set_weights(lambda n: _perturbed(ckpt[n], sign * sigma, gen, L))
                    perturbed.append(at(f"perturb/{label}/{sigma!r}/{draw}/{sign:+g}", place))
                increases.append(sum(perturbed) / len(perturbed) - clean)
            rows.append(increases)
        mean = [sum(r) / len(r) for r in rows]
        std = [(sum((x - m) ** 2 for x in r) / len(r)) ** 0.5 for r, m in zip(rows, mean)]
        perturbation["models"][label] = {"loss": clean, "delta_loss": rows, "mean": mean, "std": std,
                                         "auc": L.flatness_auc(settings.sigmas, mean)}

    results_loss = None
    if folder.results is not None:
        results_loss = folder.results.get("methods", {}).get(main.name, {}).get("loss")
    report = {
        "run": str(folder.root),
        "settings": {"alphas": len(settings.alphas), "max_per_source": settings.max_per_source,
                     "calibration_size": settings.calibration_size, "sigmas": settings.sigmas,
                     "draws": settings.draws, "seed": seed, "antithetic": settings.antithetic,
                     "heldout_examples": {n: len(x) for n, x in ev.heldout.items()},
                     "train_examples": {n: len(x) for n, x in ev.train.items()},
                     "calibration_examples": {n: len(x) for n, x in ev.calibration.items()}},
        "main": main.name,
        "weights": dict(zip(labels, main.weights)),
        "losses": {"theta0": theta0_loss, "merged": merged_loss, "joint": joint_loss,
                   "branches": dict(zip(labels, branch_losses)),
                   "results_json_merged": results_loss,
                   "results_json_difference": None if results_loss is None else merged_loss - results_loss},
        "lmc": {"alphas": settings.alphas, "max_barrier": max(c["barrier"] for c in curves), "paths": curves},
        "displacement": displacement,
        "loss_gap": gap,
        "merge_gain": gains,
        "perturbation": perturbation,
        "seconds": round(time.time() - started, 2),
    }
    report["checks"] = checks(report)
    return report, curves, perturbation


def largest_barrier(report: dict) -> tuple[dict, float | None]:
    """The LMC path with the largest barrier, and that barrier relative to the mean loss of its ends."""
    worst = max(report["lmc"]["paths"], key=lambda p: p["barrier"])
    scale = (worst["losses"][0] + worst["losses"][-1]) / 2
    return worst, (worst["barrier"] / scale if scale else None)


def checks(report: dict) -> list[dict]:
    """Each merge-readiness check: its value, what it is held against, and whether it passes (None: the
    number is missing, e.g. no joint run). Readings, not gates: the command exits 0 either way."""
    rows = []

    def add(name: str, value, threshold: str, passed) -> None:
        rows.append({"check": name, "value": value, "threshold": threshold,
                     "passed": None if passed is None else bool(passed)})

    worst, relative = largest_barrier(report)
    add("lmc_barrier_relative", relative, f"≤ {BARRIER_TOLERANCE}",
        worst["barrier"] <= BARRIER_TOLERANCE * (worst["losses"][0] + worst["losses"][-1]) / 2)
    pa = report["displacement"]["parallel_axis"]
    add("parallel_axis_relative_error", pa["relative_error"], f"≤ {PARALLEL_AXIS_TOLERANCE}",
        pa["relative_error"] <= PARALLEL_AXIS_TOLERANCE)
    diff = report["losses"]["results_json_difference"]
    add("merged_loss_vs_results_json", diff, f"|·| ≤ {RESULTS_TOLERANCE} (same examples as the eval stage)",
        None if diff is None or report["settings"]["max_per_source"] else abs(diff) <= RESULTS_TOLERANCE)
    ratio = report["displacement"]["joint_over_merged"]
    add("displacement_joint_over_merged", ratio, "> 1 (the merge moved less than joint; paper: 2.4–2.9×)",
        None if ratio is None else ratio > 1)
    for name, g in report["merge_gain"].items():
        low, high = GAIN_RATIO_RANGE
        add(f"gain_measured_over_predicted[{name}]", g["ratio"], f"in [{low}, {high}]",
            None if g["ratio"] is None else low <= g["ratio"] <= high)
    table = report["perturbation"]["models"]
    if "joint" in table:
        add("flatness_auc_merged_minus_joint", table["merged"]["auc"] - table["joint"]["auc"],
            "< 0 (the merge is flatter)", table["merged"]["auc"] < table["joint"]["auc"])
    return rows


def _gap(train: float, heldout: float) -> dict:
    return {"train": train, "heldout": heldout, "heldout_minus_train": heldout - train}


def _perturbed(tensor, sigma: float, gen, L):
    if not tensor.is_floating_point():
        return tensor
    return (tensor.float() + L.relative_gaussian_noise(tensor, sigma, gen)).to(tensor.dtype)


def task_vector_geometry_of(theta0, branches: list, merged, weights: list[float], joint, names) -> dict:
    """:func:`landscape.task_vector_geometry` of a merge from checkpoints read one tensor name at a time
    (``checkpoint[name]``, e.g. :class:`LazyCheckpoint`), in float64: memory is one tensor per model. (The
    main merge's Gram matrix is accumulated by the displacement pass as it reads the same tensors.)"""
    import torch

    from merit.diagnose import landscape as L

    models = [*branches, merged, *([joint] if joint is not None else [])]
    gram = L.TaskVectorGram(len(models))
    for name in names:
        base = theta0[name].to(torch.float64)
        gram.add([m[name].to(torch.float64) - base for m in models])
    return L.task_vector_geometry(gram.gram, weights, joint is not None)


def _loss_at(ev: Evaluator, memo: Memo, label: str, place, examples=None) -> float:
    """The loss (held-out, or on ``examples``) with the weights ``place()`` puts in the model, computed once
    per label."""
    def compute() -> float:
        place()
        return ev.loss(examples)
    return memo(label, compute)


def _gain(ev: Evaluator, merge: Merge, branches: list[LazyCheckpoint], merged: LazyCheckpoint,
          branch_losses: list[float], merged_loss: float, settings: Settings, memo: Memo) -> dict:
    """Measured Σ_k w_k L(θ_k) − L(θ̄) beside ½ Σ_k w_k (θ_k − θ̄)ᵀ H (θ_k − θ̄), H at θ̄ on the calibration
    examples: one HVP per branch, or (``settings.curvature == "second-difference"``) two losses per branch
    on the line through θ̄ and θ_k."""
    import torch

    from merit.diagnose import landscape as L

    curvatures = []
    started = time.time()

    if settings.curvature == "second-difference":
        eps = settings.curvature_epsilon
        at = _loss_at(ev, memo, f"calibration/{merge.name}/merged", lambda: ev.load(merged), ev.calibration)
        for k, b in enumerate(branches):
            # θ̄ ± ε(θ_k − θ̄) = the line through the merge and the branch at α = ±ε (merged → branch)
            ends = [_loss_at(ev, memo, f"calibration/{merge.name}/{k}/{alpha!r}",
                             lambda: ev.set_weights(lambda n: L.interpolate(merged[n], b[n], alpha)), ev.calibration)
                    for alpha in (eps, -eps)]
            curvatures.append(L.second_difference_curvature(ends[0], at, ends[1], eps))
        how = f"{2 * len(branches) + 1} loss evaluations (second differences, ε = {eps:g})"
    else:
        device = ev.state[ev.floating[0]].device

        def hvp(b: LazyCheckpoint) -> float:
            ev.load(merged)  # H at θ̄
            # θ_k − θ̄ (= δ_k − δ̄), built tensor by tensor, one branch at a time: one parameter-sized vector.
            d = {n: b[n].to(device, torch.float32) - merged[n].to(device, torch.float32) for n in ev.floating}
            return ev.curvature(d)

        curvatures = [memo(f"curvature/{merge.name}/{k}", lambda: hvp(b)) for k, b in enumerate(branches)]
        how = f"{len(branches)} HVPs"
    measured = L.measured_gain(merge.weights, branch_losses, merged_loss)
    predicted = L.predicted_gain(merge.weights, curvatures)
    log(f"gain {merge.name}: measured {measured:.4g}, predicted {predicted:.4g} ({how} in {time.time() - started:.1f} s)")
    return {"measured": measured, "predicted": predicted, "ratio": L.gain_ratio(measured, predicted),
            "weights": merge.weights, "branch_losses": branch_losses, "merged_loss": merged_loss,
            "curvatures": curvatures, "curvature": settings.curvature,
            **({"curvature_epsilon": settings.curvature_epsilon} if settings.curvature == "second-difference" else {}),
            "branches": [str(b.name) for b in merge.branches]}


# -------------------------------------------------------------------------------------------- outputs


def write_outputs(out: Path, report: dict, curves: list[dict], perturbation: dict) -> Path:
    """diagnose.json and the two plots, renamed into place together."""
    from merit import artifacts

    with artifacts.atomic_dir(out) as tmp:
        artifacts.write_json(tmp / "diagnose.json", report)
        lmc_plot(report["lmc"]["alphas"], curves, tmp / "lmc.png")
        perturbation_plot(perturbation, tmp / "perturbation.png")
    return out


def lmc_plot(alphas: list[float], curves: list[dict], path: Path) -> None:
    from merit.report.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        style = "-" if c["kind"] == "branch-branch" else "--"
        ax.plot(alphas, c["losses"], style, marker=".", label=f"{c['from']} → {c['to']} (barrier {c['barrier']:.3g})")
    ax.set_xlabel("α  (θ = (1 − α)·from + α·to)")
    ax.set_ylabel("held-out loss")
    ax.set_title("linear mode connectivity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def perturbation_plot(perturbation: dict, path: Path) -> None:
    from merit.report.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sigmas = [0.0] + list(perturbation["sigmas"])
    for label, row in perturbation["models"].items():
        ax.errorbar(sigmas, [0.0] + row["mean"], yerr=[0.0] + row["std"], marker="o", capsize=3,
                    label=f"{label} (AUC {row['auc']:.3g})")
    ax.set_xlabel("σ (relative to each tensor's RMS)")
    ax.set_ylabel("ΔL (held-out loss increase)")
    pairs = " (± pairs)" if perturbation.get("antithetic") else ""
    ax.set_title(f"Gaussian weight perturbation, {perturbation['draws']} draws{pairs}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def summary(report: dict) -> str:
    lines = [f"merit diagnose: {report['run']} ({report['main']}, {report['seconds']} s)"]
    losses = report["losses"]
    lines.append(f"  L(θ̄) {losses['merged']:.5f}" + (f"  (results.json {losses['results_json_merged']:.5f})"
                                                    if losses["results_json_merged"] is not None else ""))
    lines.append(f"  LMC: max barrier {report['lmc']['max_barrier']:.4g} over {len(report['lmc']['paths'])} paths")
    d = report["displacement"]
    ratio = f", joint/merged {d['joint_over_merged']:.3f}" if d["joint_over_merged"] is not None else ""
    lines.append(f"  displacement: merged {d['merged']:.4g}{ratio}; parallel-axis relative error "
                 f"{d['parallel_axis']['relative_error']:.1e}")
    for label, tv in ((report["main"], d.get("task_vectors")), ("random", d.get("task_vectors_random"))):
        if tv:
            joint = f", cos(τ̄, τ_joint) {tv['cos_merged_joint']:.3f}" if "cos_merged_joint" in tv else ""
            lines.append(f"  task vectors {tv.get('merge', label)}: mean pairwise cos {tv['mean_pair_cos']:.3f}, the "
                         f"merge keeps {tv['mean_retention']:.3f} of each branch's update (1/K if orthogonal: "
                         f"{1 / tv['branches']:.3f}){joint}")
    for name, g in report["merge_gain"].items():
        ratio = f"{g['ratio']:.3f}" if g["ratio"] is not None else "n/a"
        lines.append(f"  merge gain {name}: measured {g['measured']:.4g}, predicted {g['predicted']:.4g}, ratio {ratio}")
    for label, row in report["perturbation"]["models"].items():
        lines.append(f"  flatness AUC {label}: {row['auc']:.4g}")
    marks = {True: "ok  ", False: "FAIL", None: "n/a "}
    for c in report.get("checks", []):
        value = "n/a" if c["value"] is None else f"{c['value']:.4g}"
        lines.append(f"  [{marks[c['passed']]}] {c['check']} = {value}  ({c['threshold']})")
    return "\n".join(lines)
