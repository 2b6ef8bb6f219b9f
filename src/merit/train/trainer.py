"""Fine-tune a model on tokenized examples with transformers' Trainer.

Every branch and the joint baseline go through ``train`` with the same TrainConfig, so they share every
hyper-parameter; only the data differs (the paper's Step 4).
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from merit.config import TrainConfig
from merit.data.chat import IGNORE, Tokenized


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[Tokenized]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        t = self.examples[i]
        return {"input_ids": t.input_ids, "attention_mask": [1] * len(t.input_ids), "labels": t.labels}


def train(model, tokenizer, examples: list[Tokenized], cfg: TrainConfig, seed: int, *, desc: str = "train") -> dict:
    """Train ``model`` in place on ``examples`` for ``cfg.epochs`` and return what a manifest records."""
    hf_logging.set_verbosity_warning()
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="merit-trainer-") as scratch:
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
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            remove_unused_columns=False,
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=_Examples(examples),
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE),
        )
        start = time.time()
        out = trainer.train()
    model.eval()
    return {
        "examples": len(examples),
        "tokens_seen": int(sum(len(t.input_ids) for t in examples) * cfg.epochs),
        "steps": int(out.global_step),
        "train_loss": float(out.training_loss),
        "seconds": round(time.time() - start, 2),
        "hyperparameters": cfg.model_dump(),
        "seed": seed,
    }
