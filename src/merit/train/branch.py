"""One branch as a standalone job: θ(0) + the plan's group of sources -> a checkpoint folder + manifest.

A job carries everything it needs (paths, config sections), so any launcher can run it anywhere the
files are. The joint baseline is the same job over every source.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from merit import artifacts
from merit.config import MixtureConfig, TrainConfig
from merit.data.mixture import load_train
from merit.models.loading import load_model, load_tokenizer
from merit.train.trainer import train


@dataclass(frozen=True)
class BranchJob:
    name: str  # e.g. "branch 2/4" or "joint"
    out: Path  # the checkpoint folder to create
    theta0: Path
    theta0_hash: str
    sources: tuple[str, ...]
    mixture: dict  # the mixture manifest
    mixture_cfg: MixtureConfig
    train_cfg: TrainConfig
    dtype: str
    seed: int
    key: str


def data_hash(mixture: dict, sources: tuple[str, ...]) -> str:
    """Identity of a branch's data: the sha256s of its sources' training files."""
    h = hashlib.sha256()
    for e in mixture["sources"]:
        if e["name"] in sources:
            h.update(f"{e['name']}:{e['train_sha256']}\n".encode())
    return h.hexdigest()


def run_branch(job: BranchJob) -> dict:
    """Train one branch from θ(0) and write its folder (checkpoint + manifest) in one rename."""
    if artifacts.is_done(job.out, job.key):
        return artifacts.read_manifest(job.out)
    tokenizer = load_tokenizer(job.theta0)
    model = load_model(job.theta0, job.dtype)
    examples = load_train(job.mixture, list(job.sources), tokenizer, job.mixture_cfg)
    stats = train(model, tokenizer, examples, job.train_cfg, job.seed, desc=job.name)
    with artifacts.atomic_dir(job.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = artifacts.write_manifest(
            tmp,
            job.key,
            name=job.name,
            sources=list(job.sources),
            theta0=str(job.theta0),
            theta0_hash=job.theta0_hash,
            data_hash=data_hash(job.mixture, job.sources),
            hardware={"device": "cuda" if torch.cuda.is_available() else "cpu", "host": platform.node(),
                      "torch": torch.__version__},
            **stats,
        )
    return manifest
