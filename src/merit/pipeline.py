"""Stage order and resume.

theta0 -> mixture -> grads -> split -> branches -> merge -> joint -> eval -> report

Each stage reads the run folder and writes into it, manifest last, under a key derived from its
config section and its inputs' keys. A rerun skips every stage whose manifest carries the same key
and redoes the rest, so a killed run resumes where it stopped and a changed setting recomputes
exactly what depends on it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merit import artifacts, registry
from merit.config import RunConfig, dump_config
from merit.data import mixture as mixture_stage
from merit.errors import ConfigError
from merit.models.loading import check_checkpoint, checkpoint_hash, load_model, load_tokenizer
from merit.split.partition import SplitInputs, token_weights

STAGES = ("theta0", "mixture", "grads", "split", "branches", "merge", "joint", "eval", "report")


def log(msg: str) -> None:
    print(f"[merit] {msg}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    """One split of the mixture into groups, trained as branches and merged (MERIT or a baseline)."""

    name: str  # results row for the token-weighted merge, e.g. "merit-r2" or "random-k4"
    method: str
    root: Path  # holds split/, branches/, merged/
    operators: list[str]
    plan: dict = field(default_factory=dict)
    key: str = ""

    def row(self, op: str) -> str:
        return self.name if op == "token-weighted" else f"{self.name}-{op}"


def check(cfg: RunConfig) -> None:
    """Problems that need no data: every registered name the config uses exists."""
    if cfg.model.preset is not None:
        registry.get("model-preset", cfg.model.preset, field="model.preset")
    registry.get("split", cfg.split.method, field="split.method")
    for i, op in enumerate(cfg.merge.operators):
        registry.get("merge", op, field=f"merge.operators[{i}]")
    if not cfg.merge.operators:
        raise ConfigError("merge.operators: give at least one operator")
    registry.get("launcher", cfg.launch.kind, field="launch.kind")


def run(cfg: RunConfig, out: Path, until: str | None = None) -> dict | None:
    """Run (or resume) the whole pipeline in run folder ``out``; the results dict, or None with ``until``."""
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until: unknown stage {until!r}; stages: {', '.join(STAGES)}")
    check(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))

    # Read and validate every data file before any expensive stage, so bad input fails in seconds.
    sources = mixture_stage.resolve_sources(cfg.mixture, out, cfg.seed)
    if len(sources) < cfg.groups:
        raise ConfigError(f"split.r={cfg.split.r} needs at least {cfg.groups} sources; the mixture has {len(sources)}")
    for s in sources:
        mixture_stage.read_source(s, cfg.mixture)

    def done(stage: str) -> bool:
        return until == stage

    theta0, theta0_hash, theta0_key = stage_theta0(cfg, out)
    if done("theta0"):
        return None
    tokenizer = load_tokenizer(theta0)
    mixture, mixture_key = stage_mixture(cfg, out, sources, tokenizer, theta0_key)
    if done("mixture"):
        return None
    grads_key = stage_grads(cfg, out, mixture, tokenizer, theta0, mixture_key)
    if done("grads"):
        return None
    variants = stage_split(cfg, out, mixture, grads_key, mixture_key)
    if done("split"):
        return None
    branch_keys = stage_branches(cfg, out, variants, mixture, theta0, theta0_hash)
    if done("branches"):
        return None
    checkpoints = {"base": (theta0, theta0_key)}
    checkpoints.update(stage_merge(cfg, variants, branch_keys))
    if done("merge"):
        return None
    if cfg.baselines.joint:
        checkpoints = {"base": checkpoints.pop("base"), "joint": stage_joint(cfg, out, mixture, theta0, theta0_hash,
                                                                               theta0_key), **checkpoints}
    if done("joint"):
        return None
    results = stage_eval(cfg, out, mixture, checkpoints, mixture_key)
    if done("eval"):
        return results
    stage_report(out, results, variants)
    return results


# ----------------------------------------------------------------------------------------------- stages


def stage_theta0(cfg: RunConfig, out: Path) -> tuple[Path, str, str]:
    stage = out / "theta0"
    if cfg.model.path is not None:
        folder = Path(cfg.model.path)
        digest = checkpoint_hash(check_checkpoint(folder))
        key = artifacts.fingerprint("theta0", digest)
        if not artifacts.is_done(stage, key):
            artifacts.reset_stage(stage)
            artifacts.write_manifest(stage, key, path=str(folder), hash=digest)
        return folder, digest, key
    key = artifacts.fingerprint("theta0", cfg.model.preset, cfg.prepare.model_dump(), cfg.seed)
    if not artifacts.is_done(stage, key):
        log(f"theta0: preparing preset {cfg.model.preset!r}")
        prepare = registry.get("model-preset", cfg.model.preset)
        with artifacts.atomic_dir(stage) as tmp:
            info = prepare(tmp, cfg.prepare, cfg.seed)
            artifacts.write_manifest(tmp, key, hash=checkpoint_hash(tmp), **info)
    else:
        log("theta0: done (cached)")
    return stage, artifacts.read_manifest(stage)["hash"], key


def stage_mixture(cfg, out, sources, tokenizer, theta0_key) -> tuple[dict, str]:
    stage = out / "mixture"
    files = [(s.name, artifacts.file_sha256(s.train), artifacts.file_sha256(s.eval) if s.eval else None)
             for s in sources]
    key = artifacts.fingerprint("mixture", theta0_key, cfg.mixture.model_dump(), files)
    if not artifacts.is_done(stage, key):
        log(f"mixture: tokenizing {len(sources)} sources")
        manifest = mixture_stage.build(out, cfg.mixture, sources, tokenizer, key)
    else:
        manifest = artifacts.read_manifest(stage)
    log(f"mixture: {len(manifest['sources'])} sources, {manifest['total_samples']} samples, "
        f"{manifest['total_tokens']} tokens")
    return manifest, key


def stage_grads(cfg, out, mixture, tokenizer, theta0, mixture_key) -> str:
    from merit.conflict.estimate import estimate

    stage = out / "grads"
    key = artifacts.fingerprint("grads", mixture_key, cfg.grads.model_dump(), cfg.model.dtype, cfg.seed)
    if artifacts.is_done(stage, key):
        log("grads: done (cached)")
        return key
    if artifacts.read_manifest(stage) is not None:
        artifacts.reset_stage(stage)  # finished for other inputs: start over
    names = [e["name"] for e in mixture["sources"]]
    examples = {}
    for e in mixture["sources"]:
        examples[e["name"]] = mixture_stage.load_train(mixture, [e["name"]], tokenizer, cfg.mixture)
    model = load_model(theta0, "float32")
    log(f"grads: mean gradients of {len(names)} sources at θ(0) "
        f"(≤{cfg.grads.calibration_size} examples each, stride {cfg.grads.stride})")
    estimate(model, tokenizer, examples, stage, calibration_size=cfg.grads.calibration_size,
             stride=cfg.grads.stride, batch_size=cfg.grads.batch_size, seed=cfg.seed, key=key)
    return key


def stage_split(cfg, out, mixture, grads_key, mixture_key) -> list[Variant]:
    from merit.conflict.cosine import cosine_matrix
    from merit.conflict.estimate import load_gradients
    from merit.split.pca import pca_scores

    k = cfg.groups
    main_name = f"merit-r{cfg.split.r}" if cfg.split.method == "pca-median" else f"{cfg.split.method}-k{k}"
    variants = [Variant(main_name, cfg.split.method, out, list(cfg.merge.operators))]
    if cfg.baselines.random and cfg.split.method != "random":
        variants.append(Variant(f"random-k{k}", "random", out / "baselines" / f"random-k{k}",
                                [cfg.merge.operators[0]]))

    names, grads = load_gradients(out / "grads")
    conflict = cosine_matrix(grads.numpy())
    scores, explained = pca_scores(conflict, max(cfg.split.r, 2))
    entry = {e["name"]: e for e in mixture["sources"]}
    samples = np.array([entry[n]["samples"] for n in names])
    tokens = np.array([entry[n]["tokens"] for n in names])
    for v in variants:
        stage = v.root / "split"
        v.key = artifacts.fingerprint("split", v.method, grads_key, cfg.split.r, cfg.seed)
        if not artifacts.is_done(stage, v.key):
            artifacts.reset_stage(stage)
            method = registry.get("split", v.method, field="split.method")
            groups = method(SplitInputs(conflict, samples, tokens, cfg.split.r, cfg.seed))
            plan = {
                "method": v.method,
                "r": cfg.split.r,
                "sources": names,
                "groups": [[names[i] for i in g] for g in groups],
                "samples": [int(samples[g].sum()) for g in groups],
                "tokens": [int(tokens[g].sum()) for g in groups],
                "weights": token_weights(tokens, groups),
            }
            artifacts.write_json(stage / "conflict.json", {"sources": names, "matrix": conflict.tolist()})
            artifacts.write_json(stage / "pca.json", {"sources": names, "scores": scores.tolist(),
                                                      "explained_variance_ratio": explained.tolist()})
            artifacts.write_json(stage / "plan.json", plan)
            artifacts.write_manifest(stage, v.key, groups=len(groups))
        v.plan = artifacts.read_json(stage / "plan.json")
        log(f"split: {v.name}: groups of {v.plan['samples']} samples, weights "
            f"{[round(w, 3) for w in v.plan['weights']]}")
    return variants


def branch_job(cfg, out_dir, name, sources, mixture, theta0, theta0_hash, key):
    from merit.train.branch import BranchJob

    return BranchJob(name=name, out=out_dir, theta0=Path(theta0), theta0_hash=theta0_hash, sources=tuple(sources),
                     mixture=mixture, mixture_cfg=cfg.mixture, train_cfg=cfg.train, dtype=cfg.model.dtype,
                     seed=cfg.seed, key=key)


def stage_branches(cfg, out, variants, mixture, theta0, theta0_hash) -> dict[str, list[str]]:
    from merit.train.branch import run_branch

    jobs, keys = [], {}
    for v in variants:
        keys[v.name] = []
        for k, group in enumerate(v.plan["groups"]):
            key = artifacts.fingerprint("branch", v.key, k, theta0_hash, cfg.train.model_dump(), cfg.model.dtype)
            keys[v.name].append(key)
            folder = v.root / "branches" / str(k)
            if artifacts.is_done(folder, key):
                continue
            jobs.append(branch_job(cfg, folder, f"{v.name} branch {k + 1}/{len(v.plan['groups'])}", group,
                                   mixture, theta0, theta0_hash, key))
    if jobs:
        log(f"branches: training {len(jobs)} branch(es) with launcher {cfg.launch.kind!r}")
        launcher = registry.get("launcher", cfg.launch.kind)
        launcher(jobs, run_branch)
    else:
        log("branches: done (cached)")
    return keys


def stage_merge(cfg, variants, branch_keys) -> dict[str, tuple[Path, str]]:
    from merit.merge.checkpoint import merge_checkpoints

    merged = {}
    for v in variants:
        folders = [v.root / "branches" / str(k) for k in range(len(v.plan["groups"]))]
        for op in v.operators:
            target = v.root / "merged" / op
            key = artifacts.fingerprint("merge", op, branch_keys[v.name], v.plan["weights"])
            if not artifacts.is_done(target, key):
                log(f"merge: {v.row(op)} ({op} over {len(folders)} branches)")
                info = merge_checkpoints(folders, v.plan["weights"], registry.get("merge", op), target)
                artifacts.write_manifest(target, key, operator=op, branches=[str(f) for f in folders],
                                         weights=v.plan["weights"], **info)
            merged[v.row(op)] = (target, key)
    return merged


def stage_joint(cfg, out, mixture, theta0, theta0_hash, theta0_key) -> tuple[Path, str]:
    from merit.train.branch import run_branch

    folder = out / "joint"
    names = [e["name"] for e in mixture["sources"]]
    key = artifacts.fingerprint("joint", theta0_key, mixture["key"], cfg.train.model_dump(), cfg.model.dtype, cfg.seed)
    if not artifacts.is_done(folder, key):
        log("joint: training the joint baseline on the whole mixture")
        run_branch(branch_job(cfg, folder, "joint", names, mixture, theta0, theta0_hash, key))
    return folder, key


def stage_eval(cfg, out, mixture, checkpoints: dict[str, tuple[Path, str]], mixture_key) -> dict:
    from merit.data.jsonl import read_examples
    from merit.evaluate.runner import evaluate_model

    cap = cfg.eval.max_per_source
    sources = {}
    for e in mixture["sources"]:
        if e["eval"]:
            limits = [x for x in (cap, cfg.mixture.max_eval_per_source) if x]
            sources[e["name"]] = read_examples(e["eval"], min(limits) if limits else None)
    if not sources:
        raise ConfigError("eval: no source has an eval split; give eval files (mixture.sources[].eval or DIR/eval/)")
    tokenizer = None
    methods = {}
    for name, (folder, ckpt_key) in checkpoints.items():
        path = out / "eval" / f"{name}.json"
        key = artifacts.fingerprint("eval", ckpt_key, mixture_key, cfg.eval.model_dump())
        if path.exists() and artifacts.read_json(path).get("key") == key:
            methods[name] = artifacts.read_json(path)["result"]
            continue
        tokenizer = tokenizer or load_tokenizer(folder)
        model = load_model(folder, cfg.model.dtype)
        torch.manual_seed(cfg.seed)
        result = evaluate_model(model, tokenizer, sources, max_length=cfg.mixture.max_length,
                                batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                                desc=f"eval {name}")
        artifacts.write_json(path, {"key": key, "checkpoint": str(folder), "result": result})
        methods[name] = result
    results = {"methods": {n: {"macro": r["macro"], "loss": r["loss"], "per_source": r["per_source"]}
                           for n, r in methods.items()}}
    artifacts.write_json(out / "results.json", results)
    return results


def stage_report(out: Path, results: dict, variants: list[Variant]) -> None:
    from merit.report.plots import conflict_heatmap, pca_scatter
    from merit.report.table import format_table

    main = variants[0]
    split_dir = main.root / "split"
    conflict = artifacts.read_json(split_dir / "conflict.json")
    pca = artifacts.read_json(split_dir / "pca.json")
    conflict_heatmap(np.array(conflict["matrix"]), conflict["sources"], main.plan["groups"], split_dir / "conflict.png")
    pca_scatter(np.array(pca["scores"]), pca["sources"], main.plan["groups"], split_dir / "pca.png")
    lines = [f"# merit run: {out.name}", "", format_table(results, markdown=True), "", "## Groups", ""]
    for v in variants:
        lines.append(f"**{v.name}** ({v.method}, token weights {[round(w, 3) for w in v.plan['weights']]})")
        lines += [f"- group {k}: {', '.join(g)}" for k, g in enumerate(v.plan["groups"])]
        lines.append("")
    lines += ["![conflict matrix](split/conflict.png)", "", "![PCA of the conflict matrix](split/pca.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
