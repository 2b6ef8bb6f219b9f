"""One branch as a standalone job: θ(0) + the plan's group of sources -> a checkpoint folder + manifest.

A job carries everything it needs (paths, config sections), so any launcher can run it anywhere the
files are. The joint baseline is the same job over every source.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from merit import artifacts
from merit.config import MixtureConfig, ModelConfig, TrainConfig
from merit.data.mixture import load_train
from merit.errors import MeritError
from merit.models.loading import DTYPES, load_for_training, load_tokenizer
from merit.train import options
from merit.train.options import distributed
from merit.train.trainer import last_checkpoint, train


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
    model_cfg: ModelConfig
    seed: int
    key: str
    save_steps: int | None = None  # Trainer checkpoint every N steps in ``work`` (resume); None: no checkpoints
    tracking: options.Tracking | None = None  # train.report_to: where the training curves go

    @property
    def log(self) -> Path:
        """One log file per job, beside its folder: ``branches/<k>.log``, ``joint.log``."""
        from merit.launch.status import log_path

        return log_path(self.out)

    def run(self, *, progress: bool = False, launcher: str | None = None) -> dict:
        return run_branch(self, progress=progress, launcher=launcher)

    @property
    def work(self) -> Path:
        """Scratch folder for Trainer checkpoints, stable across attempts: ``branches/.<k>.work``."""
        from merit.launch.status import work_path

        return work_path(self.out)


def data_hash(mixture: dict, sources: tuple[str, ...]) -> str:
    """Identity of a branch's data: the sha256s of its sources' training files."""
    h = hashlib.sha256()
    for e in mixture["sources"]:
        if e["name"] in sources:
            h.update(f"{e['name']}:{e['train_sha256']}\n".encode())
    return h.hexdigest()


def prepare_work(job: BranchJob) -> Path:
    """The job's scratch folder, emptied first when it holds checkpoints of other inputs (another key)."""
    spec = job.work / "job.json"
    if job.work.exists():
        try:
            same = artifacts.read_json(spec).get("key") == job.key
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(job.work)
    job.work.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(spec, {"key": job.key, "name": job.name, "sources": list(job.sources)})
    # A kill during the final save leaves a half-written ``.<k>.tmp-*`` sibling; it is never resumed from.
    for stale in job.out.parent.glob(f".{job.out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return job.work


def hardware() -> dict:
    """Where a branch ran, for its manifest."""
    import transformers

    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


class _JobLog:
    """Appends timestamped lines to the job's log file and keeps its status file current (throttled)."""

    def __init__(self, job: BranchJob):
        from merit.launch import status

        self.job, self.status = job, status
        job.log.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(job.log, "a", buffering=1)
        self.last_status = 0.0

    def line(self, text: str) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def step(self, info: dict) -> None:
        if "loss" in info:
            extras = "  ".join(f"{k} {info[k]:.4g}" for k in ("loss", "learning_rate", "grad_norm") if k in info)
            self.line(f"step {info['step']}/{info['max_steps']}  {extras}")
        # Rewriting a JSON file every step would cost more than a tiny model's step: at most once a second.
        if time.time() - self.last_status > 1.0 or info["step"] == info["max_steps"]:
            self.status.write_status(self.job.out, **info)
            self.last_status = time.time()

    def close(self) -> None:
        self.file.close()


def barrier(world: int) -> None:
    """Wait for every rank of a multi-process branch (accelerate's process group, which the Trainer reuses)."""
    if world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _train(job: BranchJob, precision: str, *, progress: bool, report=None):
    """Load θ(0) for the resolved ``precision``, train it on the job's sources; (model, tokenizer, stats,
    the gathered full state dict of a multi-process branch on rank 0, else None)."""
    tokenizer = load_tokenizer(job.theta0)
    model = load_for_training(job.theta0, job.model_cfg, job.train_cfg.lora, job.seed,
                              dtype=options.load_dtype(precision, job.model_cfg))
    examples = load_train(job.mixture, list(job.sources), tokenizer, job.mixture_cfg)
    state: dict = {}
    stats = train(model, tokenizer, examples, job.train_cfg, job.seed, precision=precision, desc=job.name,
                  work_dir=job.work, save_steps=job.save_steps, progress=progress, report=report, state_out=state,
                  tracking=job.tracking)
    return model, tokenizer, stats, state.get("state_dict")


def save_dtype(job: BranchJob) -> str:
    """What a branch saves in: ``train.save_dtype``, else θ(0)'s checkpoint dtype (else ``model.dtype``)."""
    from merit.merge.safetensors_io import floating_dtype

    return job.train_cfg.save_dtype or floating_dtype(job.theta0) or job.model_cfg.dtype


def _follow(job: BranchJob, world: int, precision: str) -> dict:
    """A non-zero rank of a multi-process branch: train in step with rank 0 (the Trainer's data-parallel
    or sharded group, joining the final gathering of the weights), and leave the log, status and saving
    to rank 0."""
    barrier(world)
    _train(job, precision, progress=False)
    barrier(world)
    return artifacts.read_manifest(job.out)


def run_branch(job: BranchJob, *, progress: bool = True, launcher: str | None = None) -> dict:
    """Train one branch from θ(0) and write its folder (checkpoint + manifest) in one rename.

    Resumable: Trainer checkpoints go to ``job.work`` every ``job.save_steps`` steps and a rerun continues
    from the newest. In a multi-process job (``launch.processes_per_branch``; or a hand-started
    ``torchrun``) every rank trains through the Trainer's data-parallel group (DDP, FSDP or DeepSpeed),
    the weights are gathered whole to rank 0, and rank 0 alone writes the log, status and folder. The job's log (``job.log``) and status file record start, progress, end or failure,
    whichever launcher runs it; a failure is recorded and re-raised.
    """
    from merit.launch import status

    if artifacts.is_done(job.out, job.key):
        return artifacts.read_manifest(job.out)
    rank, world = distributed()
    from merit.models.vlm import is_vlm

    # Before anything is written: what this machine cannot train is refused in one line.
    precision = options.check_train_options(job.train_cfg, job.model_cfg, is_vlm=is_vlm(job.theta0))
    if rank != 0:
        return _follow(job, world, precision)
    state, st = status.job_state(job.out)
    if state == "running" and st.get("host") == socket.gethostname() and st.get("pid") != os.getpid():
        # Two copies of one branch would write the same checkpoints; a dead process shows as "failed".
        raise MeritError(f"{job.name} is already running (pid {st.get('pid')}; log: {job.log}); "
                         "wait for it or stop it first")
    started = time.time()
    status.mark_started(job.out, job.name, launcher)
    log = _JobLog(job)
    try:
        log.line(f"start {job.name}: {len(job.sources)} source(s), pid {os.getpid()} on {socket.gethostname()}"
                 f"{f' ({launcher})' if launcher else ''}, {torch.get_num_threads()} torch thread(s)")
        work = prepare_work(job)
        barrier(world)  # the other ranks of a multi-GPU branch start once the work folder is ready
        resume = last_checkpoint(work)
        if resume is not None:
            log.line(f"resuming from the checkpoint at step {resume.name.split('-')[-1]} ({resume})")
        model, tokenizer, stats, gathered = _train(job, precision, progress=progress, report=log.step)
        saved = save_dtype(job)
        with artifacts.atomic_dir(job.out) as tmp:
            if gathered is None:  # one process: the model is whole
                model.to(DTYPES[saved]).save_pretrained(tmp, safe_serialization=True)
            else:  # several: the full weights rank 0 gathered (from FSDP / ZeRO-3 shards too)
                gathered = {k: v.to(DTYPES[saved]) if v.is_floating_point() else v for k, v in gathered.items()}
                model.save_pretrained(tmp, state_dict=gathered, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            manifest = artifacts.write_manifest(
                tmp,
                job.key,
                name=job.name,
                sources=list(job.sources),
                theta0=str(job.theta0),
                theta0_hash=job.theta0_hash,
                data_hash=data_hash(job.mixture, job.sources),
                hardware=hardware(),
                save_dtype=saved,
                started=started,
                finished=time.time(),
                duration_s=round(time.time() - started, 2),
                **stats,
            )
    except BaseException as e:
        log.line("failed:\n" + traceback.format_exc())
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}".splitlines()[0]
        status.write_status(job.out, state="failed", error=reason, finished=time.time())
        log.close()
        raise
    barrier(world)  # the other ranks read the manifest once it is written
    # The checkpoints served their purpose; a finished branch is its folder + manifest.
    shutil.rmtree(job.work, ignore_errors=True)
    log.line(f"done in {manifest['duration_s']} s: {manifest['steps']} steps, train loss {manifest['train_loss']:.4f}")
    log.close()
    status.write_status(job.out, state="done", finished=time.time(), error=None)
    return manifest
