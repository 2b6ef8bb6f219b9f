"""How a branch trains: the precision mode resolved from the config, the checks that depend on this
machine (a GPU, an installed kernel), and the ``TrainingArguments`` every branch and the joint baseline
are built with — one function, so tests can assert on exactly what the Trainer receives.

Nothing here re-implements the Trainer: mixed precision is its ``bf16`` / ``fp16`` (autocast, loss
scaling for fp16), checkpointing, optimizers, workers and length grouping are its own options.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from merit.config import ModelConfig, TrainConfig
from merit.errors import ConfigError, notice, warn

# model.dtype -> train.precision when the latter is not given: a half-precision θ(0) trains in mixed
# precision (fp32 master weights), never in pure half precision, which would lose most updates silently.
DEFAULT_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MIXED = ("bf16", "fp16")


def resolve_precision(train: TrainConfig, model: ModelConfig) -> str:
    """``train.precision``, or its default from ``model.dtype``."""
    return train.precision or DEFAULT_PRECISION[model.dtype]


def load_dtype(precision: str, model: ModelConfig) -> str:
    """dtype θ(0) is loaded in for training: ``bf16-pure`` loads bf16 whatever ``model.dtype`` says."""
    return "bfloat16" if precision == "bf16-pure" else model.dtype


def check_train_options(train: TrainConfig, model: ModelConfig, *, is_vlm: bool = False,
                        cuda: bool | None = None) -> str:
    """Refuse, in one line naming the key, what this machine cannot run; return the resolved precision.

    Called before any work (``merit run``'s pre-work checks, ``merit train-branch``). ``cuda`` defaults to
    whether this process sees a CUDA GPU (a test passes it)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    precision = resolve_precision(train, model)
    given = "train.precision" if train.precision else f"model.dtype={model.dtype} (train.precision's default)"
    if precision == "fp16" and not cuda:
        raise ConfigError(f"{given}: fp16 mixed precision needs a CUDA GPU (loss scaling); on CPU use "
                          "train.precision: bf16 or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{given}: this GPU ({torch.cuda.get_device_name(0)}) has no bf16; use "
                          "train.precision: fp16 (mixed, with loss scaling) or fp32")
    if model.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                              "(pip install flash-attn --no-build-isolation); or use sdpa")
        if not cuda:
            raise ConfigError("model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; use sdpa")
        if precision not in ("bf16", "fp16", "bf16-pure"):
            raise ConfigError("model.attn_implementation: flash_attention_2 computes in bf16/fp16 only; set "
                              "train.precision: bf16 (or fp16), or use sdpa")
    if train.fsdp is not None and not cuda:
        # accelerate builds FSDP for GPU process groups only; on CPU the Trainer would silently run DDP.
        raise ConfigError("train.fsdp: FSDP runs on CUDA GPUs only (accelerate falls back to plain DDP on CPU); "
                          "remove train.fsdp on this machine")
    if train.deepspeed is not None:
        deepspeed_config(train.deepspeed)
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("train.deepspeed: needs the deepspeed package: pip install 'merit-tune[deepspeed]' "
                              "(or use train.fsdp, which needs nothing beyond torch)")
        if not cuda:  # as for FSDP: on CPU accelerate runs plain DDP and ignores the DeepSpeed config
            raise ConfigError("train.deepspeed: DeepSpeed runs on CUDA GPUs only here (accelerate falls back to plain "
                              "DDP on CPU); remove train.deepspeed on this machine")
    if train.packing and is_vlm:
        raise ConfigError("train.packing: padding-free batches are for text models; a vision-language model's "
                          "batches stay padded (remove train.packing)")
    return precision


def deepspeed_config(value: str | dict) -> dict:
    """``train.deepspeed`` as a dict: the inline config, or the JSON file it names, checked."""
    import json
    from pathlib import Path

    from merit.config import check_deepspeed_config

    if isinstance(value, dict):
        config = value
    else:
        path = Path(value)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"train.deepspeed: {path}: file not found") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"train.deepspeed: {path}: not valid JSON ({e})") from None
    try:
        check_deepspeed_config(config)
    except ValueError as e:
        raise ConfigError(f"train.deepspeed: {value if isinstance(value, str) else 'inline config'}: {e}") from None
    return config


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process in a branch's distributed job — torchrun, ``accelerate launch``,
    Ray Train and merit's Slurm tasks set ``RANK`` / ``WORLD_SIZE`` — or (0, 1)."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def explain_precision(train: TrainConfig, model: ModelConfig) -> None:
    """Say once per run what the precision choice means when it is not plain fp32 by default: a
    half-precision ``model.dtype`` mapped to mixed precision, or pure bf16 and the updates it loses."""
    precision = resolve_precision(train, model)
    if train.precision is None and precision in MIXED:
        notice(f"model.dtype {model.dtype}: branches train in {precision} mixed precision (fp32 master weights "
               f"and optimizer state), train.precision's default; set train.precision to choose")
    if precision == "bf16-pure":
        warn(f"train.precision bf16-pure: weights, gradients and AdamW state are bf16 (8 significant bits), so an "
             f"update smaller than ~1/256 of its weight rounds away — at learning rate {train.learning_rate:g} "
             "most do; train.precision: bf16 keeps fp32 master weights")


@dataclass(frozen=True)
class Tracking:
    """Where a job logs its training curves (``train.report_to``): one run per branch / joint, grouped
    by the run folder's name."""

    report_to: tuple[str, ...]
    log_dir: Path  # tensorboard event files: <run>/logs/<job folder>
    run_name: str  # e.g. "demo/merit-r2-branch-1"
    group: str  # the run folder's name

    def env(self) -> dict[str, str]:
        """The integrations read their grouping from the environment (set only around the training)."""
        return {"TENSORBOARD_LOGGING_DIR": str(self.log_dir), "WANDB_RUN_GROUP": self.group,
                "WANDB_PROJECT": os.environ.get("WANDB_PROJECT", "merit"),
                "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", self.group),
                "MLFLOW_RUN_NAME": self.run_name}


@contextlib.contextmanager
def tracking_env(tracking: Tracking | None):
    before = {}
    if tracking is not None:
        tracking.log_dir.mkdir(parents=True, exist_ok=True)
        for k, v in tracking.env().items():
            before[k] = os.environ.get(k)
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_report_to(names: list[str]) -> None:
    """Each tracker known to transformers and installed here (a ConfigError naming train.report_to)."""
    if not names:
        return
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for i, name in enumerate(names):
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(f"train.report_to[{i}]: unknown tracker {name!r}; transformers knows "
                              f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in get_available_reporting_integrations():
            raise ConfigError(f"train.report_to[{i}]: {name} is not installed here; pip install {name} "
                              "(or pip install 'merit-tune[tracking]' for tensorboard)")


def training_arguments(train: TrainConfig, precision: str, *, output_dir: str, seed: int,
                       save_steps: int | None = None, progress: bool = False, tracking: Tracking | None = None):
    """The Trainer's arguments for one branch (or the joint baseline) in the resolved ``precision``;
    ``save_steps`` None: no checkpoints."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    sharding = {}
    if train.fsdp is not None:
        sharding = {"fsdp": True, "fsdp_config": dict(train.fsdp)}
    elif train.deepspeed is not None:
        sharding = {"deepspeed": deepspeed_config(train.deepspeed)}
    return TrainingArguments(
        **sharding,
        output_dir=output_dir,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a value below 1 is a fraction of the total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Without CUDA, bf16 autocast and a multi-process branch (gloo) must be asked for as CPU training
        # (else the Trainer refuses bf16: "doesn't support bf16/gpu"); otherwise it picks the device.
        use_cpu=not cuda and (precision == "bf16" or distributed()[1] > 1),
        # TF32 matmuls where the GPU has them (Ampere+): fp32 parts of a mixed-precision step run faster.
        tf32=True if cuda and torch.cuda.get_device_capability(0) >= (8, 0) else None,
        activation_checkpointing=train.gradient_checkpointing,
        # Non-reentrant: works with frozen embeddings and LoRA without forcing inputs to require grads.
        activation_checkpointing_kwargs={"use_reentrant": False} if train.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        dataloader_num_workers=train.dataloader_num_workers,
        dataloader_pin_memory=cuda,
        # Every trainable parameter is used in every forward; the extra graph traversal would cost each step.
        ddp_find_unused_parameters=False,
        seed=seed,
        data_seed=seed,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        save_total_limit=1,  # resume needs only the newest; a checkpoint holds weights + optimizer state
        report_to=list(tracking.report_to) if tracking and tracking.report_to else "none",
        # trackio groups by project; the others by the environment (Tracking.env)
        **({"run_name": tracking.run_name, "project": tracking.group} if tracking else {}),
        # Log every step so a NaN loss stops the run at once (unfiltered) and progress is exact.
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        disable_tqdm=not progress,
    )
