"""Fine-tune a model on tokenized examples with transformers' Trainer.

Every branch and the joint baseline go through ``train`` with the same TrainConfig, so they share every
hyper-parameter; only the data differs (the paper's Step 4).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.utils import logging as hf_logging

from merit.config import TrainConfig
from merit.data.chat import IGNORE, Tokenized
from merit.data.tokens import lengths_of
from merit.data.vision import VisionDataset, collator_for
from merit.errors import MeritError
from merit.train.health import StopOnStall
from merit.train.options import MIXED, tracking_env, training_arguments


class NonFiniteLoss(MeritError):
    """The training loss became NaN or Inf; the branch stops instead of training on garbage."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise as soon as a logged loss is NaN/Inf (needs ``logging_nan_inf_filter=False``, or the Trainer
    silently replaces such losses by the running mean and the run carries on diverged)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss} at step {state.global_step}/{state.max_steps}; "
                                "lower train.learning_rate or check the data")


class _Report(TrainerCallback):
    """Hands step, total steps, loss and learning rate to ``report`` (status file and log of a branch)."""

    def __init__(self, report: Callable[[dict], None]):
        self.report = report

    def on_train_begin(self, args, state, control, **kwargs):
        self.report({"step": state.global_step, "max_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        keep = {k: v for k, v in (logs or {}).items() if k in ("loss", "learning_rate", "grad_norm")}
        self.report({"step": state.global_step, "max_steps": state.max_steps, **keep})


class _Bar(ProgressCallback):
    """The Trainer's progress bar, named after the job, without its per-log dict printing (the loss goes
    to the branch's log file)."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            # disable=None: no bar when stderr is not a terminal (a log file, CI)
            self.training_bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True, disable=None)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def last_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint in ``work_dir``; incomplete ones are deleted.

    The Trainer writes ``trainer_state.json`` last, so a checkpoint without a readable one was cut off
    by a kill mid-save and cannot be resumed from.
    """
    found = []
    for d in Path(work_dir).glob("checkpoint-*"):
        if d.is_dir() and d.name.split("-", 1)[1].isdigit():
            found.append((int(d.name.split("-", 1)[1]), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text())
            return d
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)
    return None


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Tokenized]):
        self.examples = examples  # a list, or a memory-mapped TokenTable (rows decoded on access)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        t = self.examples[int(i)]
        return {"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}


class _Trainer(Trainer):
    """The Trainer, given the examples' lengths for ``train.group_by_length`` (it would otherwise read every
    example through ``__getitem__``, which for a VLM dataset is not a dict)."""

    def __init__(self, *args, lengths: list[int] | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lengths = lengths

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=self.lengths)


class PackedCollator(DataCollatorWithFlattening):
    """transformers' flattening collator, with ``use_cache=False`` in every batch: transformers builds the
    packed-sequence mask only when the forward has no KV cache, and a model whose config has
    ``use_cache`` on (most checkpoints) makes one even in train mode — attention then silently crosses
    example boundaries."""

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        batch["use_cache"] = False
        return batch


def text_collator(tokenizer, packing: bool):
    """Padded batches (labels padded with IGNORE), or with ``packing`` one row per batch: the examples
    concatenated, position ids restarting at each, so transformers' attention masks keep every example to
    itself (packed-sequence detection for sdpa/eager, varlen for flash-attention). Each example's first
    label becomes IGNORE so no token is trained to predict the next example (ours is a prompt token:
    already IGNORE)."""
    if packing:
        return PackedCollator(return_position_ids=True, separator_id=IGNORE)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)


def set_precision(model, precision: str) -> None:
    """Put the parameters in the dtypes ``precision`` trains them in.

    ``fp32``: the whole model in fp32. ``bf16`` / ``fp16`` (mixed): the trainable parameters in fp32 — the
    master weights, hence fp32 gradients and AdamW state — and frozen ones left as loaded, so a frozen
    vision tower or a LoRA base in bf16 costs no more; the Trainer's autocast runs the matmuls in half
    precision. ``bf16-pure``: as loaded (bf16, :func:`merit.train.options.load_dtype`)."""
    if precision == "fp32":
        model.to(torch.float32)
    elif precision in MIXED:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()


def train(model, tokenizer, examples: Sequence[Tokenized], cfg: TrainConfig, seed: int, *, precision: str = "fp32",
          desc: str = "train", work_dir: Path | None = None, save_steps: int | None = None, progress: bool = True,
          report: Callable[[dict], None] | None = None, state_out: dict | None = None,
          tracking=None) -> dict:
    """Train ``model`` in place on ``examples`` for ``cfg.epochs`` and return what a manifest records.

    ``precision`` is the resolved ``train.precision`` (:func:`merit.train.options.check_train_options`):
    the parameters are first put in its dtypes (:func:`set_precision`).

    With ``work_dir`` and ``save_steps``, a checkpoint (weights, optimizer, scheduler, RNG states, step) is
    kept there every ``save_steps`` optimizer steps (only the newest), and a call that finds one resumes
    from it: the Trainer restores all of these and skips the batches already seen in the epoch (the
    order comes from ``data_seed``), so on CPU the result is bitwise that of an uninterrupted run.
    ``report`` receives ``{"step", "max_steps", "loss", ...}`` at every step; a NaN/Inf loss raises
    :class:`NonFiniteLoss`.

    In a multi-process job (torchrun, Ray Train, Slurm tasks) every rank calls this; with ``state_out``
    the trained weights are gathered whole — from FSDP or DeepSpeed ZeRO-3 shards too, a collective every
    rank joins — into ``state_out["state_dict"]`` on rank 0 (None when there is one process: ``model``
    itself is whole then).
    """
    hf_logging.set_verbosity_warning()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    set_precision(model, precision)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tracking_env(tracking))  # the trackers' callbacks read it when the Trainer is made
        if work_dir is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="merit-trainer-"))
            resume = None
        else:
            scratch = str(work_dir)
            resume = last_checkpoint(work_dir)
        checkpoints = work_dir is not None and bool(save_steps)
        args = training_arguments(cfg, precision, output_dir=scratch, seed=seed,
                                  save_steps=save_steps if checkpoints else None, progress=progress,
                                  tracking=tracking)
        # A VLM's batches also carry pixels and image fields (merit.data.vision); text keeps HF's collator.
        vision = collator_for(tokenizer)
        trainer = _Trainer(
            model=model,
            args=args,
            train_dataset=_Examples(examples) if vision is None else VisionDataset(examples),
            data_collator=vision or text_collator(tokenizer, cfg.packing),
            lengths=lengths_of(examples) if cfg.group_by_length else None,
        )
        # Our own console output: a plain progress bar (or none), never the per-step log dicts.
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        if progress:
            trainer.add_callback(_Bar(desc))
        trainer.add_callback(StopOnNonFiniteLoss())
        trainer.add_callback(StopOnStall(cfg.learning_rate))
        if report is not None:
            trainer.add_callback(_Report(report))
        # Checkpoint saves would each print a "Writing model shards" bar through our progress bar.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        start = time.time()
        try:
            out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            processes = trainer.accelerator.num_processes
            distributed = str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1]
            if state_out is not None:
                state_out["state_dict"] = trainer.accelerator.get_state_dict(trainer.model) if processes > 1 else None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    model.eval()
    return {
        "examples": len(examples),
        "precision": precision,
        "processes": processes,
        "distributed": distributed,  # accelerate's DistributedType: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, DEEPSPEED
        "tokens_seen": int(sum(lengths_of(examples)) * cfg.epochs),
        "steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "seconds": round(time.time() - start, 2),
        "resumed_from_step": int(resume.name.split("-", 1)[1]) if resume else None,
        "hyperparameters": cfg.model_dump(),
        "seed": seed,
    }
