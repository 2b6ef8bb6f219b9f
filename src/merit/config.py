"""Typed run config: one section per stage, loaded from YAML with dotted ``--set`` overrides.

Validation reports every problem at once, in the config's own dotted field names, as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merit.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    preset: str | None = None
    """A named preset (``merit ls``): ``tiny`` is the embedded default, built and warmed up locally."""
    path: str | None = None
    """A local Hugging Face checkpoint folder used as θ(0): a causal LM, or a vision-language model (a
    config with ``vision_config``, loaded with ``AutoModelForImageTextToText`` and its processor)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The dtype θ(0) is loaded in for evaluation, and what ``train.precision`` defaults from (``bfloat16``:
    bf16 mixed precision, never pure bf16 training). Gradient estimation always runs in fp32."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel, passed to transformers: ``sdpa`` (PyTorch's fused attention), ``eager`` (plain
    matmuls), ``flash_attention_2`` (needs the flash-attn package and a CUDA GPU; bf16/fp16 only)."""
    trainable: list[str] | None = None
    """Regular expressions over in-memory parameter names: only matching parameters are trained (and
    enter the gradients). Default: all parameters; for a vision-language model, the language model only
    (vision tower and projector frozen, as in the paper)."""
    frozen: list[str] = []
    """Regular expressions of parameters to freeze, applied after ``trainable`` (e.g. ``embed_tokens``)."""
    trust_remote_code: bool = False
    """Run model code shipped inside the checkpoint folder. Off: only transformers' own architectures."""
    allow_pickle: bool = False
    """Load pickled ``.bin`` weights (they can execute code when loaded). Off: safetensors only."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if (self.preset is None) == (self.path is None):
            raise ValueError("give exactly one of model.preset or model.path")
        return self


SourceFormat = Literal["chat-jsonl", "parquet", "hf-dataset", "sharegpt", "alpaca", "llava", "cauldron"]
Scalar = str | int | float | bool


class SourceConfig(_Section):
    name: str
    train: str
    """A data file (``.jsonl``, ``.json``, ``.parquet``, ``.arrow``) or a dataset folder (``save_to_disk``
    or Hub layout)."""
    eval: str | None = None
    """Held-out data, read the same way (may be the same folder with another ``eval_split``)."""
    format: SourceFormat | None = None
    """How to read it (``merit.data.formats``); default: by file type and the first record's fields."""
    columns: dict[str, str] | None = None
    """Layout field → column name where the data's names differ (``{messages: conversations}``)."""
    split: str | None = None
    """The split of a dataset folder to train on (default: ``train``, or its only split)."""
    eval_split: str | None = None
    """The split ``eval`` is read from."""
    filter: dict[str, Scalar | list[Scalar]] | None = None
    """Keep rows whose column holds this value (or one of these): a task unit of a larger dataset."""
    max_rows: int | None = Field(None, ge=1)
    """The first rows kept (after the filter), for train and eval each."""
    image_root: str | None = None
    """The folder relative image paths are under (default: the mixture folder, or the file's own)."""


class BuiltinMixtureConfig(_Section):
    suite: Literal["text", "vision"] = "text"
    """``text``: the code-generated text tasks (``tiny`` model); ``vision``: synthetic image tasks drawn
    with Pillow (``tiny-vlm`` model)."""
    tasks: list[str] | None = None
    """Task names (default: all built-in tasks of the suite)."""
    exclude: list[str] = []
    """Tasks left out of the mixture (e.g. to score them as transfer sets, ``eval.transfer.builtin``)."""
    train_per_task: int = Field(200, ge=1)
    eval_per_task: int = Field(50, ge=1)


class MixtureConfig(_Section):
    builtin: BuiltinMixtureConfig | None = None
    """The code-generated task mixture (the embedded default)."""
    dir: str | None = None
    """A folder with ``train/<source>.jsonl`` and ``eval/<source>.jsonl`` (or ``.json``, ``.parquet``,
    ``<source>/`` dataset folders)."""
    format: SourceFormat | None = None
    """With ``dir``: the format of its sources (default: each by file type and content)."""
    sources: list[SourceConfig] | None = None
    include: list[str] | None = None
    """With ``dir``: only these sources (default: every ``train/*.jsonl``)."""
    max_train_per_source: int | None = Field(None, ge=1)
    max_eval_per_source: int | None = Field(None, ge=1)
    max_length: int = Field(256, ge=8)
    """Examples longer than this many tokens are truncated (the count goes into the mixture manifest)."""
    token_count: Literal["all", "text"] = "all"
    """VLM mixtures: which tokens make a source's budget n_t (and so the merge weights). ``all``: every
    token the model reads, image placeholder tokens included (the paper's "tokens"); ``text``: without
    image placeholders. Both counts are recorded in the mixture manifest either way."""
    cache_dir: str | None = None
    """Where sources are tokenized to (memory-mapped Arrow, one folder per file content × tokenizer ×
    truncation; ``merit.data.tokens``): a folder shared by runs, so a source is tokenized once for all of
    them. Default: the run folder's ``mixture/tokens``."""
    num_proc: int | None = Field(None, ge=1)
    """Processes that tokenize the mixture (default: one per core, up to 8, when there is more than a few
    MB of text; 1: in the merit process)."""

    @model_validator(mode="after")
    def _one_input(self) -> MixtureConfig:
        given = [k for k in ("builtin", "dir", "sources") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of mixture.builtin, mixture.dir or mixture.sources")
        if self.include is not None and self.dir is None:
            raise ValueError("mixture.include goes with mixture.dir")
        if self.format is not None and self.dir is None:
            raise ValueError("mixture.format goes with mixture.dir (give mixture.sources[].format per source)")
        return self


class PrepareConfig(_Section):
    """The built-in preparation of θ(0) for the ``tiny`` and ``tiny-vlm`` presets: a short joint training
    on a separate warm-up mixture (the paper's θ(0) is an already instruction-tuned checkpoint)."""

    examples_per_task: int = Field(600, ge=1)
    epochs: float = Field(2.0, gt=0)
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1)


class GradsConfig(_Section):
    calibration_size: int = Field(200, ge=1)
    """Examples per source for its mean gradient at θ(0) (paper: 200)."""
    compression: str = "countsketch"
    """How each mean gradient is compressed before cosines (``merit ls``): ``countsketch`` (default),
    ``jl``, ``stride`` (the paper's) or ``none``. The default deviates from the paper's stride-5: on
    SmolLM2-135M it is far more faithful at 0.24% of the bytes (benchmarks/conflict_results.md)."""
    stride: int = Field(5, ge=1)
    """With ``compression: stride``: keep every ``stride``-th entry of the flattened gradient (paper: 5)."""
    sketch_dim: int = Field(65536, ge=1, le=2**30)
    """With ``countsketch`` / ``jl``: the compressed dimension D (4·D bytes per source). ``jl`` costs
    O(D × parameters) per source: keep it to a few thousand."""
    batch_size: int = Field(16, ge=1)
    """Examples per forward/backward (a micro-batch): the mean gradient does not depend on it, memory
    does (activations grow with it)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: about a third
    more compute for the memory of one layer. With ``batch_size: 1`` estimation then needs about model +
    gradients (1.09× on SmolLM2-135M, benchmarks/conflict_results.md). A memory setting only: it does
    not change stored gradients' keys."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """Arithmetic of the forward/backward passes; gradients always accumulate in fp32. ``fp32`` (the
    default, bitwise reproducible on CPU), ``tf32`` (CUDA Ampere or newer: fp32 matmuls on TF32 tensor
    cores), ``bf16`` (autocast: bf16 matmuls, fp32 weights and gradient buffers). Part of the stored
    gradients' key; its fidelity against fp32 is measured by benchmarks/grads_bench.py (not yet run)."""
    workers: int = Field(1, ge=1)
    """Processes that share the sources' gradients (each loads θ(0) once and stores the vectors of its
    share), run by ``launch.kind`` like branches: local worker processes (one per ``launch.devices``
    entry / GPU), Ray tasks or Slurm jobs. 1: in the merit process. Vectors are the same either way
    (bitwise on CPU with the same threads per process)."""


class SplitConfig(_Section):
    method: str = "pca-median"
    """How sources become groups (``merit ls``): ``pca-median`` (the paper's), ``pca-median-tokens``,
    ``pca-median-raw`` (PCA of the raw Gram matrix G Gᵀ, Table 20), ``conflict-greedy`` (K = 2, the
    paper's conflict-induced baseline), ``kmeans``, ``random`` or ``manual``."""
    r: int = Field(2, ge=1, le=6)
    """Number of PCA axes; K = 2^r groups."""
    groups: list[list[str]] | None = None
    """With ``method: manual``: the groups as lists of source names; every source exactly once."""
    conflict: Literal["cosine", "residual"] = "cosine"
    """What the conflict matrix measures: cosines of the sources' mean gradients (``cosine``, the paper's),
    or of their residuals g_i − ḡ after the mixture's sample-weighted mean gradient ḡ is removed
    (``residual``, a research option: mean gradients share a large common direction, e.g. prompt format,
    which makes most cosines positive; the residuals compare what each source adds). Computed exactly
    from the stored vectors' Gram matrix; the main row is then named ``merit-r<r>-residual``."""
    greedy_rule: Literal["separate", "literal"] = "separate"
    """``conflict-greedy``: each source joins the group it agrees with most (``separate``: conflicting
    sources end up apart, the evident intent), or, read verbatim ("minimize average cosine similarity
    within each group", paper A.1.3), the group it agrees with least (``literal``)."""

    @model_validator(mode="after")
    def _manual_groups(self) -> SplitConfig:
        if self.method == "manual" and not self.groups:
            raise ValueError("split.method=manual needs split.groups (lists of source names)")
        if self.method == "conflict-greedy" and self.r != 1:
            raise ValueError(f"split.method=conflict-greedy makes K = 2 groups (the paper's baseline); set "
                             f"split.r: 1 (got {self.r})")
        if self.groups is not None:
            if self.method != "manual":
                raise ValueError("split.groups is used only with split.method=manual")
            names = [n for g in self.groups for n in g]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"split.groups: source(s) listed more than once: {', '.join(dup)}")
            if any(not g for g in self.groups):
                raise ValueError("split.groups: every group needs at least one source")
        return self


class LoraConfig(_Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


# The Trainer's fsdp_config keys (transformers 5.x, FSDP1 and FSDP2), each also accepted with "fsdp_".
FSDP_KEYS = {"version", "reshard_after_forward", "auto_wrap_policy", "transformer_layer_cls_to_wrap",
             "min_num_params", "cpu_offload", "offload_params", "activation_checkpointing", "state_dict_type",
             "cpu_ram_efficient_loading", "forward_prefetch", "backward_prefetch", "use_orig_params",
             "sync_module_states", "limit_all_gathers", "xla", "xla_fsdp_settings", "xla_fsdp_grad_ckpt"}


def check_deepspeed_config(config: Any) -> None:
    """A DeepSpeed config as merit can use it: a JSON object whose ZeRO stage (if given) is 0-3."""
    if not isinstance(config, dict):
        raise ValueError(f"a DeepSpeed config is a JSON object, not {type(config).__name__}")
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")


class TrainConfig(_Section):
    """Identical hyper-parameters for every branch and for the joint baseline."""

    learning_rate: float = Field(2e-5, gt=0)
    """AdamW peak learning rate. 2e-5: common practice for full fine-tuning of a pretrained checkpoint
    (TRL's SFT default, LLaVA-1.5's instruction stage); the embedded demo's 1M-parameter random-init model
    sets 1e-3 in its own config. LoRA usually wants ~1e-4-2e-4."""
    batch_size: int = Field(16, ge=1)
    """Examples per process per micro-step (global batch: × gradient_accumulation_steps ×
    launch.processes_per_branch)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: float = Field(1.0, gt=0)
    """Passes over each branch's data; the paper compares at one epoch (the joint run's token budget)."""
    lr_scheduler: str = "cosine"
    """A transformers scheduler name (``SchedulerType``): ``cosine``, ``linear``, ``constant_with_warmup``, ...
    Cosine decay after warm-up: the usual instruction-tuning schedule (LLaVA, TRL examples)."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up from 0 (3%: LLaVA-1.5's value)."""
    weight_decay: float = Field(0.0, ge=0)
    """0: the usual choice for short fine-tuning from a pretrained checkpoint (LLaVA, TRL's default)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping at norm 1.0 (the Trainer's default)."""
    report_to: list[str] = []
    """Experiment trackers the Trainer logs to (``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, ...: what
    the installed transformers accepts): one run per branch and joint, grouped by the run name; tensorboard
    event files go to ``<run>/logs/<job folder>``. Empty: none. Never part of a branch's key."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of full weights (PEFT). Branches are merged in weight space."""
    precision: Literal["fp32", "bf16", "fp16", "bf16-pure"] | None = None
    """``fp32``; ``bf16`` / ``fp16``: mixed precision (fp32 master weights and AdamW state, autocast
    compute; fp16 with loss scaling, CUDA only); ``bf16-pure``: bf16 weights, gradients and optimizer
    state — at small learning rates most updates round away (warned). Default: from ``model.dtype``
    (float32 → fp32, bfloat16 → bf16, float16 → fp16), i.e. mixed precision for a half-precision θ(0)."""
    save_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the weights a branch saves. Default: that of θ(0)'s checkpoint files."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (transformers' gradient checkpointing, non-reentrant):
    about a third more compute for the activation memory of one layer. Same gradients."""
    optim: str = "adamw_torch"
    """Any Trainer optimizer name (transformers ``OptimizerNames``): ``adamw_torch``, ``adamw_torch_fused``,
    ``adafactor``, ``adamw_8bit`` (bitsandbytes), ..."""
    dataloader_num_workers: int = Field(0, ge=0)
    """Worker processes that collate batches (and load images) while the model computes."""
    group_by_length: bool = False
    """Batch examples of similar length together (transformers' LengthGroupedSampler): less padding."""
    packing: bool = False
    """Text models: padding-free batches — a batch's examples are concatenated into one row with
    restarting position ids, attention never crosses an example boundary (transformers'
    ``DataCollatorWithFlattening``); labels unchanged. Vision-language models keep padded batches."""

    fsdp: dict[str, Any] | None = None
    """Shard parameters, gradients and optimizer state over a branch's processes with PyTorch FSDP (the
    Trainer's ``fsdp`` with this dict as its ``fsdp_config``; ``{}``: FSDP2 defaults, full sharding).
    Keys: ``version``, ``reshard_after_forward``, ``auto_wrap_policy``, ``transformer_layer_cls_to_wrap``,
    ``min_num_params``, ``cpu_offload``, ``activation_checkpointing``, ``state_dict_type``, ... A branch
    is saved as one full safetensors checkpoint whatever the sharding."""
    deepspeed: str | dict[str, Any] | None = None
    """DeepSpeed ZeRO for a branch's processes: a JSON config file's path or the config inline (the
    Trainer's ``deepspeed``; ``"auto"`` values are filled from these settings). Needs the ``deepspeed``
    package (``pip install 'merit-tune[deepspeed]'``). Saved as one full checkpoint (ZeRO-3 weights are
    gathered)."""

    @model_validator(mode="after")
    def _one_sharding(self) -> TrainConfig:
        if self.fsdp is not None and self.deepspeed is not None:
            raise ValueError("give at most one of train.fsdp and train.deepspeed")
        return self

    @field_validator("fsdp")
    @classmethod
    def _known_fsdp_options(cls, v: dict | None) -> dict | None:
        unknown = sorted(k for k in v or {} if k.removeprefix("fsdp_") not in FSDP_KEYS)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FSDP_KEYS))}")
        return v

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _deepspeed_path_or_dict(cls, v):
        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError(f"a DeepSpeed JSON file's path or an inline config (a mapping), not {v!r}")
        return v

    @field_validator("deepspeed")
    @classmethod
    def _usable_deepspeed_config(cls, v):
        if isinstance(v, dict):
            check_deepspeed_config(v)
        elif isinstance(v, str) and not v.strip():
            raise ValueError("empty path; give a DeepSpeed JSON file or an inline config")
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, v: str) -> str:
        if v == "cosine":
            return v  # the default: no need to import transformers (seconds) to check it
        from transformers.trainer_utils import SchedulerType

        # These two need an evaluation during training, which branches never run.
        usable = [s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy")]
        if v not in usable:
            raise ValueError(f"unknown scheduler {v!r}; use one of {', '.join(usable)}")
        return v

    @field_validator("optim")
    @classmethod
    def _known_optimizer(cls, v: str) -> str:
        if v == "adamw_torch":
            return v
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if v not in names:
            raise ValueError(f"unknown optimizer {v!r}; use one of {', '.join(names)}")
        return v


class MergeConfig(_Section):
    operators: list[str] = ["token-weighted", "uniform"]
    """Merge operators applied to the MERIT branches; the first one is also used for the random baseline."""
    allow_partial: bool = False
    """Merge the branches that finished when others failed (weights renormalised, manifest marked partial)."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """dtype of the merged checkpoint's floating tensors (merit accumulates in fp32 whatever this is).
    Default: the branches' dtype."""
    params: dict[str, dict[str, Any]] = {}
    """Operator hyper-parameters, by operator name: ``{ties: {density: 0.2}, star: {eta: 40}}``. Checked
    against what each operator takes (``docs/merging.md``); unset parameters keep their defaults. A value
    that differs from the default becomes part of that merge's key (changing it redoes only that merge)."""


class BaselinesConfig(_Section):
    joint: bool = True
    """One run over the whole mixture with the same hyper-parameters and token budget (row ``joint``)."""
    random: bool = True
    """K balanced random groups, trained and merged like MERIT (rows ``random-k{K}``)."""
    joint_epochs: list[float] | None = None
    """Joint at several budgets (the paper's Table 2: 0.5 / 1 / 2 epochs): rows ``joint-{e}ep``; the value
    equal to ``train.epochs`` is the ``joint`` row itself. Default: only ``joint``."""
    random_k: list[int] | None = None
    """Random splits at several K (powers of 2, Table 2: 2 / 4 / 8): rows ``random-k{K}``. Default: the main K."""
    soups: list[int] | None = None
    """Uniform soups of N full-data runs with different data orders (seeds ``seed``, ``seed + 1``, ...; the
    first is the joint run), Table 2's soups of 2 / 3 / 4: rows ``soup-{N}``."""

    @field_validator("joint_epochs")
    @classmethod
    def _positive_epochs(cls, v: list[float] | None) -> list[float] | None:
        for i, e in enumerate(v or []):
            if not e > 0:
                raise ValueError(f"joint_epochs[{i}] = {e}: a joint budget must be > 0 epochs")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("joint_epochs: a budget is listed twice")
        return v

    @field_validator("random_k")
    @classmethod
    def _powers_of_two(cls, v: list[int] | None) -> list[int] | None:
        for i, k in enumerate(v or []):
            if k < 2 or k & (k - 1):
                raise ValueError(f"random_k[{i}] = {k}: K must be a power of 2 ≥ 2 (recursive median splits)")
        return v

    @field_validator("soups")
    @classmethod
    def _soup_sizes(cls, v: list[int] | None) -> list[int] | None:
        for i, n in enumerate(v or []):
            if n < 2:
                raise ValueError(f"soups[{i}] = {n}: a soup needs at least 2 runs")
        return v

    def epochs_rows(self, train_epochs: float) -> dict[str, float]:
        """Row name → epochs of every joint run (``joint`` at ``train.epochs``)."""
        rows = {"joint": train_epochs}
        for e in self.joint_epochs or []:
            if e != train_epochs:
                rows[f"joint-{e:g}ep"] = e
        return rows


class TransferBuiltinConfig(_Section):
    """Built-in tasks scored as transfer sets (the embedded demo's): tasks held out of the mixture
    (``mixture.builtin.exclude``) and θ(0)'s own warm-up tasks, what fine-tuning may erode."""

    tasks: list[str] = []
    """Target tasks of the built-in suite that the mixture does not train on."""
    warmup_tasks: list[str] | Literal["all"] = []
    """Warm-up tasks θ(0) was prepared on (``all``: every one)."""
    eval_per_task: int = Field(50, ge=1)


class TransferConfig(_Section):
    """Sources outside the training mixture, scored for every checkpoint beside the in-mixture scores."""

    dir: str | None = None
    """A folder of ``<source>.jsonl`` files (or ``.json``, ``.parquet``, dataset folders), or one with an
    ``eval/`` folder of them."""
    sources: list[SourceConfig] | None = None
    """Sources read like ``mixture.sources``; their ``eval`` data is scored (their ``train`` data when no
    ``eval`` is given: a source outside the mixture is held out as a whole)."""
    builtin: TransferBuiltinConfig | None = None
    include: list[str] | None = None
    """With ``dir``: only these sources."""
    max_per_source: int | None = Field(None, ge=1)
    """Items scored per transfer source (default: ``eval.max_per_source``)."""

    @model_validator(mode="after")
    def _one_input(self) -> TransferConfig:
        given = [k for k in ("dir", "sources", "builtin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of eval.transfer.dir, eval.transfer.sources or eval.transfer.builtin")
        if self.include is not None and self.dir is None:
            raise ValueError("eval.transfer.include goes with eval.transfer.dir")
        return self


class HarnessConfig(_Section):
    """A standard evaluation harness run on every checkpoint (lm-evaluation-harness or lmms-eval)."""

    tasks: list[str] = Field(min_length=1)
    """Task (or group) names as the harness spells them."""
    include_path: str | None = None
    """A folder of the harness's task YAMLs (local tasks); with only local tasks named, the harness's
    own task index is not built."""
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool = True
    """Prompts through the tokenizer's chat template (what an instruction-tuned model expects)."""
    limit: int | None = Field(None, ge=1)
    """Items per task (default: all)."""
    batch_size: int | Literal["auto"] = 8
    model: str | None = None
    """lmms-eval only: its model class name for the checkpoint (e.g. ``qwen2_5_vl``)."""
    model_args: dict[str, Scalar] = {}
    """Extra arguments of the harness model (lmms-eval: ``max_pixels``, ...)."""


class EvalConfig(_Section):
    max_per_source: int | None = Field(50, ge=1)
    batch_size: int | Literal["auto"] = "auto"
    """Examples per forward pass. ``auto``: 64 on CPU; on a GPU, the largest power of two from 512 down
    that fits (halved on out-of-memory)."""
    max_new_tokens: int = Field(24, ge=1)
    normalize: Literal["whitespace", "lower"] = "whitespace"
    """Exact-match normalisation: collapse whitespace (case kept), or also lower-case and drop a final period."""
    length_normalized: bool = False
    """Multiple choice: rank choices by mean log-likelihood per token instead of the sum."""
    device: str = "auto"
    """Where checkpoints are evaluated: ``auto`` (the first CUDA GPU when there is one, else the CPU),
    ``cpu``, ``cuda``, ``cuda:N``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """The dtype checkpoints are evaluated in. ``auto``: ``model.dtype`` on CPU; bfloat16 on a GPU that
    supports it (float16 otherwise), which halves memory and time at a negligible change of scores."""
    transfer: TransferConfig | None = None
    """Transfer sets: sources outside the training mixture (the paper's claim is about those)."""
    lm_eval: HarnessConfig | None = None
    """lm-evaluation-harness tasks run on every checkpoint (``pip install merit-tune[lm-eval]``)."""
    lmms_eval: HarnessConfig | None = None
    """lmms-eval tasks run on every checkpoint of a vision-language run (``pip install merit-tune[lmms-eval]``)."""
    bootstrap: int = Field(2000, ge=100)
    """Bootstrap replicates of the 95% intervals (items resampled within each source)."""

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda or cuda:N")
        return v


class DiagnoseConfig(_Section):
    """The optional ``diagnose`` stage: ``merit diagnose`` on the run folder after evaluation (docs/diagnostics.md)."""

    enabled: bool = False
    alphas: int = Field(21, ge=3)
    """Points on each interpolation path, ends included (21: the paper's steps of 0.05)."""
    max_per_source: int | None = Field(None, ge=1)
    """Held-out (and training) examples per source; null: the eval stage's, so L(θ̄) equals results.json's."""
    calibration_size: int | None = Field(None, ge=1)
    """Held-out examples per source for the Hessian-vector products; null: the loss's examples."""
    sigmas: list[float] = [0.01, 0.05, 0.1]
    """Gaussian perturbation scales, relative to each tensor's RMS."""
    draws: int = Field(3, ge=1)
    antithetic: bool = True
    """Each draw evaluated at +noise and −noise (the first-order term cancels); false halves the cost."""
    curvature: Literal["hvp", "second-difference"] = "hvp"
    """How the predicted merge gain's (θ_k − θ̄)ᵀH(θ_k − θ̄) is computed: ``hvp`` (double-backward
    Hessian-vector products, as the paper) or ``second-difference`` (losses at θ̄ ± ε(θ_k − θ̄): two
    forward passes per branch, no graph; needs ``model.dtype: float32``). docs/diagnostics.md compares them."""
    curvature_epsilon: float = Field(0.1, gt=0, le=1)
    """ε of ``second-difference``, a fraction of θ_k − θ̄."""

    @field_validator("sigmas")
    @classmethod
    def _positive_sigmas(cls, v: list[float]) -> list[float]:
        if not v or not all(0 < s < 10 for s in v):
            raise ValueError("give one or more positive scales (relative to each tensor's RMS), e.g. [0.01, 0.05, 0.1]")
        return sorted(v)


class LaunchConfig(_Section):
    """Where and how branch jobs (and the joint baseline) run; nothing here changes what they compute."""

    kind: str = "local"
    """``local`` (this machine), ``ray`` (Ray tasks) or ``slurm`` (a submitit job array); see ``merit ls``."""
    workers: int | None = Field(None, ge=1)
    """Branches at once. local (default 1): 1 runs them one after another in this process, N > 1 in N
    worker processes; ray / slurm: a cap on tasks in flight (default: no cap)."""
    cpus_per_branch: int | None = Field(None, ge=1)
    """CPU cores (torch threads) per branch; default: local cores // workers, ray 1, slurm the cluster's."""
    threads: int | None = Field(None, ge=1)
    """Torch CPU threads of the merit process's own model work (θ(0) preparation, gradients, evaluation);
    default: torch's (one per core). 1 suits tiny models on small or busy machines, where a 2-thread team
    waits at every barrier for a descheduled thread (benchmarks/launch_results.md)."""
    gpus_per_branch: float = Field(0, ge=0)
    """GPUs per branch (Ray ``num_gpus``, Slurm ``gpus_per_node``; local: consecutive GPUs per worker)."""
    devices: list[str] | None = None
    """local: the ``CUDA_VISIBLE_DEVICES`` value of each worker, e.g. ``["0", "1"]`` or ``["0,1", "2,3"]``."""
    address: str | None = None
    """ray: address of an existing cluster (``auto``, ``ray://head:10001``); none starts a local instance."""
    slurm: dict[str, Any] = {}
    """slurm: passed to submitit (``partition``, ``time``, ``gpus_per_node``, ``mem_gb``, ``account``, ...;
    ``cluster: local`` runs the array on this machine)."""
    processes_per_branch: int = Field(1, ge=1)
    """Processes per branch (and for the joint baseline): with N > 1 each branch is one distributed job
    of N processes started by an existing engine — ``torchrun`` (local), Ray Train (ray), Slurm tasks
    through submitit (slurm) — one per GPU, or on CPU with the gloo backend. The global batch is
    N × ``train.batch_size`` × ``train.gradient_accumulation_steps``."""
    save_steps: int | None = Field(200, ge=1)
    """Keep a Trainer checkpoint every N steps in ``branches/.<k>.work/`` so a killed branch resumes;
    null: none. Not part of a branch's key: changing it never retrains a finished branch."""

    @model_validator(mode="after")
    def _devices_cover_workers(self) -> LaunchConfig:
        if self.devices is not None and self.workers is not None and len(self.devices) < self.workers:
            raise ValueError(f"launch.devices lists {len(self.devices)} entries for launch.workers={self.workers}")
        return self


class RunConfig(_Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_.\-]+$")
    """Letters, digits, '_', '.', '-': it names the default run folder ``runs/<name>``."""
    seed: int = Field(0, ge=0, lt=2**32)
    model: ModelConfig
    mixture: MixtureConfig
    prepare: PrepareConfig = PrepareConfig()
    grads: GradsConfig = GradsConfig()
    split: SplitConfig = SplitConfig()
    train: TrainConfig = TrainConfig()
    merge: MergeConfig = MergeConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    eval: EvalConfig = EvalConfig()
    diagnose: DiagnoseConfig = DiagnoseConfig()
    launch: LaunchConfig = LaunchConfig()

    @property
    def groups(self) -> int:
        return 2**self.split.r


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``split.r=1`` -> (["split", "r"], 1); the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set split.r=1")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: bad key {key!r}")
    return key.split("."), yaml.safe_load(value) if value != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def _describe(err: ValidationError, origin: str, overridden: set[str] = frozenset()) -> str:
    """Every problem at once, each with where it came from: ``--set key`` when an override gave it (or a
    section above it), else the config file."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            text = f"unknown key '{loc}'"
        elif e["type"] == "missing":
            text = f"'{loc}' is required"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            text = f"'{loc}': {msg}" if loc else msg
        given = [k for k in overridden if loc == k or loc.startswith(k + ".") or (loc and k.startswith(loc + "."))]
        parts.append(f"--set {min(given, key=len)}: {text}" if given else f"{origin}: {text}")
    return "; ".join(parts)


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a config from a YAML path (or a dict), with dotted overrides applied.

    Relative data and model paths are resolved against the config file's folder.
    """
    origin = "config"
    base_dir = Path.cwd()
    if isinstance(source, dict):
        raw = dict(source)
    else:
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte at offset {e.start}); save the config as UTF-8") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        base_dir = path.resolve().parent
    raw = apply_overrides(raw, overrides or [])
    overridden = {".".join(parse_override(o)[0]) for o in overrides or []}
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, origin, overridden)) from None
    _resolve_paths(cfg, base_dir)
    return cfg


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    def res(p: str | None, field: str = "a path") -> str | None:
        if p is not None and not str(p).strip():
            raise ConfigError(f"{field}: empty path; give a folder or file, or leave the key out")
        return None if p is None else str((base / Path(p).expanduser()).resolve())

    cfg.model.path = res(cfg.model.path, "model.path")
    if isinstance(cfg.train.deepspeed, str):
        cfg.train.deepspeed = res(cfg.train.deepspeed, "train.deepspeed")
    cfg.mixture.dir = res(cfg.mixture.dir, "mixture.dir")
    for i, s in enumerate(cfg.mixture.sources or []):
        s.train = res(s.train, f"mixture.sources[{i}].train")
        s.eval = res(s.eval, f"mixture.sources[{i}].eval")
        s.image_root = res(s.image_root, f"mixture.sources[{i}].image_root")
    t = cfg.eval.transfer
    if t is not None:
        t.dir = res(t.dir, "eval.transfer.dir")
        for i, s in enumerate(t.sources or []):
            s.train = res(s.train, f"eval.transfer.sources[{i}].train")
            s.eval = res(s.eval, f"eval.transfer.sources[{i}].eval")
            s.image_root = res(s.image_root, f"eval.transfer.sources[{i}].image_root")
    for name in ("lm_eval", "lmms_eval"):
        h = getattr(cfg.eval, name)
        if h is not None:
            h.include_path = res(h.include_path, f"eval.{name}.include_path")


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
