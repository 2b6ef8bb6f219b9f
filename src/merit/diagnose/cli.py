"""``merit diagnose RUN``: merge-readiness and merge-gain instruments on a finished run folder.

    merit diagnose RUN [--alphas 21] [--max-per-source N] [--calibration-size N]
                       [--sigmas 0.01,0.05,0.1] [--draws 3] [--seed S]

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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merit.argtypes import int_at_least, nonnegative_int, positive_int
from merit.errors import MeritError

DEFAULT_SIGMAS = (0.01, 0.05, 0.1)
MERGE_OPERATOR = "token-weighted"


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
    p.add_argument("--antithetic", action="store_true",
                   help="evaluate each draw at +noise and −noise and average: cancels the first-order (gradient) "
                        "term, so ΔL measures curvature even away from a minimum (twice the evaluations)")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the noise draws (default: the run's seed)")
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
    antithetic: bool = False


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
    return Settings(alphas, args.max_per_source, args.calibration_size, sorted(sigmas), args.draws, args.seed,
                    bool(getattr(args, "antithetic", False)))


def run(args: argparse.Namespace) -> int:
    import torch

    settings = parse_settings(args)  # before reading anything: a bad flag is refused at once
    folder = inspect_run(Path(args.run))
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


def log(msg: str) -> None:
    print(f"[merit] diagnose: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the run folder


@dataclass
class Merge:
    """One split's branches and their token-weighted merge."""

    name: str  # results.json row, e.g. "merit-r1" or "random-k2"
    branches: list[Path]  # the merged ones (a partial merge leaves some out)
    indices: list[int]  # their group numbers in plan.json
    weights: list[float]  # as the merge used them (renormalised when partial)
    merged: Path


@dataclass
class RunFolder:
    root: Path
    cfg: object  # merit.config.RunConfig
    mixture: dict  # mixture manifest with data paths resolved
    theta0: Path
    main: Merge
    random: Merge | None
    joint: Path | None
    results: dict | None


def inspect_run(root: Path) -> RunFolder:
    """Everything diagnose reads, checked before any work; a MeritError naming the file otherwise."""
    from merit import artifacts
    from merit.config import load_config

    if not root.is_dir():
        raise MeritError(f"{root}: no such run folder")
    if not (root / "config.yaml").is_file():
        raise MeritError(f"{root}: not a merit run folder (no config.yaml); give the folder `merit run` wrote")
    cfg = load_config(root / "config.yaml")
    mixture = artifacts.read_manifest(root / "mixture")
    if mixture is None:
        raise MeritError(f"{root}/mixture: no finished mixture stage (no manifest.json); run the pipeline first")
    for entry in mixture["sources"]:
        for side in ("train", "eval"):
            if entry.get(side):
                entry[side] = str(_locate(entry[side], root))
    main = _merge_of(root, root, _main_name(cfg))
    theta0_manifest = artifacts.read_manifest(root / "theta0")
    theta0_hash = (theta0_manifest or {}).get("hash")
    _check_same_theta0(main, theta0_hash)
    theta0 = _theta0_folder(root, theta0_manifest, main)
    random = None
    for base in sorted((root / "baselines").glob("random-k*")):
        try:
            random = _merge_of(root, base, base.name)
        except MeritError as e:  # an unfinished baseline is left out, and said so
            log(f"random-split baseline left out: {e}")
            continue
        _check_same_theta0(random, theta0_hash or _branch_hashes(main)[0][1])
        break
    joint = root / "joint" if artifacts.read_manifest(root / "joint") is not None else None
    results = artifacts.read_json(root / "results.json") if (root / "results.json").is_file() else None
    return RunFolder(root, cfg, mixture, theta0, main, random, joint, results)


def _main_name(cfg) -> str:
    """The results.json row of the main split's token-weighted merge (as pipeline.stage_split names it)."""
    if cfg.split.method == "manual":
        return f"manual-k{len(cfg.split.groups)}"
    return f"merit-r{cfg.split.r}" if cfg.split.method == "pca-median" else f"{cfg.split.method}-k{cfg.groups}"


def _merge_of(root: Path, base: Path, name: str) -> Merge:
    from merit import artifacts
    from merit.merge.lora import is_adapter

    where = base.relative_to(root.parent) if base.is_relative_to(root.parent) else base
    plan_file = base / "split" / "plan.json"
    if not plan_file.is_file():
        raise MeritError(f"{where}: no split/plan.json; run `merit run` at least to --until merge first")
    plan = artifacts.read_json(plan_file)
    merged = base / "merged" / MERGE_OPERATOR
    manifest = artifacts.read_manifest(merged)
    if manifest is None:
        raise MeritError(f"{where}/merged/{MERGE_OPERATOR}: no finished token-weighted merge (no manifest.json); "
                         "run `merit run` to --until merge first")
    missing = set(manifest.get("missing") or [])
    indices = [k for k in range(len(plan["groups"])) if k not in missing]
    branches = [base / "branches" / str(k) for k in indices]
    for b in branches:
        if artifacts.read_manifest(b) is None:
            raise MeritError(f"{where}/branches/{b.name}: no finished branch (no manifest.json); "
                             "train it (`merit run` resumes) before diagnosing")
        if is_adapter(b):
            raise MeritError(f"{where}/branches/{b.name}: a LoRA adapter; merit diagnose needs dense branch checkpoints")
    if len(branches) < 2:
        raise MeritError(f"{where}: the merge has {len(branches)} branch; diagnosing a merge needs at least 2")
    weights = [float(w) for w in manifest.get("weights") or [plan["weights"][k] for k in indices]]
    return Merge(name, branches, indices, weights, merged)


def _branch_hashes(merge: Merge) -> list[tuple[Path, str | None]]:
    from merit import artifacts

    return [(b, artifacts.read_manifest(b).get("theta0_hash")) for b in merge.branches]


def _check_same_theta0(merge: Merge, theta0_hash: str | None) -> None:
    """Branches of one merge must start from the same θ(0) (and from this run's, when it is recorded):
    otherwise displacements and the gain's Taylor expansion compare unrelated points."""
    hashes = _branch_hashes(merge)
    reference = theta0_hash or hashes[0][1]
    for folder, h in hashes:
        if h != reference:
            what = "this run's θ(0)" if theta0_hash else f"{hashes[0][0].name}'s"
            raise MeritError(f"{folder}/manifest.json: trained from θ(0) {str(h)[:12]}…, not {what} "
                             f"{str(reference)[:12]}…; the branches of a merge must share θ(0)")


def _theta0_folder(root: Path, manifest: dict | None, main: Merge) -> Path:
    from merit import artifacts

    candidates = []
    if manifest is not None:
        candidates.append(_locate(manifest.get("path", root / "theta0"), root))
    candidates.append(Path(artifacts.read_manifest(main.branches[0]).get("theta0", root / "theta0")))
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise MeritError(f"{root}/theta0: θ(0) not found (looked in {', '.join(map(str, candidates))})")


def _locate(recorded: str | Path, root: Path) -> Path:
    """A path a manifest recorded, relative to where `merit run` ran: as it is when it exists from here,
    else its tail inside the run folder (``run/mixture/data/...`` → ``RUN/mixture/data/...``)."""
    p = Path(recorded)
    if p.is_absolute() or p.exists():
        return p
    for i in range(len(p.parts)):
        candidate = root.joinpath(*p.parts[i:])
        if candidate.exists():
            return candidate
    return p


# ----------------------------------------------------------------------------------------- the model


class LazyCheckpoint:
    """A checkpoint's tensors by name, read one at a time from its (memory-mapped) safetensors files."""

    def __init__(self, folder: Path):
        from merit.merge import safetensors_io as st

        self.folder = folder
        self.entries = st.checkpoint_tensors(folder)
        self._files: dict[Path, object] = {}

    def __getitem__(self, name: str):
        from safetensors import safe_open

        file = self.entries[name].file
        if file not in self._files:
            self._files[file] = safe_open(str(file), framework="pt")
        return self._files[file].get_tensor(name)


class Evaluator:
    """One model, loaded once from the merge, whose weights are overwritten in place for every point."""

    def __init__(self, folder: RunFolder, settings: Settings):
        import torch

        from merit.evaluate.runner import load_eval_model
        from merit.models.loading import load_tokenizer
        from merit.pipeline import eval_examples, eval_settings

        cfg = folder.cfg
        self.settings = eval_settings(cfg)
        self.heldout, _ = eval_examples(cfg, folder.mixture, "eval", settings.max_per_source)
        # A fixed sample of training data, as many examples per source as held out (the gap's other side).
        self.train, _ = eval_examples(cfg, folder.mixture, "train", settings.max_per_source)
        self.calibration = {n: ex[: settings.calibration_size] for n, ex in self.heldout.items()}
        self.tokenizer = load_tokenizer(folder.main.merged)
        self.model = load_eval_model(folder.main.merged, cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        self.model.eval()
        self.seed = cfg.seed
        self.state = self.model.state_dict()  # name -> tensor sharing the parameter's storage
        names = LazyCheckpoint(folder.main.merged).entries
        self.names = [n for n in names if n in self.state]
        if not self.names:
            raise MeritError(f"{folder.main.merged}: no tensor name of the checkpoint matches the model's parameters")
        self.floating = [n for n in self.names if self.state[n].is_floating_point()]
        self._torch = torch

    def set_weights(self, tensor_of: Callable[[str], object]) -> None:
        with self._torch.no_grad():
            for name in self.names:
                self.state[name].copy_(tensor_of(name))

    def load(self, checkpoint: LazyCheckpoint) -> None:
        self.set_weights(checkpoint.__getitem__)

    def loss(self, examples: dict[str, list[dict]] | None = None) -> float:
        """results.json's loss: mean over sources of each source's token-mean assistant loss."""
        from merit.evaluate.runner import assistant_loss

        examples = self.heldout if examples is None else examples
        self._torch.manual_seed(self.seed)  # as stage_eval (the loss is deterministic; kept for parity)
        per_source = []
        for items in examples.values():
            total, count = assistant_loss(self.model, self.tokenizer, items, self.settings)
            per_source.append(total / max(count, 1))
        return sum(per_source) / len(per_source)

    def curvature(self, vector: dict[str, object]) -> float:
        """vᵀ H v at the model's current weights, H the Hessian of the same macro loss on the calibration
        examples. Summed batch by batch (H is linear in the loss): each batch's H_b·v is dotted with v and
        dropped, so memory is v, one batch's graph and one H_b·v, never an accumulated H·v."""
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from merit.conflict.estimate import pad_batch, summed_token_loss
        from merit.data.chat import tokenize_conversation
        from merit.diagnose.landscape import hessian_vector_product, quadratic_form

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        vec = [vector[n].to(device=p.device, dtype=p.dtype) if n in vector else torch.zeros_like(p) for n, p in named]
        s = self.settings
        sources = list(self.calibration.values())
        total = 0.0
        # The math kernel: fused attention kernels (flash, memory-efficient) have no double backward.
        with sdpa_kernel(SDPBackend.MATH):
            for items in sources:
                toks = [tokenize_conversation(self.tokenizer, ex["messages"], s.max_length) for ex in items]
                toks = sorted((t for t in toks if t.loss_tokens > 0), key=lambda t: len(t.input_ids))
                scale = 1.0 / (max(sum(t.loss_tokens for t in toks), 1) * len(sources))  # token mean, then source mean
                for i in range(0, len(toks), s.batch_size):
                    batch = pad_batch(toks[i : i + s.batch_size], self.tokenizer.pad_token_id)
                    batch = {k: v.to(params[0].device) for k, v in batch.items()}
                    hv = hessian_vector_product(lambda: summed_token_loss(self.model, batch)[0] * scale, params, vec)
                    total += quadratic_form(vec, hv)
                    del hv
        self.model.zero_grad(set_to_none=True)
        return total


# ------------------------------------------------------------------------------------------- diagnose


def diagnose(folder: RunFolder, settings: Settings) -> tuple[dict, list[dict], dict]:
    """Compute every number; returns (diagnose.json content, LMC curves, perturbation table)."""
    import torch

    from merit.diagnose import landscape as L

    started = time.time()
    ev = Evaluator(folder, settings)
    main = folder.main
    theta0 = LazyCheckpoint(folder.theta0)
    merged = LazyCheckpoint(main.merged)
    branches = [LazyCheckpoint(b) for b in main.branches]
    joint = LazyCheckpoint(folder.joint) if folder.joint else None
    labels = [f"branch {k}" for k in main.indices]

    # Losses of the checkpoints themselves (held-out, and the fixed training sample for the gap).
    ev.load(merged)
    merged_loss = ev.loss()
    log(f"L(θ̄) = {merged_loss:.6f} on {sum(map(len, ev.heldout.values()))} held-out examples")
    branch_losses = []
    for b in branches:
        ev.load(b)
        branch_losses.append(ev.loss())

    # Linear mode connectivity: every pair of branches, and each branch to the merge.
    paths = [(i, j) for i in range(len(branches)) for j in range(i + 1, len(branches))]
    ends = [(labels[i], branches[i], labels[j], branches[j], "branch-branch") for i, j in paths]
    ends += [(labels[i], branches[i], "merged", merged, "branch-merged") for i in range(len(branches))]
    curves = []
    log(f"LMC: {len(ends)} paths × {len(settings.alphas)} points")
    for a_label, a, b_label, b, kind in ends:
        losses = []
        for alpha in settings.alphas:
            ev.set_weights(lambda n: L.interpolate(a[n], b[n], alpha))
            losses.append(ev.loss())
        bar = L.barrier(settings.alphas, losses)
        curves.append({"from": a_label, "to": b_label, "kind": kind, "losses": losses, "barrier": bar.height,
                       "barrier_alpha": bar.alpha, "min_loss": bar.min_loss, "min_alpha": bar.min_alpha})

    # Displacements from θ(0) and the parallel-axis identity, one tensor name at a time.
    pa = L.ParallelAxis()
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
        if joint is not None:
            sq["joint"] += L.squared_distance(joint[name], base)
    displacement = {
        "branches": dict(zip(labels, [v ** 0.5 for v in sq["branches"]])),
        "merged": sq["merged"] ** 0.5,
        "joint": sq["joint"] ** 0.5 if joint is not None else None,
        "joint_over_merged": (sq["joint"] / sq["merged"]) ** 0.5 if joint is not None and sq["merged"] > 0 else None,
        # the merge file against Σ_k w_k θ_k recomputed here (≈ 0 unless a dtype cast rounded the merge)
        "merged_file_vs_weighted_sum": sq["merge_vs_weighted_sum"] ** 0.5,
        "parallel_axis": {"weighted_sq_norms": pa.weighted_sq_norms, "mean_sq_norm": pa.mean_sq_norm,
                          "spread": pa.spread, "residual": pa.residual, "relative_error": pa.relative_error,
                          "holds": pa.relative_error < 1e-9},
    }

    # Train vs held-out loss, joint vs merged.
    ev.load(merged)
    gap = {"merged": _gap(ev.loss(ev.train), merged_loss)}
    joint_loss = None
    if joint is not None:
        ev.load(joint)
        joint_loss = ev.loss()
        gap["joint"] = _gap(ev.loss(ev.train), joint_loss)
    ev.load(theta0)
    theta0_loss = ev.loss()

    # Merge gain, measured and predicted; then the random-split baseline's.
    gains = {main.name: _gain(ev, main, branches, merged, branch_losses, merged_loss)}
    if folder.random is not None:
        rb = [LazyCheckpoint(b) for b in folder.random.branches]
        rm = LazyCheckpoint(folder.random.merged)
        r_losses = []
        for b in rb:
            ev.load(b)
            r_losses.append(ev.loss())
        ev.load(rm)
        gains[folder.random.name] = _gain(ev, folder.random, rb, rm, r_losses, ev.loss())

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
                    # Reseeded per evaluation and ev.names in a fixed order: draw d's noise is the same
                    # tensor for every model, σ and sign (common random numbers: differences are not noise).
                    gen = torch.Generator().manual_seed(seed * 1000 + draw)
                    ev.set_weights(lambda n: _perturbed(ckpt[n], sign * sigma, gen, L))
                    perturbed.append(ev.loss())
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
    return report, curves, perturbation


def _gap(train: float, heldout: float) -> dict:
    return {"train": train, "heldout": heldout, "heldout_minus_train": heldout - train}


def _perturbed(tensor, sigma: float, gen, L):
    if not tensor.is_floating_point():
        return tensor
    return (tensor.float() + L.relative_gaussian_noise(tensor, sigma, gen)).to(tensor.dtype)


def _gain(ev: Evaluator, merge: Merge, branches: list[LazyCheckpoint], merged: LazyCheckpoint,
          branch_losses: list[float], merged_loss: float) -> dict:
    """Measured Σ_k w_k L(θ_k) − L(θ̄) beside ½ Σ_k w_k (θ_k − θ̄)ᵀ H (θ_k − θ̄), H at θ̄ (one HVP per branch)."""
    import torch

    from merit.diagnose import landscape as L

    ev.load(merged)
    curvatures = []
    started = time.time()
    device = ev.state[ev.floating[0]].device
    for b in branches:
        # θ_k − θ̄ (= δ_k − δ̄), built tensor by tensor, one branch at a time: one parameter-sized vector.
        d = {n: b[n].to(device, torch.float32) - merged[n].to(device, torch.float32) for n in ev.floating}
        curvatures.append(ev.curvature(d))
        del d
    measured = L.measured_gain(merge.weights, branch_losses, merged_loss)
    predicted = L.predicted_gain(merge.weights, curvatures)
    log(f"gain {merge.name}: measured {measured:.4g}, predicted {predicted:.4g} "
        f"({len(branches)} HVPs in {time.time() - started:.1f} s)")
    return {"measured": measured, "predicted": predicted, "ratio": L.gain_ratio(measured, predicted),
            "weights": merge.weights, "branch_losses": branch_losses, "merged_loss": merged_loss,
            "curvatures": curvatures, "branches": [str(b.name) for b in merge.branches]}


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
    ax.set_title(f"Gaussian weight perturbation, {perturbation['draws']} draws")
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
    for name, g in report["merge_gain"].items():
        ratio = f"{g['ratio']:.3f}" if g["ratio"] is not None else "n/a"
        lines.append(f"  merge gain {name}: measured {g['measured']:.4g}, predicted {g['predicted']:.4g}, ratio {ratio}")
    for label, row in report["perturbation"]["models"].items():
        lines.append(f"  flatness AUC {label}: {row['auc']:.4g}")
    return "\n".join(lines)
