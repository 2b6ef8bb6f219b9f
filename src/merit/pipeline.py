"""Stage order and resume.

theta0 -> mixture -> grads -> split -> branches -> merge -> joint -> eval -> diagnose -> report

Each stage reads the run folder and writes into it, manifest last, under a key derived from its
config section and its inputs' keys. A rerun skips every stage whose manifest carries the same key
and redoes the rest, so a killed run resumes where it stopped and a changed setting recomputes
exactly what depends on it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from merit import artifacts, plugins
from merit.config import RunConfig, dump_config
from merit.data import formats
from merit.data import mixture as mixture_stage
from merit.errors import ConfigError, notice, warn
from merit.models.loading import check_checkpoint, checkpoint_hash, load_tokenizer
from merit.preflight import preflight
from merit.split.partition import SplitInputs, token_weights

STAGES = ("theta0", "mixture", "grads", "split", "branches", "merge", "joint", "eval", "diagnose", "report")


def log(msg: str) -> None:
    print(f"[merit] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(stage: str):
    """One line when a stage ends, with its wall time (its start line is the stage's own)."""
    start = time.time()
    yield
    seconds = time.time() - start
    log(f"{stage}: finished in {seconds:.1f} s" if seconds < 120 else f"{stage}: finished in {seconds / 60:.1f} min")


@dataclass
class Variant:
    """One split of the mixture into groups, trained as branches and merged (MERIT or a baseline)."""

    name: str  # results row for the token-weighted merge, e.g. "merit-r2" or "random-k4"
    method: str
    root: Path  # holds split/, branches/, merged/
    operators: list[str]
    r: int = 1  # K = 2^r groups
    plan: dict = field(default_factory=dict)
    key: str = ""

    def row(self, op: str) -> str:
        return self.name if op == "token-weighted" else f"{self.name}-{op}"


def check(cfg: RunConfig) -> None:
    """Problems that need no data: every registered name the config uses exists."""
    if cfg.model.preset is not None:
        plugins.get("model-preset", cfg.model.preset, field="model.preset")
    plugins.get("split", cfg.split.method, field="split.method")
    plugins.get("compression", cfg.grads.compression, field="grads.compression")
    if cfg.grads.compression == "jl" and cfg.grads.sketch_dim > 16384:
        raise ConfigError(f"grads.sketch_dim={cfg.grads.sketch_dim} with grads.compression=jl costs "
                          "sketch_dim × parameters per source; use ≤ 16384 (e.g. 1024) or countsketch")
    for i, op in enumerate(cfg.merge.operators):
        plugins.get("merge", op, field=f"merge.operators[{i}]")
    for op in cfg.merge.params:
        merge_params(cfg, op)
        if op not in cfg.merge.operators:
            warn(f"merge.params.{op}: {op} is not in merge.operators, so these parameters are not used")
    if not cfg.merge.operators:
        raise ConfigError("merge.operators: give at least one operator")
    plugins.get("launcher", cfg.launch.kind, field="launch.kind")
    if not cfg.baselines.joint:
        for name in ("joint_epochs", "soups"):
            if getattr(cfg.baselines, name):
                raise ConfigError(f"baselines.{name}: needs baselines.joint: true (the joint run is "
                                  f"{'the 1-epoch row' if name == 'joint_epochs' else 'the first soup member'})")
    if cfg.diagnose.enabled:
        # What merit diagnose reads: the main split's token-weighted merge of dense branches.
        if "token-weighted" not in cfg.merge.operators:
            raise ConfigError("diagnose.enabled: diagnose reads the token-weighted merge; add token-weighted to "
                              "merge.operators or set diagnose.enabled: false")
        if cfg.train.lora is not None:
            raise ConfigError("diagnose.enabled: LoRA branches are adapters, and diagnose needs dense "
                              "checkpoints; set diagnose.enabled: false (or train.lora: null)")
        if cfg.diagnose.curvature == "second-difference" and cfg.model.dtype != "float32":
            raise ConfigError(f"diagnose.curvature=second-difference with model.dtype={cfg.model.dtype}: second "
                              "differences of a low-precision loss are its rounding; use diagnose.curvature: hvp")


def merge_params(cfg: RunConfig, op: str) -> tuple[dict, dict]:
    """(every parameter of ``op``, defaults included; those of ``merge.params.<op>`` that differ from the
    defaults). A ConfigError names ``merge.params.<op>[.<param>]`` for an unknown operator or parameter,
    or a value out of range."""
    operator = plugins.get("merge", op, field=f"merge.params.{op}")
    given = cfg.merge.params.get(op) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"merge.params.{op}: expected a mapping of parameter: value, got {given!r}")
    resolved = operator.resolve_params(given, key=lambda p: f"merge.params.{op}.{p}")
    return resolved, {p: resolved[p] for p in given if resolved[p] != operator.params[p]}


def run(cfg: RunConfig, out: Path, until: str | None = None, *, gpu: str | None = None,
        strict: bool = False) -> dict | None:
    """Run (or resume) the whole pipeline in run folder ``out``; the results dict, or None with ``until``.

    A branch that fails stops the run before the merge with :class:`merit.launch.base.BranchFailed`
    (the other branches still finish). With ``merge.allow_partial`` the run goes on with the branches
    present (renormalised weights, merge manifests marked partial) and raises BranchFailed at the end,
    so the command still exits non-zero.
    """
    failed: list = []
    threads = torch.get_num_threads()
    if cfg.launch.threads:
        torch.set_num_threads(cfg.launch.threads)
    try:
        results = _run(cfg, out, until, failed, gpu, strict)
    finally:
        torch.set_num_threads(threads)
    if failed:
        from merit.launch.base import BranchFailed

        raise BranchFailed(failed, partial=True)
    return results


def _run(cfg: RunConfig, out: Path, until: str | None, failed: list, gpu: str | None = None,
         strict: bool = False) -> dict | None:
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until: unknown stage {until!r}; stages: {', '.join(STAGES)}")
    check(cfg)
    out = Path(out)
    # Every check that needs only the config, the files, θ(0)'s headers or the tokenizer, before any work.
    reaches_eval = until is None or STAGES.index(until) >= STAGES.index("eval")
    sources = preflight(cfg, out, reaches_eval)
    extras = eval_extras(cfg, out, sources) if reaches_eval else None
    # What the run will cost and what is likely to go wrong, in its first lines (merit plan has the rest).
    from merit.plan.cli import strict_failure
    from merit.plan.summary import make_plan, render

    plan = make_plan(cfg, sources, gpu)
    for line in render(plan, short=True).splitlines():
        if line.startswith("warning: "):
            warn(line.removeprefix("warning: "))  # merit's usual "merit: warning:" line
        else:
            log(line)
    if strict and plan.warnings:
        raise strict_failure(plan.warnings)
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_text(out / "config.yaml", dump_config(cfg))

    def done(stage: str) -> bool:
        return until == stage

    with timed("theta0"):
        theta0, theta0_hash, theta0_key = stage_theta0(cfg, out)
    if done("theta0"):
        return None
    tokenizer = load_tokenizer(theta0)
    with timed("mixture"):
        mixture, mixture_key = stage_mixture(cfg, out, sources, tokenizer, theta0, theta0_key)
    if done("mixture"):
        return None
    with timed("grads"):
        grads_key = stage_grads(cfg, out, mixture, tokenizer, theta0, mixture_key)
    if done("grads"):
        return None
    with timed("split"):
        variants = stage_split(cfg, out, mixture, grads_key, mixture_key)
    if done("split"):
        return None
    with timed("branches"):
        branch_keys = stage_branches(cfg, out, variants, mixture, theta0, theta0_hash, failed)
    if done("branches"):
        return None
    checkpoints = {"base": (theta0, theta0_key)}
    with timed("merge"):
        checkpoints.update(stage_merge(cfg, variants, branch_keys))
    if done("merge"):
        return None
    if cfg.baselines.joint:
        with timed("joint"):
            joints = stage_joint(cfg, out, mixture, theta0, theta0_hash, theta0_key)
        # Table 2's order: base, the joint budgets, the soups, then the splits and their merges
        budgets = sorted((r for r in joints if not r.startswith("soup-")), key=lambda r: joint_epochs_of(cfg, r))
        checkpoints = {"base": checkpoints.pop("base"), **{r: joints[r] for r in budgets},
                       **{r: v for r, v in joints.items() if r.startswith("soup-")}, **checkpoints}
    if done("joint"):
        return None
    with timed("eval"):
        results = stage_eval(cfg, out, mixture, checkpoints, mixture_key, extras)
    if done("eval"):
        return results
    if cfg.diagnose.enabled:
        with timed("diagnose"):
            stage_diagnose(cfg, out, checkpoints)
    if done("diagnose"):
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
    done = artifacts.is_done(stage, key)
    if done:  # a preset converted into a cache folder: the manifest names it, and it must still be there
        named = Path(artifacts.read_manifest(stage).get("path", stage))
        if not (named / "config.json").is_file():
            notice(f"{stage / artifacts.MANIFEST}: names θ(0) at {named}, which is missing; preparing it again")
            done = False
    if not done:
        log(f"theta0: preparing preset {cfg.model.preset!r}")
        prepare = plugins.get("model-preset", cfg.model.preset)
        with artifacts.atomic_dir(stage) as tmp:
            info = prepare(tmp, cfg.prepare, cfg.seed)
            # A preset either builds θ(0) into the stage folder or points at a cached checkpoint.
            folder = Path(info["path"]) if "path" in info else tmp
            artifacts.write_manifest(tmp, key, hash=checkpoint_hash(folder), **info)
    else:
        log("theta0: done (cached)")
    manifest = artifacts.read_manifest(stage)
    return Path(manifest.get("path", stage)), manifest["hash"], key


READ_SETTINGS = ("format", "columns", "split", "eval_split", "filter", "max_rows", "image_root")


def mixture_settings(cfg: RunConfig) -> dict:
    """The mixture section as stage keys see it. Settings added for VLMs are left out at their defaults,
    so text-only run folders made before them keep their keys (and are not recomputed)."""
    settings = cfg.mixture.model_dump(exclude={"cache_dir", "num_proc"})  # where and how, never what
    if settings.get("token_count") == "all":
        del settings["token_count"]
    # Source formats came later: unset, they leave the key as it was.
    if settings.get("format") is None:
        settings.pop("format", None)
    for source in settings.get("sources") or []:
        for name in READ_SETTINGS:
            if source.get(name) is None:
                source.pop(name, None)
    if settings.get("builtin") and settings["builtin"].get("suite") == "text":
        del settings["builtin"]["suite"]
    if settings.get("builtin") and not settings["builtin"].get("exclude"):
        settings["builtin"].pop("exclude", None)
    return settings


def stage_mixture(cfg, out, sources, tokenizer, theta0, theta0_key) -> tuple[dict, str]:
    stage = out / "mixture"
    files = [(s.name, formats.content_sha256(s.train), formats.content_sha256(s.eval) if s.eval else None)
             for s in sources]
    key = artifacts.fingerprint("mixture", theta0_key, mixture_settings(cfg), files)
    manifest = artifacts.read_manifest(stage) if artifacts.is_done(stage, key) else None
    # A manifest from before the token cache (no tokens_dir) is rebuilt under the same key: same counts,
    # so nothing downstream is redone.
    if manifest is None or any("tokens_dir" not in e for e in manifest["sources"]):
        log(f"mixture: tokenizing {len(sources)} sources (once: later stages read the token cache)")
        manifest = mixture_stage.build(out, cfg.mixture, sources, tokenizer, key, tokenizer_path=theta0,
                                       trust_remote_code=cfg.model.trust_remote_code,
                                       hashes={name: sha for name, sha, _ in files})
    log(f"mixture: {len(manifest['sources'])} sources, {manifest['total_samples']} samples, "
        f"{manifest['total_tokens']} tokens")
    return manifest, key


def stage_grads(cfg, out, mixture, tokenizer, theta0, mixture_key) -> str:
    from merit.conflict import store
    from merit.conflict.compress import CompressionSpec
    from merit.conflict.estimate import default_device
    from merit.split.partition import validate_manual_groups

    stage = out / "grads"
    names = [e["name"] for e in mixture["sources"]]
    if cfg.split.method == "manual":
        validate_manual_groups(cfg.split.groups, names)  # a typo in split.groups fails before the gradients
    spec = CompressionSpec(cfg.grads.compression, cfg.grads.stride, cfg.grads.sketch_dim, cfg.seed)
    # Keyed per source (θ(0) and its tokenizer, the trainable subset, that source's data, the gradient and
    # compression settings, the seed), not per mixture: a rerun with more sources reuses every stored vector.
    theta0_manifest = artifacts.read_manifest(out / "theta0")
    common = artifacts.fingerprint(
        "grads-source/2", theta0_manifest["key"], theta0_manifest["hash"],
        artifacts.fingerprint(tokenizer.chat_template, tokenizer.get_vocab()),
        cfg.model.model_dump(exclude=set(HOW_ONLY["model"])),
        cfg.train.lora.model_dump() if cfg.train.lora else None, cfg.mixture.max_length,
        cfg.mixture.max_train_per_source, cfg.grads.calibration_size, cfg.grads.batch_size, spec.settings(), cfg.seed,
        *([cfg.grads.precision] if cfg.grads.precision != "fp32" else []))  # only when set: stores keep their keys
    keys = {e["name"]: artifacts.fingerprint(common, e["name"], e["train_sha256"]) for e in mixture["sources"]}
    key = artifacts.fingerprint("grads", [keys[n] for n in names])
    if artifacts.is_done(stage, key):
        log("grads: done (cached)")
        return key
    (stage / artifacts.MANIFEST).unlink(missing_ok=True)  # rewritten last, once every source is stored
    todo = store.pending(stage, keys)
    stats = {}
    if todo:
        jobs = gradient_jobs(cfg, stage, theta0, todo, keys, mixture, spec)
        log(f"grads: mean gradients of {len(todo)} of {len(names)} sources at θ(0) on {default_device()} "
            f"(≤{cfg.grads.calibration_size} examples each, compression {cfg.grads.compression}, "
            f"{cfg.grads.precision}{f', {len(jobs)} workers' if len(jobs) > 1 else ''})")
        started = time.time()
        if len(jobs) == 1:  # in this process, with its progress bar
            from merit.conflict.job import compute

            stats = compute(jobs[0])
        else:
            from merit.conflict.job import launch_config
            from merit.launch.base import BranchFailed, launch

            bad = launch(jobs, launch_config(cfg.launch, len(jobs)))
            if bad:
                raise BranchFailed(bad)
            for job in jobs:
                stats.update(artifacts.read_manifest(job.out)["computed"])
        grad_s = sum(s["gradient_s"] for s in stats.values())
        comp_s = sum(s["compress_s"] for s in stats.values())
        if stats and grad_s > 0:
            wall = time.time() - started
            log(f"grads: {sum(s['tokens'] for s in stats.values()) / grad_s:.0f} calibration tokens/s per worker, "
                f"{sum(s['tokens'] for s in stats.values()) / wall:.0f} in all; "
                f"compression took {comp_s / (grad_s + comp_s):.1%} of the time")
    else:
        log(f"grads: all {len(names)} sources' gradients are stored; updating the conflict matrix")
    store.write_store_manifest(stage, key, names, keys, spec.settings(), computed=stats)
    return key


def gradient_jobs(cfg, stage: Path, theta0: Path, todo: list[str], keys: dict[str, str], mixture: dict, spec):
    """The sources still to compute, dealt over ``grads.workers`` jobs (one job: computed in this process)."""
    from merit.conflict.job import GradJob, share

    mixture = {**mixture, "sources": [{**e, "train": str(Path(e["train"]).absolute())} for e in mixture["sources"]]}
    shares = share(todo, cfg.grads.workers)
    return [GradJob(name=f"gradients {i + 1}/{len(shares)}", out=(stage / ".workers" / str(i)).absolute(),
                    store=stage.absolute(), theta0=Path(theta0).absolute(), sources=part,
                    keys={n: keys[n] for n in part}, mixture=mixture, mixture_cfg=cfg.mixture, model_cfg=cfg.model,
                    lora_cfg=cfg.train.lora, grads_cfg=cfg.grads, spec=spec, seed=cfg.seed,
                    key=artifacts.fingerprint("grad-job", [keys[n] for n in part]))
            for i, part in enumerate(shares)]


def main_row(cfg: RunConfig) -> str:
    """The results.json row of the main split's first merge: merit-r<r> for the paper's method."""
    if cfg.split.method == "manual":
        name = f"manual-k{len(cfg.split.groups)}"
    else:
        name = f"merit-r{cfg.split.r}" if cfg.split.method == "pca-median" else f"{cfg.split.method}-k{cfg.groups}"
    return name + ("-residual" if cfg.split.conflict == "residual" else "")


def stage_split(cfg, out, mixture, grads_key, mixture_key) -> list[Variant]:
    from merit.conflict.store import load_conflict
    from merit.report.plots import conflict_heatmap, pca_scatter
    from merit.split.pca import pca_scores
    from merit.split.proxy import merge_gain_proxy, proxy_share

    k = cfg.groups
    variants = [Variant(main_row(cfg), cfg.split.method, out, list(cfg.merge.operators), cfg.split.r)]
    if cfg.baselines.random:
        for kr in cfg.baselines.random_k or [k]:
            if cfg.split.method == "random" and kr == k:
                continue  # the main split is this baseline already
            variants.append(Variant(f"random-k{kr}", "random", out / "baselines" / f"random-k{kr}",
                                    [cfg.merge.operators[0]], kr.bit_length() - 1))

    names, conflict = load_conflict(out / "grads")  # C as the grads stage cached it (incrementally)
    entry = {e["name"]: e for e in mixture["sources"]}
    samples = np.array([entry[n]["samples"] for n in names])
    tokens = np.array([entry[n]["tokens"] for n in names])
    # the stored vectors' norms: with C they give the raw Gram matrix G Gᵀ (split.method pca-median-raw)
    stored = {e["name"]: e.get("norm", float("nan")) for e in artifacts.read_manifest(out / "grads")["sources"]}
    norms = np.array([stored[n] for n in names], dtype=np.float64)
    gram = np.outer(norms, norms) * conflict
    if cfg.split.conflict == "residual":
        from merit.conflict.cosine import cosine_from_gram, residual_gram

        if not np.all(np.isfinite(gram)):
            raise ConfigError("split.conflict=residual needs the stored gradient norms (grads/manifest.json); "
                              "rerun the grads stage")
        gram = residual_gram(gram, samples)
        conflict = cosine_from_gram(gram)
    scores, explained = pca_scores(conflict, max(cfg.split.r, 2))
    for v in variants:
        stage = v.root / "split"
        manual = [cfg.split.groups] if v.method == "manual" else []
        # The token budgets decide the merge weights; only mixture.token_count changes them without
        # changing the gradients' key (added only when set, so earlier run folders keep their keys).
        budget = [cfg.mixture.token_count] if cfg.mixture.token_count != "all" else []
        rule = [cfg.split.greedy_rule] if v.method == "conflict-greedy" else []
        # the residual conflicts change the main split only (a random baseline ignores C)
        residual = ["residual"] if cfg.split.conflict == "residual" and v.root == out else []
        v.key = artifacts.fingerprint("split", v.method, grads_key, v.r, cfg.seed, *manual, *budget, *rule,
                                      *residual)
        if not artifacts.is_done(stage, v.key):
            artifacts.reset_stage(stage)
            method = plugins.get("split", v.method, field="split.method")
            groups = method(SplitInputs(conflict, samples, tokens, v.r, cfg.seed, names, cfg.split.groups,
                                        gram=gram, greedy_rule=cfg.split.greedy_rule))
            plan = {
                "method": v.method,
                "r": v.r,
                "sources": names,
                "groups": [[names[i] for i in g] for g in groups],
                "samples": [int(samples[g].sum()) for g in groups],
                "tokens": [int(tokens[g].sum()) for g in groups],
                "weights": token_weights(tokens, groups),
                # merge-gain proxy Σ_k w_k‖ḡ_k − ḡ‖² of unit gradients (merit.split.proxy) and its share
                "proxy": merge_gain_proxy(conflict, groups, tokens),
                "proxy_share": proxy_share(conflict, groups, tokens),
            }
            artifacts.write_json(stage / "conflict.json", {"sources": names, "matrix": conflict.tolist()})
            artifacts.write_json(stage / "pca.json", {"sources": names, "scores": scores.tolist(),
                                                      "explained_variance_ratio": explained.tolist()})
            artifacts.write_json(stage / "plan.json", plan)
            conflict_heatmap(conflict, names, plan["groups"], stage / "conflict.png")
            pca_scatter(scores, names, plan["groups"], stage / "pca.png")
            artifacts.write_manifest(stage, v.key, groups=len(groups))
        v.plan = artifacts.read_json(stage / "plan.json")
        proxy = "" if "proxy" not in v.plan else \
            f", proxy {v.plan['proxy']:.4g} ({v.plan['proxy_share']:.0%} of dispersion)"
        log(f"split: {v.name}: groups of {v.plan['samples']} samples, weights "
            f"{[round(w, 3) for w in v.plan['weights']]}{proxy}")
    return variants


def branch_job(cfg, out_dir, name, sources, mixture, theta0, theta0_hash, key, run_dir: Path | None = None,
               train_cfg=None, seed: int | None = None):
    """A self-contained job for any launcher: absolute paths (a Ray or Slurm worker has another working
    folder), the plan group's sources, the config sections that decide the result."""
    from merit.train.branch import BranchJob
    from merit.train.options import Tracking

    tracking = None
    if cfg.train.report_to and run_dir is not None:
        rel = Path(out_dir).absolute().relative_to(Path(run_dir).absolute())
        tracking = Tracking(tuple(cfg.train.report_to), Path(run_dir).absolute() / "logs" / rel,
                            f"{Path(run_dir).name}/{'-'.join(rel.parts)}", Path(run_dir).name)

    mixture = {**mixture, "sources": [{**e, "train": str(Path(e["train"]).absolute()),
                                       "eval": str(Path(e["eval"]).absolute()) if e.get("eval") else None}
                                      for e in mixture["sources"]]}
    return BranchJob(name=name, out=Path(out_dir).absolute(), theta0=Path(theta0).absolute(),
                     theta0_hash=theta0_hash, sources=tuple(sources), mixture=mixture, mixture_cfg=cfg.mixture,
                     train_cfg=train_cfg or cfg.train, model_cfg=cfg.model, seed=cfg.seed if seed is None else seed,
                     key=key,
                     save_steps=cfg.launch.save_steps, tracking=tracking)


# Settings that change how a branch is computed, never what: a change does not retrain a finished branch.
HOW_ONLY = {"train": ("gradient_checkpointing", "dataloader_num_workers", "fsdp", "deepspeed", "report_to"),
            "model": ("attn_implementation",)}
# Settings added after run folders existed: in a key only when not at their default, so those folders
# keep their keys (train.precision by its resolved value: fp32 is what a float32 θ(0) always trained in).
ADDED = {"train": ("precision", "save_dtype", "optim", "group_by_length", "packing"), "model": ()}


def training_identity(cfg) -> tuple[dict, dict]:
    """(train settings, model settings) that decide a branch's (or the joint run's) weights."""
    from merit.train.options import resolve_precision

    train = cfg.train.model_dump(exclude=set(HOW_ONLY["train"]) | set(ADDED["train"]))
    defaults = type(cfg.train)()
    train.update({f: getattr(cfg.train, f) for f in ADDED["train"]
                  if f != "precision" and getattr(cfg.train, f) != getattr(defaults, f)})
    precision = resolve_precision(cfg.train, cfg.model)
    if precision != "fp32":
        train["precision"] = precision
    if cfg.launch.processes_per_branch != 1:  # sets the global batch, hence the weights
        train["processes_per_branch"] = cfg.launch.processes_per_branch
    return train, cfg.model.model_dump(exclude=set(HOW_ONLY["model"]))


def branch_key(cfg, split_key: str, k: int, theta0_hash: str) -> str:
    """Identity of branch ``k`` of a plan: what decides its weights (never where or how it runs)."""
    return artifacts.fingerprint("branch", split_key, k, theta0_hash, *training_identity(cfg))


def joint_key(cfg, theta0_key: str, mixture: dict, epochs: float | None = None, seed: int | None = None) -> str:
    """Identity of a full-data run: the joint baseline, or one at another budget (``epochs``) or data
    order (``seed``: a soup member); at the config's own epochs and seed it is the joint key."""
    train, model = training_identity(cfg)
    if epochs is not None:
        train["epochs"] = epochs
    return artifacts.fingerprint("joint", theta0_key, mixture["key"], train, model, cfg.seed if seed is None else seed)


@dataclass(frozen=True)
class FullRun:
    """One run over the whole mixture: the joint baseline, a joint budget of Table 2, or a soup member."""

    row: str | None  # its results row (None: a soup member, scored only inside its soup)
    folder: str  # relative to the run folder
    epochs: float
    seed: int


def joint_epochs_of(cfg, row: str) -> float:
    return cfg.baselines.epochs_rows(cfg.train.epochs)[row]


def joint_runs(cfg) -> list[FullRun]:
    """``joint`` at ``train.epochs``, ``joint-{e}ep`` per ``baselines.joint_epochs``, and the soup members
    beyond the joint run (member i: seed + i, a different data order)."""
    runs = [FullRun(row, "joint" if row == "joint" else f"baselines/{row}", e, cfg.seed)
            for row, e in cfg.baselines.epochs_rows(cfg.train.epochs).items()]
    runs += [FullRun(None, f"baselines/soups/{i}", cfg.train.epochs, cfg.seed + i)
             for i in range(1, max(cfg.baselines.soups or [1]))]
    return runs


def stage_branches(cfg, out, variants, mixture, theta0, theta0_hash,
                   failed: list | None = None) -> dict[str, list[str | None]]:
    """Train every missing branch with the configured launcher; branch keys per variant (None: missing).

    Failed branches are reported while the others finish; then BranchFailed is raised, unless
    ``merge.allow_partial``, which appends them to ``failed`` and lets the merge go on without them.
    """
    from merit.launch.base import BranchFailed, check_branches, launch

    jobs, keys = [], {}
    for v in variants:
        keys[v.name] = []
        for k, group in enumerate(v.plan["groups"]):
            key = branch_key(cfg, v.key, k, theta0_hash)
            keys[v.name].append(key)
            folder = v.root / "branches" / str(k)
            if artifacts.is_done(folder, key):
                continue
            jobs.append(branch_job(cfg, folder, f"{v.name} branch {k + 1}/{len(v.plan['groups'])}", group,
                                   mixture, theta0, theta0_hash, key, run_dir=out))
    bad = []
    if jobs:
        workers = f", {cfg.launch.workers} at once" if cfg.launch.workers else ""
        log(f"branches: training {len(jobs)} branch(es) with launcher {cfg.launch.kind!r}{workers}; "
            f"logs in branches/<k>.log, progress: merit status {out}")
        bad = launch(jobs, cfg.launch)
    else:
        log("branches: done (cached)")
    # Whatever trained them (here, another machine, a copy), the branches must match this run's plan.
    for v in variants:
        present = [k for k, key in enumerate(keys[v.name])
                   if artifacts.is_done(v.root / "branches" / str(k), key)]
        check_branches([v.root / "branches" / str(k) for k in present], [v.plan["groups"][k] for k in present],
                       theta0_hash, mixture)
        keys[v.name] = [key if k in present else None for k, key in enumerate(keys[v.name])]
    if bad:
        if not cfg.merge.allow_partial or failed is None:
            raise BranchFailed(bad)
        log(f"branches: {len(bad)} failed; merging the others (merge.allow_partial)")
        failed.extend(bad)
    return keys


def stage_merge(cfg, variants, branch_keys) -> dict[str, tuple[Path, str]]:
    from merit.merge.checkpoint import merge_checkpoints

    merged = {}
    for v in variants:
        # Missing branches (None keys) only reach here with merge.allow_partial: merge the others with
        # their token weights renormalised to sum to 1, and mark the result partial.
        present = [k for k, key in enumerate(branch_keys[v.name]) if key is not None]
        missing = [k for k, key in enumerate(branch_keys[v.name]) if key is None]
        if not present:
            raise ConfigError(f"merge: {v.name}: no branch finished; nothing to merge")
        folders = [v.root / "branches" / str(k) for k in present]
        weights = v.plan["weights"]
        if missing:
            weights = [weights[k] / sum(weights[j] for j in present) for k in present]
        for op in v.operators:
            target = v.root / "merged" / op
            dtype = [cfg.merge.dtype] if cfg.merge.dtype else []  # only when set: earlier merges keep their keys
            params, changed = merge_params(cfg, op)
            # Likewise only parameters set away from their defaults enter the key: run folders made
            # before merge.params existed, or with the default written out, still resume.
            key = artifacts.fingerprint("merge", op, branch_keys[v.name], weights, *dtype,
                                        *([{"params": changed}] if changed else []))
            if not artifacts.is_done(target, key):
                log(f"merge: {v.row(op)} ({op} over {len(folders)} branches)")
                operator = plugins.get("merge", op)
                # Task-vector operators (task-arithmetic, ties, dare) need θ(0): the branch manifests name it.
                base = Path(artifacts.read_manifest(folders[0])["theta0"]) if operator.needs_base else None
                if cfg.train.lora is not None:  # adapters: merge the branches' dense B·A updates onto θ(0)
                    from merit.merge.lora import merge_lora

                    theta0 = Path(artifacts.read_manifest(folders[0])["theta0"])
                    info = merge_lora(theta0, folders, weights, operator, target, dtype=cfg.merge.dtype,
                                      params=params)
                elif len(folders) == 1 and not cfg.merge.dtype:  # a partial merge left with one branch is that branch
                    import shutil

                    with artifacts.atomic_dir(target) as tmp:
                        shutil.copytree(folders[0], tmp, dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns(artifacts.MANIFEST))
                    info = {"copied_from": str(folders[0])}
                else:
                    info = merge_checkpoints(folders, weights, operator, target, base=base, params=params,
                                             dtype=cfg.merge.dtype)
                artifacts.write_manifest(target, key, operator=op, params=params, branches=[str(f) for f in folders],
                                         weights=weights, partial=bool(missing), missing=missing, **info)
            merged[v.row(op)] = (target, key)
    return merged


def stage_joint(cfg, out, mixture, theta0, theta0_hash, theta0_key) -> dict[str, tuple[Path, str]]:
    """The full-data runs (joint, joint budgets, soup members), launched like branches (logs: joint.log,
    baselines/<row>.log); then the uniform soups. Results rows → (folder, key)."""
    from merit.launch.base import BranchFailed, launch

    names = [e["name"] for e in mixture["sources"]]
    runs, jobs = joint_runs(cfg), []
    keys = {r.folder: joint_key(cfg, theta0_key, mixture, r.epochs, r.seed) for r in runs}
    for r in runs:
        folder = out / r.folder
        if not artifacts.is_done(folder, keys[r.folder]):
            train = cfg.train if r.epochs == cfg.train.epochs else cfg.train.model_copy(update={"epochs": r.epochs})
            jobs.append(branch_job(cfg, folder, r.row or f"soup member {r.folder.rsplit('/', 1)[-1]}", names, mixture,
                                   theta0, theta0_hash, keys[r.folder], run_dir=out, train_cfg=train, seed=r.seed))
    if jobs:
        log(f"joint: training {len(jobs)} run(s) on the whole mixture ({', '.join(j.name for j in jobs)}) with "
            f"launcher {cfg.launch.kind!r}")
        bad = launch(jobs, cfg.launch)
        if bad:
            raise BranchFailed(bad)
    rows = {r.row: (out / r.folder, keys[r.folder]) for r in runs if r.row}
    members = [out / "joint"] + [out / r.folder for r in runs if r.row is None]
    member_keys = [keys["joint"]] + [keys[r.folder] for r in runs if r.row is None]
    for n in cfg.baselines.soups or []:
        rows[f"soup-{n}"] = stage_soup(out / "baselines" / f"soup-{n}", members[:n], member_keys[:n], cfg)
    return rows


def stage_soup(target: Path, members: list[Path], member_keys: list[str], cfg) -> tuple[Path, str]:
    """A uniform soup (Wortsman et al. 2022) of full-data runs that differ only in data order."""
    from merit.merge.checkpoint import merge_checkpoints

    dtype = [cfg.merge.dtype] if cfg.merge.dtype else []
    key = artifacts.fingerprint("soup", member_keys, *dtype)
    if not artifacts.is_done(target, key):
        log(f"joint: {target.name} (uniform average of {len(members)} full-data runs)")
        info = merge_checkpoints(members, [1.0 / len(members)] * len(members), plugins.get("merge", "uniform"),
                                 target, dtype=cfg.merge.dtype)
        artifacts.write_manifest(target, key, operator="uniform", branches=[str(m) for m in members],
                                 weights=[1.0 / len(members)] * len(members), **info)
    return target, key


def stage_eval(cfg, out, mixture, checkpoints: dict[str, tuple[Path, str]], mixture_key,
               extras: EvalExtras | None = None) -> dict:
    """Score every checkpoint on the in-mixture held-out lines, the transfer sets and the configured
    harness tasks; each part cached per checkpoint in ``eval/<name>[.<part>].json`` under its own key
    (a new transfer set or harness task scores only that, and never retrains anything)."""
    from merit.evaluate import harness
    from merit.evaluate.results import summarize
    from merit.evaluate.runner import (evaluate_model, load_eval_model, resolve_batch_size, resolve_device,
                                       resolve_dtype)

    extras = extras or EvalExtras()
    sources, not_evaluated = eval_examples(cfg, mixture)
    transfer_cap = (cfg.eval.transfer.max_per_source or cfg.eval.max_per_source) if cfg.eval.transfer else None
    transfer = {t.name: formats.read_examples(t.reader(), transfer_cap) for t in extras.transfer}
    device = resolve_device(cfg.eval.device)
    dtype = resolve_dtype(cfg.eval.dtype, cfg.model.dtype, device)
    batch_size, adaptive = resolve_batch_size(cfg.eval.batch_size, device)
    settings = eval_settings(cfg, batch_size)
    # What decides the scores (never where or in what batch size they are computed).
    identity = [cfg.eval.model_dump(include={"max_per_source", "max_new_tokens", "normalize", "length_normalized"}),
                dtype]
    parts = {"": artifacts.fingerprint("eval/2", mixture_key, identity)}
    if transfer:
        parts["transfer"] = artifacts.fingerprint("eval-transfer", identity, transfer_cap,
                                                  {t.name: formats.content_sha256(t.spec.path) for t in extras.transfer})
    if cfg.eval.lm_eval:
        parts["lm_eval"] = artifacts.fingerprint("lm-eval", cfg.eval.lm_eval.model_dump(exclude={"batch_size"}), dtype)
    if cfg.eval.lmms_eval:
        parts["lmms_eval"] = artifacts.fingerprint("lmms-eval", cfg.eval.lmms_eval.model_dump(exclude={"batch_size"}))
    tokenizer = None
    found: dict[str, dict[str, dict]] = {part: {} for part in parts}
    for name, (folder, ckpt_key) in checkpoints.items():
        model = None
        for part, part_key in parts.items():
            path = out / "eval" / (f"{name}.{part}.json" if part else f"{name}.json")
            key = artifacts.fingerprint(part_key, ckpt_key)
            if path.exists() and artifacts.read_json(path).get("key") == key:
                found[part][name] = artifacts.read_json(path)["result"]
                continue
            if part == "lmms_eval":  # lmms-eval loads the checkpoint itself, through its own model class
                log(f"eval: {name}: lmms-eval {', '.join(cfg.eval.lmms_eval.tasks)}")
                result = harness.run_lmms_eval(cfg.eval.lmms_eval, folder, str(device), cfg.seed)
            else:
                if model is None:
                    tokenizer = tokenizer or load_tokenizer(folder)
                    model = load_eval_model(folder, dtype, device, trust_remote_code=cfg.model.trust_remote_code)
                torch.manual_seed(cfg.seed)
                if part == "lm_eval":
                    log(f"eval: {name}: lm-eval {', '.join(cfg.eval.lm_eval.tasks)}")
                    result = harness.run_lm_eval(model, tokenizer, cfg.eval.lm_eval, extras.lm_eval_tasks,
                                                 str(device), cfg.seed)
                else:
                    scored = transfer if part == "transfer" else sources
                    result = evaluate_model(model, tokenizer, scored, settings, desc=f"eval {name} {part}".rstrip(),
                                            adaptive_batch=adaptive)
                    settings = eval_settings(cfg, result["batch_size"])  # what fitted, for the next one
            artifacts.write_json(path, {"key": key, "checkpoint": str(folder), "result": result})
            found[part][name] = result
        del model
    rows = summarize(found[""], replicates=cfg.eval.bootstrap, seed=cfg.seed)
    if transfer:
        for name, row in summarize(found["transfer"], replicates=cfg.eval.bootstrap, seed=cfg.seed).items():
            rows[name]["transfer"] = row
    for part in ("lm_eval", "lmms_eval"):
        for name, result in found.get(part, {}).items():
            rows[name][part] = result
    results = {"methods": rows}
    if not_evaluated:  # no eval split (warned before any work): left out of every average, and said so
        results["not_evaluated"] = not_evaluated
    artifacts.write_json(out / "results.json", results)
    return results


def eval_examples(cfg: RunConfig, mixture: dict, side: str = "eval",
                  cap: int | None = None) -> tuple[dict[str, list[dict]], list[str]]:
    """The examples the eval stage scores, per source (``eval.max_per_source`` and
    ``mixture.max_eval_per_source``, the first ones of each file), and the sources without an eval split.

    ``merit diagnose`` reads the same examples so that its losses are results.json's; with ``side="train"``
    it reads the same number of the first training examples (a fixed sample for the train/held-out gap).
    ``cap`` lowers the per-source limit further.
    """
    not_evaluated = [e["name"] for e in mixture["sources"] if not e["eval"]]
    sources = {}
    for e in mixture["sources"]:
        if e["eval"]:
            limits = [x for x in (cfg.eval.max_per_source, cfg.mixture.max_eval_per_source, cap) if x]
            sources[e["name"]] = formats.read_examples(mixture_stage.entry_reader(e, side),
                                                       min(limits) if limits else None)
    if not sources:
        raise ConfigError("eval: no source has an eval split; give eval files (mixture.sources[].eval or DIR/eval/)")
    return sources, not_evaluated


@dataclass
class EvalExtras:
    """What the pre-work checks resolved for the evaluation: the transfer sources and lm-eval's task manager."""

    transfer: list = field(default_factory=list)
    lm_eval_tasks: object = None


def eval_extras(cfg: RunConfig, out: Path, sources) -> EvalExtras:
    """Resolve and check everything the evaluation will need beyond the mixture, before any work: a typo
    here fails in seconds, not after the branches trained (and fixing it retrains nothing)."""
    from merit.evaluate import harness
    from merit.evaluate.transfer import transfer_sources

    extras = EvalExtras(transfer=transfer_sources(cfg, out, sources))
    if cfg.eval.lm_eval is not None:
        extras.lm_eval_tasks = harness.lm_eval_task_manager(cfg.eval.lm_eval)
    if cfg.eval.lmms_eval is not None:
        harness.check_lmms_eval(cfg.eval.lmms_eval)
    return extras


def eval_settings(cfg: RunConfig, batch_size: int = 64):
    from merit.evaluate.runner import EvalSettings

    return EvalSettings(max_length=cfg.mixture.max_length, batch_size=batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, normalize=cfg.eval.normalize,
                        length_normalized=cfg.eval.length_normalized)


def stage_diagnose(cfg: RunConfig, out: Path, checkpoints: dict[str, tuple[Path, str]]) -> None:
    """merit diagnose on this run folder (diagnose/), redone only when a checkpoint or a setting changed."""
    from merit.diagnose.cli import Settings, diagnose, settings_key, summary, write_outputs
    from merit.diagnose.inputs import Memo, inspect_run
    from merit.diagnose.landscape import alpha_grid

    d = cfg.diagnose
    settings = Settings(alpha_grid(d.alphas), d.max_per_source, d.calibration_size, list(d.sigmas), d.draws,
                        None, d.antithetic, None, d.curvature, d.curvature_epsilon)
    # What diagnose reads: θ(0), joint, the main split's token-weighted merge and the random splits (not
    # the other joint budgets, soups or operators: adding one of those does not redo the diagnosis).
    read = {"base", "joint", main_row(cfg)}
    key = artifacts.fingerprint("diagnose/1", {row: k for row, (_, k) in checkpoints.items()
                                               if row in read or row.startswith("random-k")}, settings_key(settings))
    target = out / "diagnose"
    if (target / "diagnose.json").exists() and artifacts.read_json(target / "diagnose.json").get("key") == key:
        log("diagnose: up to date")
        return
    # Each number is kept as it is computed, so a stopped diagnosis (hours at the paper's scale) resumes.
    memo = Memo(out / ".diagnose-memo.json", key)
    report, curves, perturbation = diagnose(inspect_run(out), settings, memo)
    report["key"] = key
    write_outputs(target, report, curves, perturbation)
    memo.discard()
    for line in summary(report).splitlines():
        log(line.strip())


def stage_report(out: Path, results: dict, variants: list[Variant]) -> None:
    """report.md and report.html: the tables, the groups, and every plot of the run folder."""
    from merit.report.document import Heading, Paragraph, Picture, to_html, to_markdown
    from merit.report.plots import conflict_heatmap, pca_scatter, per_source_bars
    from merit.report.table import comparison, diagnose_checks, harness, per_source

    main = variants[0]
    split_dir = main.root / "split"
    conflict = artifacts.read_json(split_dir / "conflict.json")
    pca = artifacts.read_json(split_dir / "pca.json")
    conflict_heatmap(np.array(conflict["matrix"]), conflict["sources"], main.plan["groups"], split_dir / "conflict.png")
    pca_scatter(np.array(pca["scores"]), pca["sources"], main.plan["groups"], split_dir / "pca.png")
    methods = results["methods"]
    per_source_bars({n: r["per_source"] for n, r in methods.items()}, "in-mixture held-out score per source",
                    out / "eval" / "per_source.png")
    # The paper's table shapes: methods at equal budget (Table 2), then merge operators on the same
    # branches (Table 12) when there are several.
    operator_rows = [main.row(op) for op in main.operators if op != "token-weighted"]
    methods_rows = [n for n in methods if n not in operator_rows]
    blocks = [Heading(f"merit run: {out.name}", 1),
              comparison(results, methods_rows, title="Methods at equal budget (the paper's Table 2)")]
    if operator_rows:
        blocks.append(comparison(results, [main.name] + operator_rows,
                                 title="Merge operators on the same branches (the paper's Table 12)"))
    for part in ("lm_eval", "lmms_eval"):
        table = harness(results, part)
        if table is not None:
            blocks.append(table)
    blocks.append(Heading("Groups"))
    for v in variants:
        lines = [f"{v.name} ({v.method}, token weights {[round(w, 3) for w in v.plan['weights']]}):"]
        lines += [f"group {k}: {', '.join(g)}" for k, g in enumerate(v.plan["groups"])]
        blocks.append(Paragraph("\n".join(f"- {x}" if i else x for i, x in enumerate(lines))))
    blocks += [Picture(Path("split/conflict.png"), "conflict matrix, ordered by group"),
               Picture(Path("split/pca.png"), "PCA of the conflict matrix")]
    blocks += [Heading("Per source"), per_source(results), Picture(Path("eval/per_source.png"), "in-mixture score per source")]
    if any("transfer" in r for r in methods.values()):
        per_source_bars({n: r["transfer"]["per_source"] for n, r in methods.items() if "transfer" in r},
                        "transfer score per source", out / "eval" / "transfer.png")
        blocks += [per_source(results, "transfer"), Picture(Path("eval/transfer.png"), "transfer score per source")]
    diagnostics = sorted((out / "diagnose").glob("*.png")) if (out / "diagnose").is_dir() else []
    if diagnostics:  # merit diagnose's plots (LMC curves, perturbation), when it ran on this folder
        blocks.append(Heading("Diagnostics"))
        if (out / "diagnose" / "diagnose.json").exists():
            blocks.append(diagnose_checks(artifacts.read_json(out / "diagnose" / "diagnose.json")))
        blocks += [Picture(p.relative_to(out), p.stem.replace("_", " ")) for p in diagnostics]
    artifacts.write_text(out / "report.md", to_markdown(blocks))
    artifacts.write_text(out / "report.html", to_html(blocks, out, f"merit run: {out.name}"))
