"""Every check that can run before work, run before work.

What needs only the config, the files' bytes, the checkpoint's headers or the tokenizer is checked here,
in seconds, before θ(0) is warmed up, a gradient is taken or a branch is trained: the output folder,
every line of every data file (schema, encoding, images), ``split.groups`` against the sources, the eval
splits the evaluation will need, θ(0)'s config and weight headers, the trainable subset (against the
parameter names of θ(0)'s architecture built on the meta device), and, for a preset whose θ(0) is not
built yet, truncation with the tokenizer the preset will have. What fails here never leaves a stage
half-written: the run folder is not even created (except the built-in mixture's generated data files).
"""

from __future__ import annotations

from pathlib import Path

from merit import artifacts
from merit.config import RunConfig
from merit.data import mixture as mixture_stage
from merit.errors import ConfigError, DataError, MeritError, warn


def preflight(cfg: RunConfig, out: Path, reaches_eval: bool) -> list[mixture_stage.Source]:
    """Run every pre-work check of ``merit run`` and return the mixture's sources.

    Args:
        cfg: the validated run config.
        out: the run folder (checked, not created).
        reaches_eval: whether this invocation will evaluate (no ``--until`` before ``eval``): only then
            are missing eval splits a problem.
    """
    artifacts.check_output_dir(out)
    sources = mixture_stage.resolve_sources(cfg.mixture, out, cfg.seed)
    if len(sources) < cfg.groups:
        raise ConfigError(f"split.r={cfg.split.r} needs at least {cfg.groups} sources; the mixture has {len(sources)}")
    for i, k in enumerate(cfg.baselines.random_k or []):
        if len(sources) < k:
            raise ConfigError(f"baselines.random_k[{i}]: K = {k} random groups need at least {k} sources; the "
                              f"mixture has {len(sources)}")
    names = [s.name for s in sources]
    if cfg.split.method == "manual":
        from merit.split.partition import validate_manual_groups

        validate_manual_groups(cfg.split.groups, names)
    parts_at = None  # the first example with images or content parts, for the text-only check
    for s in sources:  # every line validated, streamed (memory does not grow with the mixture)
        found = mixture_stage.check_source(s, cfg.mixture)
        parts_at = parts_at or found
    is_vlm = check_model(cfg, out, sources, parts_at)
    if cfg.diagnose.enabled and (is_vlm or parts_at is not None):
        raise ConfigError("diagnose.enabled: a vision-language run's eval loss is conditioned on images, and "
                          "merit diagnose measures text-only runs for now; set diagnose.enabled: false")
    from merit.train import options

    # What this machine cannot train (fp16 without CUDA, a kernel not installed, packing a VLM), and
    # processes per branch against the GPUs each branch is given.
    options.check_train_options(cfg.train, cfg.model, is_vlm=bool(is_vlm) or parts_at is not None)
    options.check_report_to(cfg.train.report_to)
    from merit.launch.base import check_processes

    check_processes(cfg.launch)
    cache = cfg.mixture.cache_dir
    if cache is not None and Path(cache).expanduser().exists() and not Path(cache).expanduser().is_dir():
        raise ConfigError(f"mixture.cache_dir: {cache} is a file; give a folder (created if missing) for the token cache")
    if cfg.grads.precision == "tf32" and cfg.launch.kind == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("grads.precision: tf32 needs a CUDA GPU (Ampere or newer); use fp32 or bf16")
    options.explain_precision(cfg.train, cfg.model)
    if reaches_eval:
        check_eval_splits(sources)
    return sources


def check_eval_splits(sources) -> None:
    """No eval split at all is an error (the evaluation would have nothing to score, after hours of work);
    some sources without one is allowed with a warning: they are left out of the averages and listed as
    ``not_evaluated`` in results.json and under the table."""
    missing = [s.name for s in sources if s.eval is None]
    if len(missing) == len(sources):
        raise ConfigError("eval: no source has an eval split; give eval files (mixture.dir/eval/<source>.jsonl "
                          "or mixture.sources[].eval), or stop before evaluation with --until joint")
    if missing:
        warn(f"{len(missing)} source(s) have no eval split and are left out of evaluation: {', '.join(missing)} "
             "(listed as not_evaluated in results.json)")


def check_model(cfg: RunConfig, out: Path, sources, parts_at: str | None) -> bool | None:
    """θ(0) as far as it can be checked without loading weights: its files and headers, text-only vs
    image data, the trainable subset, and (for an unbuilt preset) truncation. Returns whether θ(0) is a
    vision-language model (None: a preset that cannot be probed before it is built)."""
    import torch

    from merit.models import loading, vlm

    loading.compile_patterns(cfg.model.trainable or [], "model.trainable")
    loading.compile_patterns(cfg.model.frozen, "model.frozen")
    folder = Path(cfg.model.path) if cfg.model.path is not None else _built_preset(out)
    tokenizer = None
    if folder is not None:
        check_weights(loading.check_checkpoint(folder, cfg.model.allow_pickle))
        is_vlm = vlm.is_vlm(folder)
        model = loading.meta_model(folder, cfg.model.trust_remote_code)
    else:
        from merit.models.presets import probe

        with torch.random.fork_rng(devices=[]):  # building the probe seeds torch; leave the run's RNG alone
            probed = probe(cfg.model.preset, cfg.prepare, cfg.seed)
        if probed is None:
            return None
        tokenizer, model = probed
        is_vlm = vlm.model_family(model) is not None
    if parts_at is not None and not is_vlm:
        raise DataError(f"{parts_at}: has images or content parts, but θ(0) is a text-only model; use a "
                        "vision-language checkpoint")
    loading.check_trainable(model, cfg.model, cfg.train.lora)
    del model
    if tokenizer is not None:  # a preset not built yet: the mixture stage's truncation check, now
        for s in sources:
            if not mixture_stage.any_trainable(s, cfg.mixture, tokenizer):
                raise DataError(mixture_stage.all_truncated_message(s.train))
    return is_vlm


def _built_preset(out: Path) -> Path | None:
    """θ(0) of a preset when this run folder already holds it (then it is checked like any checkpoint)."""
    m = artifacts.read_manifest(out / "theta0")
    if m is None:
        return None
    folder = Path(m.get("path", out / "theta0"))
    return folder if (folder / "config.json").is_file() else None


def check_weights(folder: Path) -> None:
    """Every safetensors header of a checkpoint readable and every tensor inside its file (a truncated or
    foreign file is refused here, not at load time after tokenizing)."""
    from merit.merge.safetensors_io import checkpoint_tensors

    if not any(folder.glob("*.safetensors")):
        return  # pickled weights, allowed by model.allow_pickle: torch reads them at load time
    try:
        checkpoint_tensors(folder)
    except MeritError:
        raise
    except (OSError, ValueError) as e:
        raise MeritError(f"{folder}: weight files cannot be read ({e}); re-save or re-copy the checkpoint") from None
