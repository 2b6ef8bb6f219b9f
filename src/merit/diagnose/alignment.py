"""``merit hessian-alignment RUN``: do the conflict directions line up with θ(0)'s curvature? (Table 21)

    merit hessian-alignment RUN [--iterations 50] [--eigenvectors 10] [--directions 3]
                                [--hessian-examples 200] [--epsilon 0.1] [--hvp central|exact]
                                [--random-tasks 4] [--seed S]

Needs only the run's θ(0), mixture and grads stages (no branch is read). Writes ``RUN/alignment/
alignment.json`` in one rename at the end. The protocol (paper App. F.3) and its math are in
:mod:`merit.diagnose.spectrum`; here is what it costs and where it deviates:

- The four quadrant tasks come from the run's stored conflict matrix (its compressed gradients, as the
  split used it); their *lifted* gradients are recomputed in full dimension at θ(0) on the same
  calibration examples as the grads stage (so ``stored_vs_exact`` shows what compression did to the
  cosines the picks were made from). The paper took 50 examples per task; this takes
  ``grads.calibration_size``.
- The Hessian is that of the token-mean loss over ``--hessian-examples`` training examples drawn
  uniformly from the whole mixture, at θ(0), over the trainable parameters (fp32).
- ``--hvp central`` (default, the paper's): (∇L(θ+εv) − ∇L(θ−εv)) / 2ε with ε = 0.1 on a unit v, two
  gradient passes per product; ``exact``: double backward (a quadratic's HVP with no ε error, ~1.5× the
  cost and a graph of the gradient in memory).

Cost: ``iterations`` HVPs (each 2 gradients over the Hessian sample) + (4 + random-tasks) gradients over
calibration samples. Memory: the model, the Krylov basis as a float32 memory map on disk
((iterations + 1) × d × 4 bytes: 27 GB for SmolLM2-135M at 50 iterations, 0.6 TB for a 3B model — the
page cache holds what fits), the Ritz vectors ((eigenvectors) × d float32) and the task gradients
((4 + random-tasks) × d float32) in RAM.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from merit.argtypes import nonnegative_int, positive_int
from merit.diagnose.inputs import config_and_mixture, locate, log
from merit.errors import MeritError

CONVERGED = 0.01  # Ritz residual ‖Hy − θy‖ relative to |θ| under which an eigenpair counts as found


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hessian-alignment", help="PCA conflict directions vs θ(0)'s top Hessian eigenvectors (paper Table 21)",
        description="Lift the conflict matrix's quadrant tasks to parameter space and compare their principal "
                    "directions with θ(0)'s top Hessian eigenvectors (Lanczos, full reorthogonalisation); "
                    "writes RUN/alignment/alignment.json.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run folder with finished theta0, mixture and grads stages")
    p.add_argument("--iterations", type=positive_int, default=50, help="Lanczos iterations = HVPs (default 50)")
    p.add_argument("--eigenvectors", type=positive_int, default=10, help="top Hessian eigenvectors kept (default 10)")
    p.add_argument("--directions", type=positive_int, default=3, help="lifted conflict directions (default 3)")
    p.add_argument("--hessian-examples", type=positive_int, default=200,
                   help="training examples, drawn from the whole mixture, whose loss the Hessian is of (default 200)")
    p.add_argument("--epsilon", type=float, default=0.1, help="central-difference step on a unit vector (default 0.1)")
    p.add_argument("--hvp", choices=["central", "exact"], default="central",
                   help="central differences of fp32 gradients (the paper's, default) or double backward")
    p.add_argument("--random-tasks", type=nonnegative_int, default=4,
                   help="other tasks whose own gradients are the 'random task gradient' baseline (default 4)")
    p.add_argument("--seed", type=nonnegative_int, help="seed of the samples and the start vector (default: the run's)")
    return p


def _check(args: argparse.Namespace) -> None:
    if not args.epsilon > 0:
        raise MeritError(f"--epsilon {args.epsilon}: the central-difference step must be positive (the paper's is 0.1)")
    if args.eigenvectors > args.iterations:
        raise MeritError(f"--eigenvectors {args.eigenvectors} > --iterations {args.iterations}: Lanczos finds at "
                         "most one eigenvector per iteration; ask for more iterations (the paper: 10 of 50)")


def _inputs(root: Path):
    """config, mixture manifest (paths resolved), θ(0) folder, stored conflict — or a one-line refusal."""
    from merit import artifacts
    from merit.conflict.store import load_conflict
    from merit.models.vlm import is_vlm

    cfg, mixture = config_and_mixture(root)
    theta0 = artifacts.read_manifest(root / "theta0")
    for stage in ("theta0", "grads"):
        if artifacts.read_manifest(root / stage) is None:
            raise MeritError(f"{root}/{stage}: no finished {stage} stage (no manifest.json); run "
                             f"`merit run CONFIG --until grads` first")
    folder = locate(theta0.get("path", root / "theta0"), root)
    if not (folder / "config.json").is_file():
        folder = root / "theta0"
    if is_vlm(folder):
        raise MeritError(f"{folder}: a vision-language θ(0); merit hessian-alignment handles text-only runs for now")
    names, cosine = load_conflict(root / "grads")
    if len(names) < 2:
        raise MeritError(f"{root}/grads: {len(names)} source(s); the alignment needs a conflict matrix of ≥ 2")
    return cfg, mixture, folder, names, cosine


class _FlatModel:
    """θ(0) in fp32 with its trainable parameters viewed as one flat vector (set, offset, gradient)."""

    def __init__(self, cfg, folder: Path, seed: int):
        import torch

        from merit.conflict.estimate import default_device
        from merit.models.loading import load_for_training, load_tokenizer, trainable_parameters

        self.tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
        self.model = load_for_training(folder, cfg.model, cfg.train.lora, seed, dtype="float32")
        self.model.to(default_device())
        self.params = [p for _, p in trainable_parameters(self.model)]
        self.theta0 = torch.cat([p.detach().flatten().float() for p in self.params]).cpu().numpy()
        self.dim = self.theta0.shape[0]
        self.batch_size = cfg.grads.batch_size
        self._torch = torch

    def set_offset(self, offset: np.ndarray | None) -> None:
        """θ = θ(0) + offset (None: θ(0) itself)."""
        flat = self.theta0 if offset is None else (self.theta0 + offset).astype(np.float32)
        with self._torch.no_grad():
            start = 0
            for p in self.params:
                n = p.numel()
                p.copy_(self._torch.from_numpy(flat[start : start + n]).view_as(p))
                start += n

    def gradient(self, examples: list, offset: np.ndarray | None = None) -> np.ndarray:
        """∇ of the token-mean loss over ``examples`` at θ(0) + offset, flat float32."""
        from merit.conflict.estimate import mean_gradient

        self.set_offset(offset)
        try:
            grads = mean_gradient(self.model, examples, self.batch_size, self.tokenizer.pad_token_id)
        finally:
            if offset is not None:
                self.set_offset(None)
        return self._torch.cat([g.flatten() for _, g in grads]).cpu().numpy()

    def exact_hvp(self, examples: list, vector: np.ndarray) -> np.ndarray:
        """H·v by double backward, batch by batch (H is linear in the loss), on the token-mean loss."""
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from merit.conflict.estimate import pad_batch, summed_token_loss
        from merit.data.chat import IGNORE
        from merit.diagnose.landscape import hessian_vector_product

        total = sum(sum(1 for x in t.labels[1:] if x != IGNORE) for t in examples)
        vec, start = [], 0
        for p in self.params:
            vec.append(torch.from_numpy(vector[start : start + p.numel()].astype(np.float32)).view_as(p).to(p.device))
            start += p.numel()
        out = np.zeros(self.dim, dtype=np.float64)
        self.model.eval()
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            for i in range(0, len(examples), self.batch_size):
                batch = pad_batch(list(examples[i : i + self.batch_size]), self.tokenizer.pad_token_id)
                batch = {k: v.to(self.params[0].device) for k, v in batch.items()}
                hv = hessian_vector_product(lambda: summed_token_loss(self.model, batch)[0] / total, self.params, vec)
                out += torch.cat([h.flatten() for h in hv]).double().cpu().numpy()
        self.model.zero_grad(set_to_none=True)
        return out


def run(args: argparse.Namespace) -> int:
    from merit import artifacts
    from merit.conflict.estimate import calibration_sample
    from merit.data.mixture import load_train
    from merit.diagnose import spectrum as S

    _check(args)
    root = Path(args.run)
    cfg, mixture, theta0, names, cosine = _inputs(root)
    seed = cfg.seed if args.seed is None else args.seed
    started = time.time()

    embedding = S.double_centred_embedding(cosine, 2)
    picks = S.quadrant_extremes(embedding)
    others = [i for i in range(len(names)) if i not in picks]
    baseline = sorted(random.Random(f"{seed}:alignment").sample(others, min(args.random_tasks, len(others))))
    log(f"alignment: quadrant tasks {[names[i] for i in picks]}; baseline tasks {[names[i] for i in baseline]}")

    m = _FlatModel(cfg, theta0, seed)
    examples = {n: load_train(mixture, [n], m.tokenizer, cfg.mixture) for n in names}  # memory-mapped
    calib = {i: calibration_sample(examples[names[i]], cfg.grads.calibration_size, cfg.seed, names[i])
             for i in picks + baseline}
    grads = {i: m.gradient(calib[i]) for i in picks + baseline}
    pick_grads = np.stack([grads[i] for i in picks])
    exact_cos = S.cosines(pick_grads, pick_grads)

    pool = [(n, j) for n in names for j in range(len(examples[n]))]
    drawn = sorted(random.Random(f"{seed}:hessian").sample(range(len(pool)), min(args.hessian_examples, len(pool))))
    hessian_sample = [examples[pool[k][0]][pool[k][1]] for k in drawn]
    hvps = {"count": 0}

    def matvec(v: np.ndarray) -> np.ndarray:
        hvps["count"] += 1
        log(f"alignment: HVP {hvps['count']}/{args.iterations} ({args.hvp})")
        if args.hvp == "exact":
            return m.exact_hvp(hessian_sample, v)
        return S.central_difference_hvp(lambda off: m.gradient(hessian_sample, off), v, args.epsilon)

    out = root / "alignment"
    with artifacts.atomic_dir(out) as tmp:
        basis = np.lib.format.open_memmap(tmp / "krylov.npy", mode="w+", dtype=np.float32,
                                          shape=(args.iterations + 1, m.dim))
        start = np.random.default_rng(seed).standard_normal(m.dim)
        lz = S.lanczos(matvec, start, args.iterations, args.eigenvectors, basis=basis)
        del basis
        (tmp / "krylov.npy").unlink()  # the basis is scratch (gigabytes for a real model), never kept
        raw = S.lifted_directions(pick_grads, args.directions)
        centred = S.lifted_directions(pick_grads, args.directions, centred=True)
        own = {names[i]: float(S.abs_cosines(grads[i][None], lz.vectors).max()) for i in baseline}
        own_values = list(own.values())
        report = {
            "run": str(root),
            "settings": {"iterations": args.iterations, "eigenvectors": args.eigenvectors,
                         "directions": args.directions, "hessian_examples": len(hessian_sample),
                         "epsilon": args.epsilon if args.hvp == "central" else None, "hvp": args.hvp,
                         "random_tasks": len(baseline), "seed": seed,
                         "calibration_size": cfg.grads.calibration_size, "dimension": m.dim},
            "quadrant_tasks": [{"name": names[i], "embedding": embedding[i].tolist()} for i in picks],
            # C among the picks as the split saw it (compressed gradients) and recomputed in full dimension
            "stored_vs_exact": {"stored": cosine[np.ix_(picks, picks)].tolist(), "exact": exact_cos.tolist()},
            "hessian": {"eigenvalues": lz.values.tolist(), "residuals": lz.residuals.tolist(),
                        # eigenpairs whose Ritz residual is below 1% of the eigenvalue: the others are
                        # mixtures of nearby eigenvectors (more iterations separate them)
                        "converged": int(np.sum(lz.residuals <= CONVERGED * np.abs(lz.values))),
                        "iterations": lz.iterations, "hvps": hvps["count"]},
            "alignment": {"raw": S.alignment(raw, lz.vectors, m.dim),
                          "centred": S.alignment(centred, lz.vectors, m.dim)},
            "baselines": {"random_unit_vector_top1_abs_cos": S.random_top1_baseline(m.dim, len(lz.vectors))[0],
                          "random_task_gradient_top1_abs_cos": own,
                          "random_task_gradient_mean": float(np.mean(own_values)) if own_values else None,
                          "random_task_gradient_std": float(np.std(own_values)) if own_values else None},
            "seconds": round(time.time() - started, 2),
        }
        artifacts.write_json(tmp / "alignment.json", report)
    print(summary(report))
    print(f"\nwritten: {out / 'alignment.json'}")
    return 0


def summary(report: dict) -> str:
    a, b, h = report["alignment"], report["baselines"], report["hessian"]
    rows = [f"Hessian–PCA alignment ({report['settings']['iterations']} Lanczos iterations, "
            f"{report['settings']['hessian_examples']} examples, d = {report['settings']['dimension']:,})",
            f"  quadrant tasks: {', '.join(t['name'] for t in report['quadrant_tasks'])}",
            f"  top eigenvalues: {', '.join(f'{v:.4g}' for v in h['eigenvalues'][:5])} "
            f"({h['converged']} of {len(h['eigenvalues'])} converged to 1%)",
            f"  {'':<28}{'raw':>10}{'centred':>10}"]
    for key, label in (("max_abs_cos", "max |cos|"), ("mean_top1_abs_cos", "mean top-1 |cos|"),
                       ("leading_principal_angle_deg", "leading principal angle (°)"), ("z_vs_random", "z vs random")):
        rows.append(f"  {label:<28}{a['raw'][key]:>10.4g}{a['centred'][key]:>10.4g}")
    rows.append(f"  random unit vector top-1 |cos|: {b['random_unit_vector_top1_abs_cos']:.3g}")
    if b["random_task_gradient_mean"] is not None:
        rows.append(f"  random task gradient top-1 |cos|: {b['random_task_gradient_mean']:.4g} "
                    f"± {b['random_task_gradient_std']:.4g}")
    return "\n".join(rows)
