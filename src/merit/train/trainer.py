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
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from merit.config import TrainConfig
from merit.data.chat import IGNORE, Tokenized
from merit.data.vision import VisionDataset, collator_for
from merit.errors import MeritError
from merit.train.health import StopOnStall


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
            self.training_bar = tqdm(total=state.max_steps, desc=self.desc, dynamic_ncols=True)
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
    def __init__(self, examples: list[Tokenized]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        t = self.examples[i]
        return {"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}


def train(model, tokenizer, examples: list[Tokenized], cfg: TrainConfig, seed: int, *, desc: str = "train",
          work_dir: Path | None = None, save_steps: int | None = None, progress: bool = True,
          report: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place on ``examples`` for ``cfg.epochs`` and return what a manifest records.

    With ``work_dir`` and ``save_steps``, a checkpoint (weights, optimizer, scheduler, RNG states, step) is
    kept there every ``save_steps`` optimizer steps (only the newest), and a call that finds one resumes
    from it: the Trainer restores all of these and skips the batches already seen in the epoch (the
    order comes from ``data_seed``), so on CPU the result is bitwise that of an uninterrupted run.
    ``report`` receives ``{"step", "max_steps", "loss", ...}`` at every step; a NaN/Inf loss raises
    :class:`NonFiniteLoss`.
    """
    hf_logging.set_verbosity_warning()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="merit-trainer-"))
            resume = None
        else:
            scratch = str(work_dir)
            resume = last_checkpoint(work_dir)
        checkpoints = work_dir is not None and bool(save_steps)
        args = TrainingArguments(
            output_dir=scratch,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            num_train_epochs=cfg.epochs,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler,
            warmup_steps=cfg.warmup_ratio,  # a value below 1 is a fraction of the total steps
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            optim="adamw_torch",
            seed=seed,
            data_seed=seed,
            save_strategy="steps" if checkpoints else "no",
            save_steps=save_steps or 500,
            save_total_limit=1,  # resume needs only the newest; a checkpoint holds weights + optimizer state
            report_to="none",
            # Log every step so a NaN loss stops the run at once (unfiltered) and progress is exact.
            logging_strategy="steps",
            logging_steps=1,
            logging_nan_inf_filter=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=not progress,
        )
        # A VLM's batches also carry pixels and image fields (merit.data.vision); text keeps HF's collator.
        vision = collator_for(tokenizer)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Examples(examples) if vision is None else VisionDataset(examples),
            data_collator=vision or DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
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
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    model.eval()
    return {
        "examples": len(examples),
        "tokens_seen": int(sum(len(t.input_ids) for t in examples) * cfg.epochs),
        "steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "seconds": round(time.time() - start, 2),
        "resumed_from_step": int(resume.name.split("-", 1)[1]) if resume else None,
        "hyperparameters": cfg.model_dump(),
        "seed": seed,
    }
