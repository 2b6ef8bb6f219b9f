"""Per-GPU memory of one branch's full fine-tuning, from the architecture, precision and sharding.

    .venv/bin/python benchmarks/memory_model.py            # the table for SmolLM2-135M, 3B and 7B
    .venv/bin/python benchmarks/memory_model.py --json

The model itself is ``merit.plan.estimate.train_memory`` (what ``merit plan`` uses; its docstring says
what it counts). This script applies it to the paper's settings and the reference configs, from the
models' architecture numbers. ``benchmarks/train_bench.py`` checks it against the peak RSS of SmolLM2-135M
training on this CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from merit.plan.estimate import GB, KNOWN_MODELS, ModelShape, train_memory  # noqa: E402


NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "qwen2.5-vl-3b": "Qwen2.5-VL-3B-Instruct",
         "qwen2.5-vl-7b": "Qwen2.5-VL-7B (merit base VLM)"}
ARCHS = {key: KNOWN_MODELS[key]() for key in NAMES}


def memory(shape: ModelShape, **kw) -> dict[str, float]:
    return train_memory(shape, **kw)


# The settings the reference configs use (configs/*.yaml), and what fits.
SCENARIOS = [
    ("smollm2-135m", "CPU (this machine)", dict(precision="fp32", micro_batch=8, seq_len=192)),
    ("smollm2-135m", "CPU (this machine)", dict(precision="bf16", micro_batch=8, seq_len=192)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="ddp", gpus=8, micro_batch=4, seq_len=2048)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero2", gpus=8, micro_batch=4, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero2", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-3b", "8x V100-32GB", dict(precision="fp16", sharding="zero3", gpus=8, micro_batch=4, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="ddp", gpus=8, micro_batch=2, seq_len=2048)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16-pure", sharding="ddp", gpus=8, micro_batch=2,
                                          seq_len=2048)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="zero2", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
    ("qwen2.5-vl-7b", "8x A100-80GB", dict(precision="bf16", sharding="zero3", gpus=8, micro_batch=2, seq_len=2048,
                                          checkpointing=True)),
]
CAPACITY = {"8x V100-32GB": 32 * GB, "8x A100-80GB": 80 * GB, "CPU (this machine)": 24 * GB}


def table() -> list[dict]:
    rows = []
    for key, hardware, kw in SCENARIOS:
        m = memory(ARCHS[key], **kw)
        rows.append({"model": NAMES[key], "hardware": hardware, "params_B": round(ARCHS[key].params / 1e9, 3),
                     **{k: v for k, v in kw.items()}, **{k: round(v / GB, 2) for k, v in m.items()},
                     "fits": m["total"] <= CAPACITY[hardware]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = table()
    if args.json:
        print(json.dumps({"archs": {k: asdict(a) for k, a in ARCHS.items()}, "rows": rows}, indent=1))
        return
    print("| model | hardware | precision | sharding | micro-batch × len | ckpt | weights | grads | optimizer "
          "| activations | logits | total GB/GPU | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['hardware']} | {r['precision']} | {r.get('sharding', 'ddp')} | "
              f"{r['micro_batch']} × {r['seq_len']} | {'yes' if r.get('checkpointing') else 'no'} | "
              f"{r['weights'] + r['frozen']:.1f} | {r['grads']:.1f} | {r['optimizer']:.1f} | {r['activations']:.1f} | "
              f"{r['logits']:.1f} | {r['total']:.1f} | {'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
