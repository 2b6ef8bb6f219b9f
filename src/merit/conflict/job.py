"""The gradient stage's work as launcher jobs: sources spread over ``grads.workers`` processes.

A :class:`GradJob` is a share of the sources whose vectors are not stored yet. Any launcher runs it like a
branch job (local worker processes with their own GPU or CPU threads, Ray tasks, Slurm jobs): it loads θ(0)
once, reads each of its sources' calibration rows from the token cache, and writes each vector into the
per-source store as it finishes (``merit.conflict.store``), so resume and incremental cosines work as with
one process. The job's own folder (``grads/.workers/<i>``) gets a manifest when its share is done — what
launchers check — and its log and status file sit beside it.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from merit import artifacts
from merit.config import GradsConfig, LoraConfig, MixtureConfig, ModelConfig


@dataclass(frozen=True)
class GradJob:
    name: str  # "gradients 1/2"
    out: Path  # the job's done-marker folder
    store: Path  # grads/: where the vectors go
    theta0: Path
    sources: tuple[str, ...]
    keys: dict[str, str]  # each source's stored-vector key
    mixture: dict  # the mixture manifest
    mixture_cfg: MixtureConfig
    model_cfg: ModelConfig
    lora_cfg: LoraConfig | None
    grads_cfg: GradsConfig
    spec: object  # merit.conflict.compress.CompressionSpec
    seed: int
    key: str

    @property
    def log(self) -> Path:
        from merit.launch.status import log_path

        return log_path(self.out)

    def run(self, *, progress: bool = False, launcher: str | None = None) -> dict:
        """Compute and store this share's vectors (those not stored yet), then mark the job done."""
        from merit.launch import status

        if artifacts.is_done(self.out, self.key):
            return artifacts.read_manifest(self.out)
        status.mark_started(self.out, self.name, launcher)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", buffering=1) as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} start {self.name}: {len(self.sources)} source(s)\n")
            try:
                stats = compute(self, progress=progress,
                                report=lambda done, total: status.write_status(self.out, step=done, max_steps=total))
            except BaseException as e:
                log.write("failed:\n" + traceback.format_exc())
                status.write_status(self.out, state="failed", error=f"{type(e).__name__}: {e}".splitlines()[0],
                                    finished=time.time())
                raise
            manifest = artifacts.write_manifest(self.out, self.key, sources=list(self.sources), computed=stats)
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} done: {len(stats)} vector(s) stored\n")
        status.write_status(self.out, state="done", finished=time.time(), error=None)
        return manifest


def compute(job: GradJob, *, progress: bool = True, report=None) -> dict[str, dict]:
    """Load θ(0) once and store the vectors of ``job.sources`` not stored yet; per-source timings."""
    from merit.conflict import store
    from merit.conflict.estimate import default_device, estimate
    from merit.data.mixture import load_train
    from merit.models.loading import load_for_training, load_tokenizer

    keys = {n: job.keys[n] for n in job.sources}
    todo = store.pending(job.store, keys)
    if not todo:
        return {}
    tokenizer = load_tokenizer(job.theta0, trust_remote_code=job.model_cfg.trust_remote_code)
    examples = {n: load_train(job.mixture, [n], tokenizer, job.mixture_cfg) for n in todo}  # memory-mapped
    model = load_for_training(job.theta0, job.model_cfg, job.lora_cfg, job.seed)
    g = job.grads_cfg
    return estimate(model, tokenizer, examples, job.store, keys=keys, spec=job.spec, calibration_size=g.calibration_size,
                    batch_size=g.batch_size, seed=job.seed, device=default_device(),
                    checkpointing=g.gradient_checkpointing, precision=g.precision, report=report, progress=progress)


def share(names: list[str], workers: int) -> list[tuple[str, ...]]:
    """``names`` dealt round robin into at most ``workers`` non-empty shares."""
    workers = max(1, min(workers, len(names)))
    return [tuple(names[i::workers]) for i in range(workers)]


def launch_config(launch, workers: int):
    """The launch settings for ``workers`` gradient jobs: one process each (no torchrun) and one GPU each
    where branches get several (``launch.devices`` entries split into single GPUs, ``gpus_per_branch``
    capped at 1), so an 8-GPU node runs 8 gradient workers where it runs one 8-rank branch."""
    devices = None
    if launch.devices:
        devices = [d.strip() for entry in launch.devices for d in str(entry).split(",") if d.strip()]
    return launch.model_copy(update={"workers": workers, "processes_per_branch": 1, "devices": devices,
                                     "gpus_per_branch": min(1.0, launch.gpus_per_branch)})
