"""``merit plan``: what a config will run, how long, how much memory and disk, and what is likely to go
wrong — in seconds, before any training, with no model weights loaded (θ(0)'s architecture is built on
the meta device from its config).

Counts come from the data: every source's examples are counted and up to ``SAMPLE`` of them (``SAMPLE_VLM``
for a vision-language θ(0)) tokenized with θ(0)'s tokenizer (token budgets are extrapolated from that
sample, marked ≈). Times and memory are
the estimates of ``merit.plan.estimate``, for the hardware given with ``--gpu`` (or this machine).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from merit.config import RunConfig
from merit.plan import estimate as est

SAMPLE = 200  # examples tokenized per source for its token budget
SAMPLE_VLM = 16  # a VLM example decodes and preprocesses its images (~30 ms each): fewer
PAPER_GAIN_POINTS = 2.7  # MERIT over joint on the paper's 8-benchmark average (54.3 -> 57.0)
MIN_STEPS = 50


@dataclass
class SourcePlan:
    name: str
    samples: int
    tokens: float
    exact: bool
    truncated_share: float
    eval_items: int


@dataclass
class Plan:
    name: str
    sources: list[SourcePlan]
    groups: int
    global_batch: int
    steps_per_branch: int
    steps_joint: int
    model: est.ModelShape | None
    precision: str
    hardware: est.Hardware
    devices_per_branch: int
    stages: list[tuple[str, float | None, float | None, str]] = field(default_factory=list)  # name, s, bytes, note
    disk: list[tuple[str, float | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    min_detectable_points: float | None = None
    assumed: bool = False  # sources described by --assume-data, not read


@dataclass(frozen=True)
class AssumedData:
    """A mixture described by numbers, for planning before the data is at hand (``--assume-data``)."""

    sources: int
    examples: int
    tokens_per_example: float

    @classmethod
    def parse(cls, text: str) -> AssumedData:
        from merit.errors import ConfigError

        try:
            t, n, length = text.split(":")
            out = cls(int(float(t)), int(float(n)), float(length))
        except ValueError:
            raise ConfigError(f"--assume-data {text!r}: expected SOURCES:EXAMPLES:TOKENS_PER_EXAMPLE, "
                              "e.g. 176:1.6e6:600") from None
        if min(out.sources, out.examples) < 1 or out.tokens_per_example <= 0:
            raise ConfigError(f"--assume-data {text!r}: every number must be positive")
        return out


def make_plan(cfg: RunConfig, sources=None, gpu: str | None = None, *, assume_model: str | None = None,
              assume_data: AssumedData | None = None) -> Plan:
    """The plan of ``cfg``; ``sources`` (``merit.data.mixture.Source`` list) when already resolved.

    ``assume_model`` (a ``merit.plan.estimate.KNOWN_MODELS`` name) and ``assume_data`` replace θ(0) and the
    mixture by their numbers, for planning before the checkpoint or the data is here."""
    from merit.data import mixture as mixture_stage
    from merit.errors import ConfigError
    from merit.train.options import resolve_precision

    if assume_model is not None and assume_model not in est.KNOWN_MODELS:
        raise ConfigError(f"--assume-model: unknown {assume_model!r}; known: {', '.join(est.KNOWN_MODELS)}")
    with tempfile.TemporaryDirectory(prefix="merit-plan-") as scratch:
        tokenizer, model = (None, est.KNOWN_MODELS[assume_model]()) if assume_model else _theta0(cfg)
        if assume_data is not None:
            per = assume_data.examples // assume_data.sources
            cap = cfg.eval.max_per_source or 0
            planned = [SourcePlan(f"source {i + 1}", per, per * assume_data.tokens_per_example, False, 0.0, cap)
                       for i in range(assume_data.sources)]
        else:
            if sources is None:  # the built-in mixture is generated into a scratch folder, not a run folder
                sources = mixture_stage.resolve_sources(cfg.mixture, Path(scratch), cfg.seed)
            if tokenizer is None and assume_model is not None and cfg.model.path and Path(cfg.model.path).is_dir():
                from merit.models.loading import load_tokenizer

                tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
            planned = [_source(s, cfg, tokenizer, mixture_stage) for s in sources]
    k = cfg.groups
    processes = cfg.launch.processes_per_branch
    global_batch = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * processes
    total = sum(s.samples for s in planned)
    steps_branch = max(1, math.ceil(total / k / global_batch)) * cfg.train.epochs
    steps_joint = max(1, math.ceil(total / global_batch)) * cfg.train.epochs
    precision = resolve_precision(cfg.train, cfg.model)
    hw = _hardware(gpu, cfg)
    devices = processes if hw.sustained is None else 1
    plan = Plan(cfg.name, planned, k, global_batch, int(math.ceil(steps_branch)), int(math.ceil(steps_joint)),
                model, precision, hw, devices, assumed=assume_data is not None)
    _estimates(plan, cfg)
    _warnings(plan, cfg)
    return plan


def _theta0(cfg: RunConfig):
    """(tokenizer or None, ModelShape or None) of θ(0), without loading weights."""
    import torch

    from merit.models import loading

    folder = Path(cfg.model.path) if cfg.model.path else None
    if folder is None and cfg.model.preset == "smollm2-135m-instruct":
        from merit.models.presets import cache_dir

        cached = cache_dir() / "smollm2-135m-instruct"
        folder = cached if (cached / "config.json").exists() else None
    if folder is not None:
        tokenizer = loading.load_tokenizer(folder, cfg.model.trust_remote_code)
        meta = loading.meta_model(folder, cfg.model.trust_remote_code)
    else:
        from merit.models.presets import probe

        with torch.random.fork_rng(devices=[]):
            probed = probe(cfg.model.preset, cfg.prepare, cfg.seed)
        if probed is None:
            return None, None
        tokenizer, meta = probed
    # (a preset VLM has no processor before it is built: its token budgets come from characters)
    return tokenizer, _shape(meta, cfg)


def _shape(meta, cfg: RunConfig) -> est.ModelShape:
    import torch

    from merit.models import loading, vlm

    params = sum(p.numel() for p in meta.parameters())
    if cfg.train.lora is None:
        loading.check_trainable(meta, cfg.model, None)  # sets requires_grad by the training rules
        trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    else:  # LoRA: r × (in + out) per adapted linear layer
        targets = vlm.lora_targets(meta, list(cfg.train.lora.target_modules)) if vlm.model_family(meta) else \
            list(cfg.train.lora.target_modules)
        trainable = 0
        for name, module in meta.named_modules():
            if isinstance(module, torch.nn.Linear) and any(
                    name == t or name.endswith("." + t) or t == "all-linear" for t in targets):
                trainable += cfg.train.lora.r * (module.in_features + module.out_features)
        params += trainable
    text = meta.config.get_text_config() if hasattr(meta.config, "get_text_config") else meta.config
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    kv = getattr(text, "num_key_value_heads", heads)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    return est.ModelShape(params=params, trainable=trainable, hidden=hidden,
                          layers=getattr(text, "num_hidden_layers", None),
                          intermediate=getattr(text, "intermediate_size", None),
                          kv_width=head_dim * kv if head_dim and kv else None, vocab=getattr(text, "vocab_size", None),
                          frozen_bytes_per_param=4 if cfg.model.dtype == "float32" else 2)


def _source(s, cfg: RunConfig, tokenizer, mixture_stage) -> SourcePlan:
    """A source's counts from its line counts and a tokenized sample of its first examples (the files are
    not parsed whole a second time: ``merit run``'s pre-work checks have validated every line)."""
    from merit.data import formats

    reader = s.reader()
    samples = formats.count_examples(reader, cfg.mixture.max_train_per_source)
    size = SAMPLE_VLM if getattr(tokenizer, "processor", None) is not None else SAMPLE
    sample = formats.read_examples(reader, min(size, samples))
    truncated = 0
    if tokenizer is not None and sample:
        toks, truncated, skipped = mixture_stage.tokenize_examples(tokenizer, sample, cfg.mixture.max_length,
                                                                   str(s.train))
        mean = sum(len(t.input_ids) for t in toks) / len(sample) if toks else 0.0
        truncated += skipped
    else:  # no tokenizer before the preset is built: ~4 characters per token
        chars = [sum(len(str(m.get("content", ""))) for m in ex["messages"]) for ex in sample]
        mean = min(cfg.mixture.max_length, sum(chars) / max(1, len(chars)) / 4)
    items = 0
    if s.eval:
        caps = [c for c in (cfg.mixture.max_eval_per_source, cfg.eval.max_per_source) if c is not None]
        items = formats.count_examples(s.reader("eval"), min(caps) if caps else None)
    return SourcePlan(s.name, samples, mean * samples, len(sample) == samples and tokenizer is not None,
                      truncated / len(sample) if sample else 0.0, items)


def _hardware(gpu: str | None, cfg: RunConfig) -> est.Hardware:
    import torch

    from merit.errors import ConfigError

    if gpu is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        gpu = next((k for k in est.HARDWARE if k.split("-")[0] in name and k.split("-")[1][:-2] in name), None)
        if gpu is None:
            props = torch.cuda.get_device_properties(0)
            return est.Hardware(torch.cuda.get_device_name(0), props.total_memory, 100, 10)
    if gpu is None or gpu == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 16 * est.GB
        cores = cfg.launch.cpus_per_branch or os.cpu_count() or 1
        return est.cpu(cores, memory)
    if gpu not in est.HARDWARE:
        raise ConfigError(f"--gpu: unknown {gpu!r}; known: cpu, {', '.join(est.HARDWARE)}")
    return est.HARDWARE[gpu]


def _sharding(cfg: RunConfig) -> str:
    if cfg.train.fsdp is not None:
        return "fsdp"
    if cfg.train.deepspeed is not None:
        from merit.train.options import deepspeed_config

        stage = deepspeed_config(cfg.train.deepspeed).get("zero_optimization", {}).get("stage", 0)
        return {3: "zero3", 2: "zero2"}.get(stage, "ddp")
    return "ddp"


def _estimates(plan: Plan, cfg: RunConfig) -> None:
    m, hw = plan.model, plan.hardware
    tokens = sum(s.tokens for s in plan.sources)
    samples = sum(s.samples for s in plan.sources)
    per_example = tokens / samples if samples else 0
    ckpt = cfg.train.gradient_checkpointing
    half = plan.precision != "fp32" and (hw.bf16 or plan.precision == "fp16")
    k = plan.groups
    random_ks = [kr for kr in (cfg.baselines.random_k or [k]) if not (cfg.split.method == "random" and kr == k)] \
        if cfg.baselines.random else []
    branches = k + sum(random_ks)
    # the full-data runs: joint at each budget, and the soup members beyond the joint run
    joint_epochs = list(cfg.baselines.epochs_rows(cfg.train.epochs).values()) if cfg.baselines.joint else []
    joint_epochs += [cfg.train.epochs] * (max(cfg.baselines.soups or [1]) - 1) if cfg.baselines.joint else []
    soups = len(cfg.baselines.soups or []) if cfg.baselines.joint else 0
    if m is None:
        plan.stages.append(("all", None, None, f"θ(0) of preset {cfg.model.preset!r} is unknown until it is built"))
        return
    calib = sum(min(cfg.grads.calibration_size, s.samples) for s in plan.sources) * per_example
    workers = min(cfg.grads.workers, len(plan.sources))
    grads_half = cfg.grads.precision != "fp32" and (hw.bf16 or cfg.grads.precision == "tf32")
    plan.stages.append(("grads", est.seconds(calib * (2 * m.params + 4 * m.trainable), hw, workers, half=grads_half),
                        est.gradient_memory(m, micro_batch=cfg.grads.batch_size, seq_len=cfg.mixture.max_length,
                                            checkpointing=cfg.grads.gradient_checkpointing),
                        f"{workers} worker(s), one device each, {cfg.grads.precision}"))
    mem = est.train_memory(m, precision=plan.precision, sharding=_sharding(cfg), gpus=cfg.launch.processes_per_branch,
                           micro_batch=cfg.train.batch_size, seq_len=cfg.mixture.max_length, checkpointing=ckpt)
    branch_s = est.seconds(est.train_flops(m, tokens / k * cfg.train.epochs, ckpt), hw, plan.devices_per_branch, half)
    plan.stages.append(("branch (each)", branch_s, mem["total"],
                        f"{branches} branches, {plan.devices_per_branch} device(s) each; micro-batch "
                        f"{cfg.train.batch_size} × {cfg.mixture.max_length} tokens, {_sharding(cfg)}"))
    if joint_epochs:
        plan.stages.append(("joint", est.seconds(est.train_flops(m, tokens * sum(joint_epochs), ckpt), hw,
                                                 plan.devices_per_branch, half), mem["total"],
                            "the whole mixture" + (f", {len(joint_epochs)} runs ({sum(joint_epochs):g} epochs in all)"
                                                   if len(joint_epochs) > 1 else "")))
    methods = 1 + len(cfg.merge.operators) + len(joint_epochs) - max(0, max(cfg.baselines.soups or [1]) - 1) \
        + soups + len(random_ks)
    items = sum(s.eval_items for s in plan.sources) + transfer_items(cfg)
    eval_flops = methods * items * 2 * m.params * (per_example + cfg.eval.max_new_tokens)
    plan.stages.append(("eval", est.seconds(eval_flops, hw, 1, half, mfu=est.GENERATE_MFU), None,
                        f"{methods} models × {items} items (generation is memory-bound: rough)"))
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}
    save = bytes_per[cfg.train.save_dtype or cfg.model.dtype]
    spec = cfg.grads.compression
    per_source = {"countsketch": 4 * cfg.grads.sketch_dim, "jl": 4 * cfg.grads.sketch_dim,
                  "stride": 4 * m.trainable / cfg.grads.stride, "none": 4 * m.trainable}.get(spec)
    plan.disk.append((f"gradient store ({spec})", None if per_source is None else per_source * len(plan.sources)))
    folders = branches + len(joint_epochs)
    plan.disk.append((f"{folders} branch/joint checkpoints", folders * m.params * save))
    merges = len(cfg.merge.operators) + len(random_ks) + soups
    plan.disk.append((f"{merges} merged checkpoints", merges * m.params * bytes_per[cfg.merge.dtype or
                                                                                  (cfg.train.save_dtype or cfg.model.dtype)]))
    plan.disk.append(("Trainer checkpoint of a running branch (resume)", m.params * save + 12 * m.trainable))


def _warnings(plan: Plan, cfg: RunConfig) -> None:
    w = plan.warnings
    m = plan.model
    lora = cfg.train.lora is not None
    if m is not None and m.params > 100e6 and cfg.train.learning_rate > (1e-3 if lora else 1e-4):
        w.append(f"train.learning_rate {cfg.train.learning_rate:g} is high for a {m.params / 1e6:.0f}M-parameter "
                 f"pretrained model: full fine-tuning usually uses 1e-5-5e-5 (default 2e-5), LoRA 1e-4-2e-4")
    if plan.precision == "bf16-pure":
        w.append("train.precision bf16-pure: bf16 weights and AdamW state lose updates smaller than ~1/256 of a "
                 "weight; at small learning rates most of a branch's task vector rounds away (use bf16)")
    if plan.steps_per_branch < MIN_STEPS:
        w.append(f"{plan.steps_per_branch} optimizer steps per branch (global batch {plan.global_batch}): branches this "
                 f"short barely leave θ(0), so merges and baselines differ little; aim for ≥ {MIN_STEPS} (more data per "
                 "source, more epochs or a smaller batch)")
    plan.min_detectable_points = est.min_detectable_difference([s.eval_items for s in plan.sources])
    mdd = plan.min_detectable_points
    if mdd is not None and mdd > PAPER_GAIN_POINTS:
        w.append(f"eval sets resolve only differences above ±{mdd:.1f} points of macro accuracy (95%, "
                 f"{sum(s.eval_items for s in plan.sources)} items over {sum(1 for s in plan.sources if s.eval_items)} "
                 f"sources): the paper's gain over joint is {PAPER_GAIN_POINTS} points; raise eval.max_per_source "
                 "or add eval data")
    for s in plan.sources:
        if s.truncated_share >= 1.0:
            w.append(f"source {s.name}: every sampled example is cut at mixture.max_length={cfg.mixture.max_length}")
        elif s.truncated_share >= 0.5:
            w.append(f"source {s.name}: {s.truncated_share:.0%} of sampled examples are cut at "
                     f"mixture.max_length={cfg.mixture.max_length}")
    stages = {st[0]: st for st in plan.stages}
    capacity = plan.hardware.memory_bytes
    branch = stages.get("branch (each)")
    if branch is not None and branch[2] is not None and branch[2] > capacity:
        w.append(f"a branch needs ≈ {est.human_bytes(branch[2])} per device, more than the "
                 f"{est.human_bytes(capacity)} of a {plan.hardware.name}: shard it "
                 "(train.deepspeed ZeRO-2/3 or train.fsdp over launch.processes_per_branch GPUs), lower "
                 "train.batch_size, or set train.gradient_checkpointing")
    grads = stages.get("grads")
    if grads is not None and grads[2] is not None and grads[2] > capacity:
        smallest = cfg.grads.batch_size == 1 and cfg.grads.gradient_checkpointing
        fix = ("it runs in fp32 in one process: estimate the gradients on a device with more memory (the stage "
               "can run alone: merit run ... --until split)" if smallest else
               "set grads.batch_size: 1 and grads.gradient_checkpointing: true")
        w.append(f"gradient estimation needs ≈ {est.human_bytes(grads[2])} on one device (fp32 θ(0) and gradients, "
                 f"micro-batch {cfg.grads.batch_size}), more than the {est.human_bytes(capacity)} of a "
                 f"{plan.hardware.name}: {fix}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def render(plan: Plan, short: bool = False) -> str:
    """The plan as text; ``short``: the few lines ``merit run`` starts with."""
    lines = []
    tokens = sum(s.tokens for s in plan.sources)
    samples = sum(s.samples for s in plan.sources)
    approx = "" if all(s.exact for s in plan.sources) else "≈ "
    m = plan.model
    model = "θ(0) unknown until built" if m is None else \
        f"θ(0) {_count(m.params)} parameters ({_count(m.trainable)} trained)"
    lines.append(f"plan: {len(plan.sources)} sources, {samples:,} examples, {approx}{tokens:,.0f} tokens; {model}; "
                 f"precision {plan.precision}")
    lines.append(f"plan: K = {plan.groups} groups of ≈ {samples / plan.groups:,.0f} examples "
                 f"(≈ {tokens / plan.groups:,.0f} tokens) each; {plan.steps_per_branch} optimizer steps per branch, "
                 f"{plan.steps_joint} for joint (global batch {plan.global_batch})")
    for name, s, b, note in plan.stages:
        if name == "all":
            lines.append(f"plan: {note}")
            continue
        peak = "" if b is None else f", peak ≈ {est.human_bytes(b)} per device"
        lines.append(f"plan: {name}: ≈ {est.human_seconds(s)}{peak} on {plan.hardware.name} ({note})")
    if not short and not plan.assumed:
        lines.append("")
        lines.append("| source | examples | tokens | cut at max_length | eval items |")
        lines.append("|---|---|---|---|---|")
        for s in plan.sources[:40]:
            lines.append(f"| {s.name} | {s.samples:,} | {'' if s.exact else '≈ '}{s.tokens:,.0f} | "
                         f"{s.truncated_share:.0%} | {s.eval_items} |")
        if len(plan.sources) > 40:
            lines.append(f"| ... {len(plan.sources) - 40} more | | | | |")
    if not short:
        lines.append("")
        for name, b in plan.disk:
            lines.append(f"disk: {name}: ≈ {est.human_bytes(b)}")
        if plan.min_detectable_points is not None:
            lines.append(f"eval: two methods must differ by > {plan.min_detectable_points:.1f} points of macro "
                         "accuracy to be told apart (95%, binomial, accuracies near 50%)")
        lines.append("estimates: FLOP-based times at "
                     f"{'measured CPU throughput' if plan.hardware.sustained is not None else f'{est.TRAIN_MFU:.0%} of peak'}; "
                     "memory from merit.plan.estimate (docs/training.md)")
    for text in plan.warnings:
        lines.append(f"warning: {text}")
    return "\n".join(lines)


def transfer_items(cfg) -> int:
    """Items of the transfer sets the evaluation scores per checkpoint (counted for the built-in ones and
    for a folder; 0 for ``eval.transfer.sources``, whose files may be large datasets)."""
    t = cfg.eval.transfer
    if t is None:
        return 0
    cap = t.max_per_source or cfg.eval.max_per_source
    if t.builtin is not None:
        from merit.data.builtin import WARMUP_TASKS

        warmup = len(WARMUP_TASKS) if t.builtin.warmup_tasks == "all" else len(t.builtin.warmup_tasks)
        return (len(t.builtin.tasks) + warmup) * min(t.builtin.eval_per_task, cap or t.builtin.eval_per_task)
    if t.dir is not None and Path(t.dir).is_dir():
        from merit.evaluate.transfer import folder_sources

        from merit.data import formats

        return sum(formats.count_examples(s.reader(), cap) for s in folder_sources(Path(t.dir), t.include))
    return 0
