"""The CUDA paths in one short run, for a session that has a GPU (none of them runs in CI or on CPU).

    .venv/bin/python benchmarks/cuda_check.py --out "$OUT"        # a few minutes on one GPU

On the tiny built-in pipeline (tiny preset, 4 built-in tasks, r = 1, --until merge) it runs branch
training with ``train.precision=bf16`` + ``train.packing`` (+ TF32), with ``fp16`` (loss scaling), and,
when the package is installed, with ``model.attn_implementation=flash_attention_2``; with 2 or more GPUs
also a 2-process branch (``launch.processes_per_branch=2``, DDP over NCCL) and the FSDP / ZeRO-3
full-tensor tests of tests/test_distributed.py. Each case records exit code, seconds, the branch
manifest's precision / processes / distributed type, the GPU and the train loss into
``OUT/cuda_check.json`` (written after every case), and prints a Markdown table to paste into
benchmarks/cuda_results.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def cases(gpus: int) -> list[tuple[str, list[str]]]:
    out = [("bf16 + packing", ["train.precision=bf16", "train.packing=true"]),
           ("fp16 (loss scaling)", ["train.precision=fp16"]),
           ("bf16 + checkpointing + group_by_length", ["train.precision=bf16", "train.gradient_checkpointing=true",
                                                      "train.group_by_length=true"])]
    if importlib.util.find_spec("flash_attn") is not None:
        out.append(("bf16 + flash_attention_2 + packing", ["train.precision=bf16", "train.packing=true",
                                                          "model.attn_implementation=flash_attention_2"]))
    if gpus >= 2:
        out.append(("2 processes (DDP/NCCL), bf16", ["train.precision=bf16", "launch.processes_per_branch=2",
                                                      "launch.devices=['0,1']", "train.batch_size=8"]))
        out.append(("2 processes, FSDP, bf16", ["train.precision=bf16", "launch.processes_per_branch=2",
                                                "launch.devices=['0,1']", "train.batch_size=8", "train.fsdp={}"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "cuda-check")))
    args = p.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    info = {"gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16": gpus > 0 and torch.cuda.is_bf16_supported(), "cases": []}
    config = args.out / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "cuda-check", "model": {"preset": "tiny"},
        "mixture": {"builtin": {"tasks": ["to_upper", "to_lower", "add", "reverse"], "train_per_task": 64,
                                "eval_per_task": 4}, "max_length": 64},
        "prepare": {"examples_per_task": 32, "epochs": 1, "batch_size": 16}, "split": {"r": 1},
        "grads": {"calibration_size": 16, "batch_size": 8},
        "train": {"learning_rate": 1e-3, "batch_size": 16, "warmup_ratio": 0.05},
        "baselines": {"joint": False, "random": False}, "merge": {"operators": ["token-weighted"]}}))
    for name, overrides in cases(gpus):
        run = args.out / name.split(" ")[0].replace("+", "") / str(len(info["cases"]))
        cmd = [sys.executable, "-m", "merit.cli", "run", str(config), "--out", str(run), "--until", "merge"]
        for o in overrides:
            cmd += ["--set", o]
        start = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        row = {"case": name, "overrides": overrides, "rc": proc.returncode, "seconds": round(time.time() - start, 1)}
        manifest = run / "branches" / "0" / "manifest.json"
        if manifest.exists():
            m = json.loads(manifest.read_text())
            row.update({k: m.get(k) for k in ("precision", "processes", "distributed", "train_loss", "save_dtype")})
            row["device"] = m.get("hardware", {}).get("gpus")
        else:
            row["stderr_tail"] = proc.stderr[-2000:]
        info["cases"].append(row)
        (args.out / "cuda_check.json").write_text(json.dumps(info, indent=1))
        print(f"{name}: rc {proc.returncode}, {row['seconds']} s", flush=True)
    if gpus >= 2:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_distributed.py", "-k",
                               "fsdp_branch_saves or zero3_branch_saves"], capture_output=True, text=True, cwd=ROOT)
        info["sharded_save_tests"] = {"rc": proc.returncode, "tail": proc.stdout[-1500:]}
        (args.out / "cuda_check.json").write_text(json.dumps(info, indent=1))
    print(f"\nGPUs: {info['gpus']}, torch {info['torch']}, CUDA {info['cuda']}\n")
    print("| case | rc | seconds | precision | processes | distributed | train loss |")
    print("|---|---|---|---|---|---|---|")
    for r in info["cases"]:
        print(f"| {r['case']} | {r['rc']} | {r['seconds']} | {r.get('precision')} | {r.get('processes')} | "
              f"{r.get('distributed')} | {r.get('train_loss')} |")


if __name__ == "__main__":
    main()
